// Why the first library TMA copy-engine kernel (ninth session: the eighth session's patch, one
// 512-thread block, thread 0 issuing every bulk copy between block-wide barriers) reached 1.26x
// the load/store kernel at 8-32 blocks on one H200 where local_norm_bench.cu's all_tma_kernel<3,2>
// reached 1.45x.  `variant` below is that first kernel with its differences from the harness
// kernel switchable one at a time:
//   kFixed     hidden known at compile time (vpr = 1024, the harness) instead of p.hidden / 8
//   kMbarEnd   mbarriers after the stages (the harness) instead of before them
//   kValid     the row validity checks (library) or none (harness; every row is valid here)
//   kStores    3 bulk stores per row (normed, out_slot, new residual) or 2 (no out_slot: what a
//              "pull from normed" protocol would need)
// Each is worth 5-9% and together 10% (benchmarks/results/tma_gap_bisect_H200_2026-12-01_s9_*):
// instructions on the row's critical path (the block waits at a barrier while thread 0 computes
// addresses and issues), not bytes -- dropping a store gains nothing at small grids.  Hence the
// library kernel now in fused_reduce_add_norm.cuh: a producer warp issues the copies, and the
// consumers never wait for it (1.67x at 8-16 blocks).  Each row's `lib` column here is that
// kernel; `var` is the variant; every variant's outputs are compared with it word for word.
// One GPU, bf16, H = 8192, 64 MiB slice (as local_norm_bench.cu).  Median µs of 30 launches.
//
//   nvcc -std=c++17 -O3 -arch=sm_90a -I ffi ffi/bench/tma_gap_bisect.cu -o /tmp/bis && /tmp/bis
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "fused_reduce_add_norm.cuh"

#define CHECK(x)                                                                   \
  do {                                                                             \
    cudaError_t e_ = (x);                                                          \
    if (e_ != cudaSuccess) {                                                       \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x,               \
                   cudaGetErrorString(e_));                                        \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

using weave::kThreads;
using weave::smem_u32;
using T = __nv_bfloat16;
constexpr int kIn = 3, kOut = 2, kSrcs = 3;

template <bool kFixed, bool kMbarEnd, bool kValid, int kStores>
__global__ void __launch_bounds__(kThreads, 1) variant(const __grid_constant__ weave::KernelParams p) {
  constexpr int V = 2;
  extern __shared__ __align__(128) unsigned char sm[];
  const uint32_t vpr = kFixed ? 1024u : static_cast<uint32_t>(p.hidden / 8);
  const uint32_t row_bytes = vpr * 16;
  const size_t stage_bytes = size_t(kIn * kSrcs + kOut * 2) * row_bytes;
  uint64_t* mbar = reinterpret_cast<uint64_t*>(kMbarEnd ? sm + stage_bytes : sm);
  uint4* in_stage = reinterpret_cast<uint4*>(kMbarEnd ? sm : sm + 128);
  uint4* out_stage = in_stage + kIn * kSrcs * vpr;
  __shared__ float red[kThreads / 32];
  const weave::CopyEngineIo io(p);
  const int t = threadIdx.x, nb = gridDim.x, b = blockIdx.x;
  const int64_t nrows = p.row_end - p.row_begin;
  const int64_t nk = b < nrows ? (nrows - b + nb - 1) / nb : 0;
  const uint4* weight = static_cast<const uint4*>(p.weight);
  if (t == 0) {
    for (int s = 0; s < kIn; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(mbar + s)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  auto issue = [&](int64_t k) {
    if (k >= nk) return;
    const int64_t r = b + k * nb;
    uint64_t* m = mbar + k % kIn;
    const bool row = !kValid || io.valid(r);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                 ::"r"(smem_u32(m)), "r"(row ? kSrcs * row_bytes : 0u) : "memory");
    if (!row) return;
    uint4* st = in_stage + (k % kIn) * kSrcs * vpr;
#pragma unroll
    for (int q = 0; q < kSrcs; ++q) {
      const uint4* src = q < 2 ? io.source(q, r) : io.residual(r);
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], "
                   "%2, [%3];" ::"r"(smem_u32(st + q * vpr)), "l"(src), "r"(row_bytes),
                   "r"(smem_u32(m)) : "memory");
    }
  };
  if (t == 0)
    for (int k = 0; k < kIn; ++k) issue(k);
  for (int64_t k = 0; k < nk; ++k) {
    const int64_t r = b + k * nb;
    if (t == 0) asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kOut - 1) : "memory");
    __syncthreads();
    weave::tma_wait(mbar + k % kIn, (k / kIn) & 1);
    if (kValid && !io.valid(r)) {
      io.pad(r, t, kThreads, vpr);
      __syncthreads();
      if (t == 0) issue(k + kIn);
      continue;
    }
    const uint4* st = in_stage + (k % kIn) * kSrcs * vpr;
    uint4* ot = out_stage + (k % kOut) * 2 * vpr;
    uint4 x[V];
    float sumsq = 0.f;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const uint32_t c = t + v * kThreads;
      if (c < vpr) {
        float acc[8], f[8];
        weave::Vec<T>::to_float(st[c], acc);
#pragma unroll
        for (int q = 1; q < kSrcs; ++q) {
          weave::Vec<T>::to_float(st[q * vpr + c], f);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[e] += f[e];
        }
        x[v] = weave::Vec<T>::from_float(acc);
        ot[vpr + c] = x[v];
        weave::Vec<T>::to_float(x[v], f);
#pragma unroll
        for (int e = 0; e < 8; ++e) sumsq += f[e] * f[e];
      }
    }
    const float total = weave::group_sum(sumsq, red, kThreads);
    const float rstd = rsqrtf(total / static_cast<float>(p.hidden) + p.eps);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const uint32_t c = t + v * kThreads;
      if (c < vpr) {
        float xf[8], wf[8];
        weave::Vec<T>::to_float(x[v], xf);
        weave::Vec<T>::to_float(weight[c], wf);
#pragma unroll
        for (int e = 0; e < 8; ++e) xf[e] = wf[e] * (xf[e] * rstd);
        ot[c] = weave::Vec<T>::from_float(xf);
      }
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    if (t == 0) {
      const size_t off = io.global_offset(io.base + r, 0);
      // the library's order: normed, out_slot, new residual (kStores = 2 skips out_slot)
      char* dst[3] = {static_cast<char*>(p.normed) + off,
                      static_cast<char*>(p.out_slots[p.rank]) + off,
                      reinterpret_cast<char*>(io.new_residual(r))};
      const uint4* from[3] = {ot, ot, ot + vpr};
#pragma unroll
      for (int d = 0; d < 3; ++d)
        if (kStores == 3 || d != 1)
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                     ::"l"(dst[d]), "r"(smem_u32(from[d])), "r"(row_bytes) : "memory");
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
      issue(k + kIn);
    }
  }
  if (t == 0) weave::tma_drain_stores();
}

__global__ void fill_random(T* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    x[i] = __float2bfloat16((h & 0xffff) / 32768.0f - 1.0f);
  }
}

__global__ void count_diff_words(const uint4* a, const uint4* b, size_t n, unsigned long long* out) {
  unsigned long long c = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const uint4 x = a[i], y = b[i];
    c += (x.x != y.x) | (x.y != y.y) | (x.z != y.z) | (x.w != y.w);
  }
  atomicAdd(out, c);
}

int main() {
  const int64_t H = 8192, S = 4096, Tk = 2 * S;
  const size_t row = H * 2, slice = S * row;
  T *partial, *in_slot, *residual, *weight;
  CHECK(cudaMalloc(&partial, Tk * row));
  CHECK(cudaMalloc(&in_slot, Tk * row));
  CHECK(cudaMalloc(&residual, slice));
  CHECK(cudaMalloc(&weight, row));
  fill_random<<<1024, 256>>>(partial, Tk * H, 1);
  fill_random<<<1024, 256>>>(in_slot, Tk * H, 2);
  fill_random<<<1024, 256>>>(residual, S * H, 3);
  fill_random<<<64, 256>>>(weight, H, 4);
  weave::KernelParams p{};
  p.partial = partial;
  p.residual = residual;
  p.weight = weight;
  p.in_slots[0] = in_slot;
  p.tokens = Tk;
  p.hidden = H;
  p.shard = S;
  p.row_begin = 0;
  p.row_end = S;
  p.rank = 0;
  p.world = 2;
  p.eps = 1e-6f;
  p.threads_per_row = 512;
  // outputs: [0] the library TMA kernel (reference), [1] the variant under test
  T* out[2][3];
  for (auto& o : out)
    for (auto& x : o) CHECK(cudaMalloc(&x, Tk * row));
  auto params = [&](int v) {
    weave::KernelParams q = p;
    q.normed = out[v][0];
    q.new_residual = out[v][1];
    q.out_slots[0] = out[v][2];
    return q;
  };
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  auto time_us = [&](auto launch) {
    for (int i = 0; i < 3; ++i) launch();
    std::vector<float> ts;
    for (int i = 0; i < 30; ++i) {
      CHECK(cudaEventRecord(e0));
      launch();
      CHECK(cudaEventRecord(e1));
      CHECK(cudaEventSynchronize(e1));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, e0, e1));
      ts.push_back(ms * 1e3f);
    }
    CHECK(cudaGetLastError());
    std::sort(ts.begin(), ts.end());
    return ts[ts.size() / 2];
  };
  const int lib_smem = int(weave::ce_tma_smem_bytes(2, H));
  const int var_smem = 128 + (kIn * kSrcs + kOut * 2) * int(row);
  CHECK(cudaFuncSetAttribute(weave::ce_tma_reduce_add_norm_kernel<T, 1>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, weave::kCeTmaSmemMax));
  auto run = [&](const char* name, auto kernel, int stores) {
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               weave::kCeTmaSmemMax));
    std::printf("%-34s", name);
    for (int grid : {8, 16, 32, 132}) {
      for (int v = 0; v < 2; ++v)
        for (int o = 0; o < 3; ++o) CHECK(cudaMemset(out[v][o], 0xff, Tk * row));
      const weave::KernelParams q0 = params(0), q1 = params(1);
      const float tl = time_us([&] {
        weave::ce_tma_reduce_add_norm_kernel<T, 1><<<grid, weave::kCeTmaThreads, lib_smem>>>(q0);
      });
      const float tv = time_us([&] { kernel<<<grid, kThreads, var_smem>>>(q1); });
      unsigned long long* cnt;
      CHECK(cudaMalloc(&cnt, sizeof(*cnt)));
      CHECK(cudaMemset(cnt, 0, sizeof(*cnt)));
      for (int o = 0; o < stores; ++o)
        count_diff_words<<<256, 256>>>(reinterpret_cast<const uint4*>(out[0][o]),
                                       reinterpret_cast<const uint4*>(out[1][o]), Tk * row / 16, cnt);
      unsigned long long n;
      CHECK(cudaMemcpy(&n, cnt, sizeof(n), cudaMemcpyDeviceToHost));
      CHECK(cudaFree(cnt));
      std::printf(" | g%-3d lib %6.1f var %6.1f x%.2f%s", grid, tl, tv, tl / tv, n ? " DIFF" : "");
    }
    std::printf("\n");
  };
  std::printf("H=8192 bf16, 64 MiB slice; µs (median of 30); x = library / variant\n");
  run("library copy (runtime, mbar first, valid, 3)", variant<false, false, true, 3>, 3);
  run("fixed vpr", variant<true, false, true, 3>, 3);
  run("mbar at end", variant<false, true, true, 3>, 3);
  run("no validity checks", variant<false, false, false, 3>, 3);
  run("harness-like (fixed, end, no checks)", variant<true, true, false, 3>, 3);
  run("library, 2 stores (no out_slot)", variant<false, false, true, 2>, 2);
  run("harness-like, 2 stores", variant<true, true, false, 2>, 2);
  return 0;
}

// Single-GPU microbenchmark of the copy-engine algorithm's local kernel (norm_rows over one
// rank's slice: two sources + residual in, new residual + out_slot + normed out), to find what
// bounds it at small grids.  Everything is local memory, so one GPU is enough: the kernel takes
// world = 2 with the peer's rows already "pushed" into in_slot.
//
//   nvcc -std=c++17 -O3 -arch=sm_90a -I ffi experimental/ffi/local_norm_bench.cu -o /tmp/lnb && /tmp/lnb
//
// Layouts compared at H = 8192 (bf16):
//   v2/tpr512  what the library runs: 512 threads per row, one row per block in flight, the
//              next row's inputs prefetched into registers (kVec = 2)
//   v4/tpr256  256 threads per row, 4 vectors each: two rows per block in flight, no prefetch
//   v4/tpr512  512 threads per row, 4-vector code (2 used): one row in flight, no prefetch, to
//              separate the prefetch's effect from the second row's
// Output: per grid, median µs of 30 launches (CUDA events), GB/s of HBM traffic (3 reads and
// 3 writes of the slice) and per block, and the largest difference between the two layouts'
// normed rows (they sum the same values; only the sum of squares' order differs).  Then two
// diagnostics of the library layout: the same kernel with fewer stores per row, and with the
// next 2-4 rows prefetched into shared memory (cp.async).  Findings: experimental/README.md and
// ffi/NOTES.md ("What bounds a row per SM").
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <utility>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "bench_util.cuh"  // and the kernel header

// Diagnostic Io variants of the copy-engine kernel, to see whether the stores bound a row:
// kStores = 2 drops the out_slot store (peers would pull from `normed`), kStores = 1 also the new
// residual's.  Same loads, same arithmetic.
template <int kStores>
struct FewerStoresIo : weave::CopyEngineIo {
  using weave::CopyEngineIo::CopyEngineIo;
  __device__ uint4* new_residual(int64_t i) const {
    return kStores >= 2 ? weave::CopyEngineIo::new_residual(i) : nullptr;
  }
  __device__ void emit(int64_t i, uint32_t c, uint4 v) const {
    *reinterpret_cast<uint4*>(static_cast<char*>(p.normed) + global_offset(base + i, c)) = v;
  }
};

template <int kStores>
__global__ void __launch_bounds__(weave::kThreads, 1)
    fewer_stores_kernel(const __grid_constant__ weave::KernelParams p) {
  __shared__ float smem[weave::kThreads / 32];
  const FewerStoresIo<kStores> io(p);
  weave::norm_rows<__nv_bfloat16, 2>(p, io, p.row_end - p.row_begin, smem);
}

// The row arithmetic of the two experiments below (bf16, world 2), in norm_rows' order so their
// rows stay bitwise equal to the library's: one vector's sources and residual summed and
// rounded (its squares added to sumsq), and one vector normalized.
__device__ __forceinline__ uint4 add_sources_and_residual(const uint4& s0, const uint4& s1,
                                                          const uint4& res, float& sumsq) {
  using B = weave::Vec<__nv_bfloat16>;
  float acc[8], f[8];
  B::to_float(s0, acc);
  B::to_float(s1, f);
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] += f[e];
  B::to_float(res, f);
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] += f[e];
  const uint4 x = B::from_float(acc);
  B::to_float(x, f);
#pragma unroll
  for (int e = 0; e < 8; ++e) sumsq += f[e] * f[e];
  return x;
}

__device__ __forceinline__ uint4 normalized(const uint4& x, const uint4& w, float rstd) {
  using B = weave::Vec<__nv_bfloat16>;
  float xf[8], wf[8];
  B::to_float(x, xf);
  B::to_float(w, wf);
#pragma unroll
  for (int e = 0; e < 8; ++e) xf[e] = wf[e] * (xf[e] * rstd);
  return B::from_float(xf);
}

// Experiment: the same rows with a deeper prefetch, through per-thread cp.async copies into
// shared memory (kDepth rows ahead; each thread reads back only its own vectors, so no barrier
// guards the staging).  world = 2, bf16, H = 2 * 8 * kThreads (8192), one row per iteration.
template <int kDepth>
__global__ void __launch_bounds__(weave::kThreads, 1)
    deep_prefetch_kernel(const __grid_constant__ weave::KernelParams p) {
  constexpr int V = 2;  // 16-byte vectors per thread per source row
  extern __shared__ uint4 stage[];  // [kDepth][3 sources][V][kThreads]
  __shared__ float smem[weave::kThreads / 32];
  const weave::CopyEngineIo io(p);
  const int t = threadIdx.x, nb = gridDim.x, b = blockIdx.x;
  const int64_t nrows = p.row_end - p.row_begin;
  const int64_t nk = b < nrows ? (nrows - b + nb - 1) / nb : 0;
  const uint4* weight = static_cast<const uint4*>(p.weight);
  auto slot = [&](int d, int s, int v) -> uint4* {
    return stage + ((d * 3 + s) * V + v) * weave::kThreads + t;
  };
  auto issue = [&](int64_t k) {  // row k's loads into stage k % kDepth, one commit group
    if (k < nk) {
      const int64_t r = b + k * nb;
      const uint4* src[3] = {io.source(0, r), io.source(1, r), io.residual(r)};
#pragma unroll
      for (int s = 0; s < 3; ++s)
#pragma unroll
        for (int v = 0; v < V; ++v)
          __pipeline_memcpy_async(slot(k % kDepth, s, v), src[s] + t + v * weave::kThreads, 16);
    }
    __pipeline_commit();
  };
  for (int d = 0; d < kDepth - 1; ++d) issue(d);
  for (int64_t k = 0; k < nk; ++k) {
    issue(k + kDepth - 1);
    __pipeline_wait_prior(kDepth - 1);  // row k's group has landed (this thread's copies)
    const int64_t r = b + k * nb;
    const int d = k % kDepth;
    uint4 x[V];
    float sumsq = 0.f;
    uint4* new_res = io.new_residual(r);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      x[v] = add_sources_and_residual(*slot(d, 0, v), *slot(d, 1, v), *slot(d, 2, v), sumsq);
      new_res[t + v * weave::kThreads] = x[v];
    }
    const float total = weave::group_sum(sumsq, smem, weave::kThreads);
    const float rstd = rsqrtf(total / static_cast<float>(p.hidden) + p.eps);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const uint32_t c = t + v * weave::kThreads;
      io.emit(r, c, normalized(x[v], weight[c], rstd));
    }
  }
}

// Experiment: every byte through the Tensor Memory Accelerator.  Thread 0 bulk-loads each row's
// two sources and residual into one of kIn input stages (mbarrier per stage) and bulk-stores the
// finished row (normed -> normed and out_slot, new residual) from one of kOut output stages; the
// 512 threads only compute, from and into shared memory.  world = 2, bf16, H = 8192.
template <int kIn, int kOut>
__global__ void __launch_bounds__(weave::kThreads, 1)
    all_tma_kernel(const __grid_constant__ weave::KernelParams p) {
  constexpr int V = 2, RV = V * weave::kThreads;  // 16-byte vectors per row
  constexpr uint32_t kRowBytes = RV * 16;
  extern __shared__ __align__(128) uint4 dyn[];
  uint4* in_stage = dyn;                       // [kIn][3][RV]
  uint4* out_stage = dyn + kIn * 3 * RV;       // [kOut][2][RV]: normed, new residual
  uint64_t* mbar = reinterpret_cast<uint64_t*>(out_stage + kOut * 2 * RV);  // [kIn]
  __shared__ float smem[weave::kThreads / 32];
  const weave::CopyEngineIo io(p);
  const int t = threadIdx.x, nb = gridDim.x, b = blockIdx.x;
  const int64_t nrows = p.row_end - p.row_begin;
  const int64_t nk = b < nrows ? (nrows - b + nb - 1) / nb : 0;
  const uint4* weight = static_cast<const uint4*>(p.weight);
  if (t == 0) {
    for (int s = 0; s < kIn; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(weave::smem_u32(mbar + s)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  auto issue = [&](int64_t k) {  // thread 0: row k's three loads into stage k % kIn
    if (k >= nk) return;
    const int64_t r = b + k * nb;
    uint4* st = in_stage + (k % kIn) * 3 * RV;
    uint64_t* m = mbar + k % kIn;
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                 ::"r"(weave::smem_u32(m)), "r"(3 * kRowBytes) : "memory");
    const uint4* src[3] = {io.source(0, r), io.source(1, r), io.residual(r)};
    for (int s = 0; s < 3; ++s)
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], "
                   "%2, [%3];" ::"r"(weave::smem_u32(st + s * RV)), "l"(src[s]), "r"(kRowBytes),
                   "r"(weave::smem_u32(m)) : "memory");
  };
  if (t == 0)
    for (int k = 0; k < kIn; ++k) issue(k);
  for (int64_t k = 0; k < nk; ++k) {
    const int64_t r = b + k * nb;
    if (t == 0)  // the stores that last read this output stage have finished reading it
      asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kOut - 1) : "memory");
    __syncthreads();
    weave::tma_wait(mbar + k % kIn, (k / kIn) & 1);
    const uint4* st = in_stage + (k % kIn) * 3 * RV;
    uint4* ot = out_stage + (k % kOut) * 2 * RV;
    uint4 x[V];
    float sumsq = 0.f;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int c = t + v * weave::kThreads;
      x[v] = add_sources_and_residual(st[c], st[RV + c], st[2 * RV + c], sumsq);
      ot[RV + c] = x[v];
    }
    const float total = weave::group_sum(sumsq, smem, weave::kThreads);
    const float rstd = rsqrtf(total / static_cast<float>(p.hidden) + p.eps);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int c = t + v * weave::kThreads;
      ot[c] = normalized(x[v], weight[c], rstd);
    }
    // generic-proxy smem writes (outputs) and reads (inputs) before the async proxy's accesses
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    if (t == 0) {
      const size_t off = io.global_offset(io.base + (r), 0);
      char* normed = static_cast<char*>(p.normed) + off;
      char* out_slot = static_cast<char*>(p.out_slots[p.rank]) + off;
      uint4* new_res = io.new_residual(r);
      asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                   ::"l"(normed), "r"(weave::smem_u32(ot)), "r"(kRowBytes) : "memory");
      asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                   ::"l"(out_slot), "r"(weave::smem_u32(ot)), "r"(kRowBytes) : "memory");
      asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                   ::"l"(new_res), "r"(weave::smem_u32(ot + RV)), "r"(kRowBytes) : "memory");
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
      issue(k + kIn);  // this input stage has been read by every thread (barrier above)
    }
  }
  if (t == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// The experimental TMA copy-engine kernel for p.hidden (kG from ce_tma_rows).
template <typename T>
void launch_tma(int grid, const weave::KernelParams& p) {
  const int64_t smem = weave::ce_tma_smem_bytes(2, p.hidden);
  if (weave::ce_tma_rows(p.hidden) == 1)
    weave::ce_tma_reduce_add_norm_kernel<T, 1><<<grid, weave::kCeTmaThreads, smem>>>(p);
  else
    weave::ce_tma_reduce_add_norm_kernel<T, 2><<<grid, weave::kCeTmaThreads, smem>>>(p);
}

// The experimental TMA copy-engine kernel against the library's load/store kernel, bitwise, on
// one GPU: every output word (normed, out_slot, new residual; unwritten words stay poisoned in both) over
// hidden sizes, world 2, the last rank (tail and padding rows), grids, and a call cut in chunks
// (row_begin > 0).  Returns the number of failing cases.
template <typename T>
int verify_library_tma(const char* dtype) {
  int failures = 0;
  for (int world : {2})  // the only world the TMA kernel takes
    for (int64_t H : {2056, 3000, 4096, 4104, 6144, 8000, 8192}) {  // weave::ce_tma_rows > 0
      for (int64_t tokens : {int64_t(1), int64_t(777), int64_t(4096)}) {
        const int64_t S = (tokens + world - 1) / world;
        const size_t rowb = H * 2, big = size_t(world) * S * rowb;
        char *partial, *in_slot, *residual, *weight, *out[2][3];
        CHECK(cudaMalloc(&partial, big));
        CHECK(cudaMalloc(&in_slot, big));
        CHECK(cudaMalloc(&residual, S * rowb));
        CHECK(cudaMalloc(&weight, rowb));
        for (auto& o : out)
          for (auto& b : o) CHECK(cudaMalloc(&b, big));
        fill_random<<<256, 256>>>(reinterpret_cast<__nv_bfloat16*>(partial), big / 2, 11);
        fill_random<<<256, 256>>>(reinterpret_cast<__nv_bfloat16*>(in_slot), big / 2, 12);
        fill_random<<<256, 256>>>(reinterpret_cast<__nv_bfloat16*>(residual), S * H, 13);
        fill_random<<<64, 256>>>(reinterpret_cast<__nv_bfloat16*>(weight), H, 14);
        for (int grid : {7, 16, 132}) {
          for (auto& o : out)
            for (auto& b : o) CHECK(cudaMemset(b, 0xff, big));
          weave::KernelParams q{};
          q.partial = partial;
          q.residual = residual;
          q.weight = weight;
          q.in_slots[world - 1] = in_slot;
          q.tokens = tokens;
          q.hidden = H;
          q.shard = S;
          q.rank = world - 1;
          q.world = world;
          q.eps = 1e-6f;
          q.threads_per_row = weave::threads_per_row(H);
          for (int v = 0; v < 2; ++v) {
            weave::KernelParams r = q;
            r.normed = out[v][0];
            r.out_slots[world - 1] = out[v][1];
            r.new_residual = out[v][2];
            if (v == 0) {  // reference: the load/store kernel, one launch
              r.row_begin = 0;
              r.row_end = S;
              weave::ce_reduce_add_norm_kernel<T, 2><<<grid, weave::kThreads>>>(r);
            } else {  // the TMA kernel, in two chunks
              const int64_t cut = S / 3;
              for (auto [lo, hi] : {std::pair<int64_t, int64_t>{0, cut}, {cut, S}}) {
                if (lo == hi) continue;
                r.row_begin = lo;
                r.row_end = hi;
                launch_tma<T>(grid, r);
              }
            }
          }
          CHECK(cudaGetLastError());
          unsigned long long* cnt;
          CHECK(cudaMalloc(&cnt, sizeof(*cnt)));
          CHECK(cudaMemset(cnt, 0, sizeof(*cnt)));
          for (int b = 0; b < 3; ++b)
            count_diff_words<<<256, 256>>>(reinterpret_cast<const uint4*>(out[0][b]),
                                           reinterpret_cast<const uint4*>(out[1][b]), big / 16, cnt);
          unsigned long long n;
          CHECK(cudaMemcpy(&n, cnt, sizeof(n), cudaMemcpyDeviceToHost));
          CHECK(cudaFree(cnt));
          if (n != 0) {
            ++failures;
            std::printf("VERIFY FAIL %s world %d H %lld T %lld grid %d: %llu words differ\n", dtype,
                        world, (long long)H, (long long)tokens, grid, n);
          }
        }
        CHECK(cudaFree(partial));
        CHECK(cudaFree(in_slot));
        CHECK(cudaFree(residual));
        CHECK(cudaFree(weight));
        for (auto& o : out)
          for (auto& b : o) CHECK(cudaFree(b));
      }
    }
  return failures;
}

int main() {
  for (const void* k : {(const void*)weave::ce_tma_reduce_add_norm_kernel<__nv_bfloat16, 1>,
                        (const void*)weave::ce_tma_reduce_add_norm_kernel<__nv_bfloat16, 2>,
                        (const void*)weave::ce_tma_reduce_add_norm_kernel<__half, 1>,
                        (const void*)weave::ce_tma_reduce_add_norm_kernel<__half, 2>})
    CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, weave::kCeTmaSmemMax));
  const int failures = verify_library_tma<__nv_bfloat16>("bf16") + verify_library_tma<__half>("fp16");
  std::printf("TMA copy-engine kernel vs load/store kernel: %s (%d failing cases)\n",
              failures ? "FAIL" : "all bitwise equal", failures);
  const int64_t H = 8192, S = 4096, T = 2 * S;  // slice of 64 MiB per source
  const size_t row = H * 2, slice = S * row;
  const weave::KernelParams p = ce_slice_params(H, S);
  auto* normed = static_cast<__nv_bfloat16*>(p.normed);
  auto* out_slot = static_cast<__nv_bfloat16*>(p.out_slots[0]);
  __nv_bfloat16* ref;
  CHECK(cudaMalloc(&ref, T * row));
  float* diff;
  CHECK(cudaMalloc(&diff, sizeof(float)));

  // the library's load/store kernel (the baseline of every comparison below)
  auto library_us = [&](int grid, const weave::KernelParams& q) {
    return median_us([&] { weave::ce_reduce_add_norm_kernel<__nv_bfloat16, 2><<<grid, weave::kThreads>>>(q); });
  };
  // largest |a - b| over rank 0's rows [0, S) (NaN, an unwritten element, counts as huge)
  auto max_diff = [&](const __nv_bfloat16* a, const __nv_bfloat16* b) {
    CHECK(cudaMemset(diff, 0, sizeof(float)));
    max_abs_diff<<<256, 256>>>(a, b, S * H, diff);
    float m;
    CHECK(cudaMemcpy(&m, diff, sizeof(float), cudaMemcpyDeviceToHost));
    return m;
  };
  const double bytes = 6.0 * slice;
  auto bytes_per_call = [&] { return bytes; };
  std::printf("H=%lld, slice %lld rows (%.0f MiB per source), HBM traffic %.0f MiB per call\n",
              (long long)H, (long long)S, slice / 1048576.0, bytes / 1048576.0);
  std::printf("%5s | %-10s %8s %8s %9s | %-10s %8s %8s %9s | %7s | %9s | %s\n", "grid",
              "layout", "us", "GB/s", "GB/s/blk", "layout", "us", "GB/s", "GB/s/blk", "speedup",
              "v4/512 us", "max|diff|");
  for (int grid : {4, 8, 16, 32, 64, 132, 264}) {
    weave::KernelParams p4 = p, p41 = p;  // p: 512 threads per row (weave::threads_per_row(8192))
    p4.threads_per_row = 256;
    p4.normed = ref;
    p41.normed = ref;
    CHECK(cudaMemset(normed, 0xff, T * row));
    CHECK(cudaMemset(ref, 0xff, T * row));
    const float t2 = library_us(grid, p);
    const float t4 = median_us([&] {
      weave::ce_reduce_add_norm_kernel<__nv_bfloat16, 4><<<grid, weave::kThreads>>>(p4);
    });
    const float t41 = median_us([&] {
      weave::ce_reduce_add_norm_kernel<__nv_bfloat16, 4><<<grid, weave::kThreads>>>(p41);
    });
    const float d = max_diff(normed, ref);
    std::printf("%5d | %-10s %8.1f %8.0f %9.1f | %-10s %8.1f %8.0f %9.1f | %7.2f | %9.1f | %g\n",
                grid, "v2/tpr512", t2, bytes / t2 / 1e3, bytes / t2 / 1e3 / grid, "v4/tpr256",
                t4, bytes / t4 / 1e3, bytes / t4 / 1e3 / grid, t2 / t4, t41, d);
  }
  std::printf("\nstores per row (v2/tpr512): us at 3 stores (library) / 2 (no out_slot) / "
              "1 (normed only)\n");
  for (int grid : {8, 16, 32, 64, 132}) {
    const float t3 = library_us(grid, p);
    const float t2 = median_us([&] { fewer_stores_kernel<2><<<grid, weave::kThreads>>>(p); });
    const float t1 = median_us([&] { fewer_stores_kernel<1><<<grid, weave::kThreads>>>(p); });
    std::printf("%5d | %8.1f %8.1f %8.1f | time ratio 2/3 stores %.2f, 1/3 stores %.2f "
                "(bytes ratio %.2f, %.2f)\n", grid, t3, t2, t1, t2 / t3, t1 / t3, 5 / 6.0,
                4 / 6.0);
  }
  std::printf("\ndeeper prefetch (cp.async into shared memory), us; max|diff| vs the library\n");
  auto deep = [&](auto kernel, int depth) {
    const int bytes = depth * 3 * 2 * weave::kThreads * 16;
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    for (int grid : {8, 16, 32, 64, 132}) {
      weave::KernelParams d = p;
      d.normed = ref;
      CHECK(cudaMemset(ref, 0xff, T * row));
      const float tl = library_us(grid, p);
      const float td = median_us([&] { kernel<<<grid, weave::kThreads, bytes>>>(d); });
      const float m = max_diff(normed, ref);
      std::printf("depth %d grid %4d | library %8.1f | deep %8.1f | speedup %.2f | %.1f GB/s/blk "
                  "| max|diff| %g\n", depth, grid, tl, td, tl / td, bytes_per_call() / td / 1e3 / grid,
                  m);
    }
  };
  deep(deep_prefetch_kernel<2>, 2);
  deep(deep_prefetch_kernel<3>, 3);
  deep(deep_prefetch_kernel<4>, 4);

  std::printf("\nall through TMA (kIn input stages, kOut output stages), us; max|diff| vs the "
              "library (normed and out_slot)\n");
  auto tma = [&](auto kernel, int n_in, int n_out) {
    const int smem = (n_in * 3 + n_out * 2) * 16384 + n_in * 8;
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    for (int grid : {8, 16, 32, 64, 132}) {
      weave::KernelParams d = p;
      d.normed = ref;
      __nv_bfloat16* out2;
      CHECK(cudaMalloc(&out2, T * row));
      d.out_slots[0] = out2;
      CHECK(cudaMemset(ref, 0xff, T * row));
      CHECK(cudaMemset(out2, 0xff, T * row));
      const float tl = library_us(grid, p);
      const float td = median_us([&] { kernel<<<grid, weave::kThreads, smem>>>(d); });
      const float m = std::max(max_diff(normed, ref), max_diff(out_slot, out2));
      CHECK(cudaFree(out2));
      std::printf("in %d out %d grid %4d | library %8.1f | tma %8.1f | speedup %.2f | %.1f GB/s/blk"
                  " | max|diff| %g\n", n_in, n_out, grid, tl, td, tl / td,
                  bytes_per_call() / td / 1e3 / grid, m);
    }
  };
  tma(all_tma_kernel<2, 2>, 2, 2);
  tma(all_tma_kernel<3, 2>, 3, 2);
  tma(all_tma_kernel<2, 3>, 2, 3);
  tma(all_tma_kernel<4, 1>, 4, 1);
  std::printf("\nthe TMA copy-engine kernel (ce_tma_reduce_add_norm_kernel), us\n");
  for (int grid : {8, 16, 32, 64, 132}) {
    const float tl = library_us(grid, p);
    const float tt = median_us([&] { launch_tma<__nv_bfloat16>(grid, p); });
    std::printf("grid %4d | load/store %8.1f | tma %8.1f | speedup %.2f\n", grid, tl, tt, tl / tt);
  }
  // smaller rows (several per iteration): the same 64 MiB per source, H * rows constant
  for (int64_t h : {4096, 6144}) {
    weave::KernelParams q = p;
    q.hidden = h;
    q.shard = S * H / h;
    q.tokens = 2 * q.shard;
    q.row_end = q.shard;
    q.threads_per_row = weave::threads_per_row(h);
    for (int grid : {8, 16, 32, 132}) {
      const float tl = library_us(grid, q);
      const float tt = median_us([&] { launch_tma<__nv_bfloat16>(grid, q); });
      std::printf("H %5lld (%d rows per iteration) grid %4d | load/store %8.1f | tma %8.1f | "
                  "speedup %.2f\n", (long long)h, weave::kThreads / q.threads_per_row, grid, tl, tt, tl / tt);
    }
  }
  return failures ? 1 : 0;
}

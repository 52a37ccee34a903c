// Single-GPU microbenchmark of the copy-engine algorithm's local kernel (norm_rows over one
// rank's slice: two sources + residual in, new residual + out_slot + normed out), to find what
// bounds it at small grids.  Everything is local memory, so one GPU is enough: the kernel takes
// world = 2 with the peer's rows already "pushed" into in_slot.
//
//   nvcc -std=c++17 -O3 -arch=sm_90a -I ffi ffi/bench/local_norm_bench.cu -o /tmp/lnb && /tmp/lnb
//
// Layouts compared at H = 8192 (bf16):
//   v2/tpr512  what the library runs: 512 threads per row, one row per block in flight, the
//              next row's inputs prefetched into registers (kVec = 2)
//   v4/tpr256  256 threads per row, 4 vectors each: two rows per block in flight, no prefetch
//   v4/tpr512  512 threads per row, 4-vector code (2 used): one row in flight, no prefetch, to
//              separate the prefetch's effect from the second row's
// Output: per grid, median µs of 30 launches (CUDA events), GB/s of HBM traffic (3 reads and
// 3 writes of the slice) and per block, and the largest difference between the two layouts'
// normed rows (they sum the same values; only the sum of squares' order differs).
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

__global__ void fill_random(__nv_bfloat16* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    x[i] = __float2bfloat16((h & 0xffff) / 32768.0f - 1.0f);
  }
}

__global__ void max_abs_diff(const __nv_bfloat16* a, const __nv_bfloat16* b, size_t n,
                             float* out) {
  float m = 0.f;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const float d = fabsf(__bfloat162float(a[i]) - __bfloat162float(b[i]));
    m = d != d ? 1e30f : fmaxf(m, d);  // NaN (an unwritten, poisoned element) counts as huge
  }
  atomicMax(reinterpret_cast<int*>(out), __float_as_int(m));
}

int main() {
  const int64_t H = 8192, S = 4096, T = 2 * S;  // slice of 64 MiB per source
  const size_t row = H * 2, slice = S * row;
  __nv_bfloat16 *partial, *in_slot, *residual, *weight, *new_res, *out_slot, *normed, *ref;
  CHECK(cudaMalloc(&partial, T * row));
  CHECK(cudaMalloc(&in_slot, T * row));
  CHECK(cudaMalloc(&residual, slice));
  CHECK(cudaMalloc(&weight, row));
  CHECK(cudaMalloc(&new_res, slice));
  CHECK(cudaMalloc(&out_slot, T * row));
  CHECK(cudaMalloc(&normed, T * row));
  CHECK(cudaMalloc(&ref, T * row));
  float* diff;
  CHECK(cudaMalloc(&diff, sizeof(float)));
  fill_random<<<1024, 256>>>(partial, T * H, 1);
  fill_random<<<1024, 256>>>(in_slot, T * H, 2);
  fill_random<<<1024, 256>>>(residual, S * H, 3);
  fill_random<<<64, 256>>>(weight, H, 4);
  CHECK(cudaGetLastError());

  weave::KernelParams p{};
  p.partial = partial;
  p.residual = residual;
  p.weight = weight;
  p.normed = normed;
  p.new_residual = new_res;
  p.in_slots[0] = in_slot;
  p.out_slots[0] = out_slot;
  p.tokens = T;
  p.hidden = H;
  p.shard = S;
  p.row_begin = 0;
  p.row_end = S;
  p.rank = 0;
  p.world = 2;
  p.eps = 1e-6f;

  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  auto time_us = [&](auto launch) {
    for (int i = 0; i < 3; ++i) launch();
    std::vector<float> t;
    for (int i = 0; i < 30; ++i) {
      CHECK(cudaEventRecord(e0));
      launch();
      CHECK(cudaEventRecord(e1));
      CHECK(cudaEventSynchronize(e1));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, e0, e1));
      t.push_back(ms * 1e3f);
    }
    CHECK(cudaGetLastError());
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  };
  const double bytes = 6.0 * slice;
  std::printf("H=%lld, slice %lld rows (%.0f MiB per source), HBM traffic %.0f MiB per call\n",
              (long long)H, (long long)S, slice / 1048576.0, bytes / 1048576.0);
  std::printf("%5s | %-10s %8s %8s %9s | %-10s %8s %8s %9s | %7s | %9s | %s\n", "grid",
              "layout", "us", "GB/s", "GB/s/blk", "layout", "us", "GB/s", "GB/s/blk", "speedup",
              "v4/512 us", "max|diff|");
  for (int grid : {4, 8, 16, 32, 64, 132, 264}) {
    weave::KernelParams p2 = p, p4 = p, p41 = p;
    p2.threads_per_row = 512;
    p4.threads_per_row = 256;
    p4.normed = ref;
    p41.threads_per_row = 512;
    p41.normed = ref;
    CHECK(cudaMemset(normed, 0xff, T * row));
    CHECK(cudaMemset(ref, 0xff, T * row));
    const float t2 = time_us([&] {
      weave::ce_reduce_add_norm_kernel<__nv_bfloat16, 2><<<grid, weave::kThreads>>>(p2);
    });
    const float t4 = time_us([&] {
      weave::ce_reduce_add_norm_kernel<__nv_bfloat16, 4><<<grid, weave::kThreads>>>(p4);
    });
    const float t41 = time_us([&] {
      weave::ce_reduce_add_norm_kernel<__nv_bfloat16, 4><<<grid, weave::kThreads>>>(p41);
    });
    CHECK(cudaMemset(diff, 0, sizeof(float)));
    max_abs_diff<<<256, 256>>>(normed, ref, S * H, diff);  // rank 0's rows: [0, S)
    float d;
    CHECK(cudaMemcpy(&d, diff, sizeof(float), cudaMemcpyDeviceToHost));
    std::printf("%5d | %-10s %8.1f %8.0f %9.1f | %-10s %8.1f %8.0f %9.1f | %7.2f | %9.1f | %g\n",
                grid, "v2/tpr512", t2, bytes / t2 / 1e3, bytes / t2 / 1e3 / grid, "v4/tpr256",
                t4, bytes / t4 / 1e3, bytes / t4 / 1e3 / grid, t2 / t4, t41, d);
  }
  return 0;
}

// Helpers shared by the single-GPU benches in experimental/ffi/: error checks, random fill,
// word-for-word comparison, and a median-of-launches timer.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "ce_tma_kernel.cuh"  // and through it the library's kernels (-I ffi)
#include "check/cuda_check.h"  // CHECK (-I ffi)

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

__global__ void count_diff_words(const uint4* a, const uint4* b, size_t n, unsigned long long* out) {
  unsigned long long c = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    const uint4 x = a[i], y = b[i];
    c += (x.x != y.x) | (x.y != y.y) | (x.z != y.z) | (x.w != y.w);
  }
  atomicAdd(out, c);
}

// Median µs of `reps` launches on `stream` (after 3 warm-up launches), timed with events.
template <class Launch>
float median_us(Launch launch, cudaStream_t stream = 0, int reps = 30) {
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) launch();
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    CHECK(cudaEventRecord(e0, stream));
    launch();
    CHECK(cudaEventRecord(e1, stream));
    CHECK(cudaEventSynchronize(e1));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, e0, e1));
    t.push_back(ms * 1e3f);
  }
  CHECK(cudaGetLastError());
  CHECK(cudaEventDestroy(e0));
  CHECK(cudaEventDestroy(e1));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// The copy-engine local kernel's parameters for rank 0 of 2 over a slice of `rows` rows of
// `hidden` bf16 elements: the peer's rows already "pushed" into in_slot, random inputs (seeds
// 1-4), fresh output buffers (normed and out_slot hold both ranks' rows).  Free with
// free_ce_slice.
inline weave::KernelParams ce_slice_params(int64_t hidden, int64_t rows) {
  const size_t row = hidden * 2;
  __nv_bfloat16 *partial, *in_slot, *residual, *weight, *new_res, *out_slot, *normed;
  CHECK(cudaMalloc(&partial, 2 * rows * row));
  CHECK(cudaMalloc(&in_slot, 2 * rows * row));
  CHECK(cudaMalloc(&residual, rows * row));
  CHECK(cudaMalloc(&weight, row));
  CHECK(cudaMalloc(&new_res, rows * row));
  CHECK(cudaMalloc(&out_slot, 2 * rows * row));
  CHECK(cudaMalloc(&normed, 2 * rows * row));
  fill_random<<<1024, 256>>>(partial, 2 * rows * hidden, 1);
  fill_random<<<1024, 256>>>(in_slot, 2 * rows * hidden, 2);
  fill_random<<<1024, 256>>>(residual, rows * hidden, 3);
  fill_random<<<64, 256>>>(weight, hidden, 4);
  CHECK(cudaDeviceSynchronize());
  weave::KernelParams p{};
  p.partial = partial;
  p.residual = residual;
  p.weight = weight;
  p.normed = normed;
  p.new_residual = new_res;
  p.in_slots[0] = in_slot;
  p.out_slots[0] = out_slot;
  p.tokens = 2 * rows;
  p.hidden = hidden;
  p.shard = rows;
  p.row_begin = 0;
  p.row_end = rows;
  p.rank = 0;
  p.world = 2;
  p.eps = 1e-6f;
  p.threads_per_row = weave::threads_per_row(hidden);
  return p;
}

inline void free_ce_slice(const weave::KernelParams& p) {
  const void* buffers[] = {p.partial, p.in_slots[0], p.residual, p.weight, p.new_residual,
                           p.out_slots[0], p.normed};
  for (const void* b : buffers) CHECK(cudaFree(const_cast<void*>(b)));
}

// Fused AllReduce + residual add + RMSNorm, part 2 of 6: phase 1, the reduction and the norm
// of rows, shared by every algorithm.  Each row's sources are summed in rank order 0..world-1
// in fp32 (or by one multimem.ld_reduce), the residual is added, the sum is rounded to the
// dtype (the new residual), and the RMSNorm is computed over the rounded values by one group
// of threads per row with a fixed reduction order.  So any two algorithms given the same
// operands produce bitwise-equal rows, and which rank computes a row does not change it.
// Where the operands come from and where results go is the algorithm's Io type.
#pragma once

#include "fused_common.cuh"

namespace weave {

// Phase 1 walks rows through an Io object, one type per algorithm and transport:
//   kMultimem                       true: sources are summed by mc_sum (multimem.ld_reduce)
//   valid(r)                        false: padding row of my slice (new residual = residual)
//   source(q, r)                    source rank q's partial row r (plain loads)
//   residual(r), new_residual(r)    residual row; where the new residual goes (nullptr: nowhere)
//   emit(r, c, v)                   store normalized 16-byte vector c of row r
//   pad(r, lane, tpr, vpr)          padding row: new residual = residual

// My slice's local rows i in [0, S); shared by the two-shot transports and the copy engine.
struct SliceRows {
  const KernelParams& p;
  int64_t my_rows;
  uint32_t vpr;
  __device__ explicit SliceRows(const KernelParams& kp)
      : p(kp), my_rows(rows_of_owner(kp, kp.rank)), vpr(static_cast<uint32_t>(kp.hidden / 8)) {}
  __device__ bool valid(int64_t i) const { return i < my_rows; }
  // Source `rank` is this rank's own `partial` (never staged); the others were pushed into my
  // in_slot at [q*S + i].
  __device__ const uint4* source(int q, int64_t i) const {
    return q == p.rank ? static_cast<const uint4*>(p.partial) + (p.rank * p.shard + i) * vpr
                       : static_cast<const uint4*>(p.in_slots[p.rank]) + (q * p.shard + i) * vpr;
  }
  __device__ const uint4* residual(int64_t i) const {
    return static_cast<const uint4*>(p.residual) + i * vpr;
  }
  __device__ uint4* new_residual(int64_t i) const {
    return static_cast<uint4*>(p.new_residual) + i * vpr;
  }
  __device__ void pad(int64_t i, int lane, int tpr, uint32_t) const {
    for (uint32_t c = lane; c < vpr; c += tpr) new_residual(i)[c] = residual(i)[c];
  }
  __device__ size_t global_offset(int64_t i, uint32_t c) const {
    return (static_cast<size_t>(p.rank * p.shard + i) * vpr + c) * 16;
  }
};

// Sum of every source's row r in rank order 0..world-1, in fp32, for the vectors
// c = lane + v * tpr: the multimem sum, or plain loads (kVec = 4: one source at a time, two
// would spill).  norm_rows' pipelined path (kVec = 2) does its own loads.
template <typename T, int kVec, class Io>
__device__ __forceinline__ void sum_sources(const Io& io, int world, int64_t r, int lane, int tpr,
                                            uint32_t vpr, float acc[kVec][8]) {
#pragma unroll
  for (int v = 0; v < kVec; ++v)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[v][e] = 0.f;
  if constexpr (Io::kMultimem) {
    io.template mc_sum<T, kVec>(r, lane, tpr, acc);
  } else {
    constexpr int kStep = kVec <= 2 ? 2 : 1;
    for (int q = 0; q < world; q += kStep) {
      const bool two = kStep == 2 && q + 1 < world;
      const uint4* s0 = io.source(q, r);
      const uint4* s1 = two ? io.source(q + 1, r) : s0;
      uint4 t0[kVec], t1[kVec];
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const uint32_t c = lane + v * tpr;
        if (c < vpr) {
          t0[v] = s0[c];
          if (two) t1[v] = s1[c];
        }
      }
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const uint32_t c = lane + v * tpr;
        if (c < vpr) {
          float f[8];
          Vec<T>::to_float(t0[v], f);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[v][e] += f[e];
          if (two) {
            Vec<T>::to_float(t1[v], f);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[v][e] += f[e];
          }
        }
      }
    }
  }
}

// Sum over the threads of one row group (tpr threads = tpr/32 whole warps), in a fixed order.
// Called by every thread of the block the same number of times.
__device__ __forceinline__ float group_sum(float v, float* smem, int tpr) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // smem reuse across iterations
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int wpg = tpr / 32, first = (threadIdx.x / tpr) * wpg;
  float s = 0.f;
  for (int w = 0; w < wpg; ++w) s += smem[first + w];
  return s;
}

// The first two sources' and the residual's vectors of one row, loaded ahead of their use.
template <int kVec>
struct RowInputs {
  uint4 s0[kVec], s1[kVec], res[kVec];
};

// Issues the loads of row r's first two sources and residual (nothing for an absent row).
template <int kVec, class Io>
__device__ __forceinline__ void load_row_inputs(const Io& io, bool present, int64_t r, int lane,
                                                int tpr, uint32_t vpr, RowInputs<kVec>& in) {
  if (!present) return;
  const uint4 *s0 = io.source(0, r), *s1 = io.source(1, r), *res = io.residual(r);
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    const uint32_t c = lane + v * tpr;
    if (c < vpr) {
      in.s0[v] = s0[c];
      in.s1[v] = s1[c];
      in.res[v] = res[c];
    }
  }
}

// Phase 1 over rows r = b + k * nb < nrows of this block (a group of tpr threads per row):
// sum the sources, add the residual, round (= new residual), RMSNorm, emit.
//
// kVec = 2 with plain loads (peer transport, one-shot, copy engine) is software-pipelined: the
// next row's first two sources and residual are loaded before this row's reduction and stores,
// so their HBM latency overlaps this row's work (phase stamps, 2 x H200, 2026-11-22: without it
// a block spent ~2.7 µs per 16 KiB row, about one load round trip plus its stores).  kVec = 4
// and multimem keep one row at a time: the prefetch would spill.
template <typename T, int kVec, class Io>
__device__ __forceinline__ void norm_rows(const KernelParams& p, const Io& io, int64_t nrows,
                                          float* smem) {
  const int tpr = p.threads_per_row;
  const int groups = kThreads / tpr, g = threadIdx.x / tpr, lane = threadIdx.x % tpr;
  const uint32_t vpr = static_cast<uint32_t>(p.hidden / 8);
  const int nb = gridDim.x, b = blockIdx.x;
  const int64_t nk = b < nrows ? (nrows - b + nb - 1) / nb : 0;
  const uint4* weight = static_cast<const uint4*>(p.weight);
  constexpr bool kPipelined = kVec <= 2 && !Io::kMultimem;
  auto present = [&](int64_t k) { return k < nk && io.valid(b + k * nb); };
  RowInputs<kVec> cur;
  if constexpr (kPipelined) load_row_inputs(io, present(g), b + g * nb, lane, tpr, vpr, cur);
  for (int64_t k0 = 0; k0 < nk; k0 += groups) {
    const int64_t k = k0 + g;
    const int64_t r = b + k * nb;
    const bool in = k < nk;
    const bool row = in && io.valid(r);
    RowInputs<kVec> next;
    if constexpr (kPipelined)
      load_row_inputs(io, present(k + groups), r + groups * nb, lane, tpr, vpr, next);
    uint4 x[kVec];
    float sumsq = 0.f;
    if (row) {
      float acc[kVec][8];
      if constexpr (kPipelined) {
        // sources 0 and 1 from the prefetched vectors, the rest (world > 2) loaded here; the
        // adds stay in rank order
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          if (lane + v * tpr < vpr) {
            float f[8];
            Vec<T>::to_float(cur.s0[v], acc[v]);
            Vec<T>::to_float(cur.s1[v], f);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[v][e] += f[e];
          }
        }
        for (int q = 2; q < p.world; ++q) {
          const uint4* s = io.source(q, r);
#pragma unroll
          for (int v = 0; v < kVec; ++v) {
            if (lane + v * tpr < vpr) {
              float f[8];
              Vec<T>::to_float(s[lane + v * tpr], f);
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[v][e] += f[e];
            }
          }
        }
      } else {
        sum_sources<T, kVec>(io, p.world, r, lane, tpr, vpr, acc);
      }
      const uint4* res_row = io.residual(r);
      uint4* new_res = io.new_residual(r);
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const uint32_t c = lane + v * tpr;
        if (c < vpr) {
          float f[8];
          Vec<T>::to_float(kPipelined ? cur.res[v] : res_row[c], f);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[v][e] += f[e];
          x[v] = Vec<T>::from_float(acc[v]);  // the new residual, rounded to T
          if (new_res != nullptr) new_res[c] = x[v];
          Vec<T>::to_float(x[v], f);
#pragma unroll
          for (int e = 0; e < 8; ++e) sumsq += f[e] * f[e];
        }
      }
    } else if (in) {
      io.pad(r, lane, tpr, vpr);
    }
    const float total = group_sum(sumsq, smem, tpr);
    if (row) {
      const float rstd = rsqrtf(total / static_cast<float>(p.hidden) + p.eps);
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const uint32_t c = lane + v * tpr;
        if (c < vpr) {
          float xf[8], wf[8];
          Vec<T>::to_float(x[v], xf);
          Vec<T>::to_float(weight[c], wf);  // 16 KiB or less, read by every row: cached
#pragma unroll
          for (int e = 0; e < 8; ++e) xf[e] = wf[e] * (xf[e] * rstd);
          io.emit(r, c, Vec<T>::from_float(xf));
        }
      }
    }
    if constexpr (kPipelined) cur = next;
  }
}

}  // namespace weave

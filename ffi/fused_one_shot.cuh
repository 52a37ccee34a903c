// Fused AllReduce + residual add + RMSNorm, part 6 of 6: the one-shot algorithm (algo 2).
//
// Protocol (peer transport only, T <= Tos): for small messages, one barrier per call.
// Block b handles global rows r with r % nb == b:
//   push   my partial row r -> every peer's os_slot[parity][p][r], and, for rows of my slice,
//          my residual row -> every peer's os_slot[parity][world][r]   (NVLink stores)
//   barrier 4 (paired by block, like the two-shot kernel)
//   reduce every row r of block b (not only my slice): sources in order 0..world-1 (mine from
//          `partial`), + residual (mine or staged), round, RMSNorm; write normed[r] locally,
//          and new_residual for the rows of my slice.  Every rank computes every row with the
//          same operands in the same order, so `normed` is bitwise identical across ranks.
// parity = epoch & 1 (epoch = one-shot calls so far, advanced by the last block to finish).
// Reuse without a second barrier: I write into a peer's parity-x buffer in call k+2 only after
// my kernel k+1 passed barrier 4, i.e. after every peer's kernel k+1 started, i.e. after every
// peer's kernel k (the last reader of parity x) finished.
// Memory orders: barrier 4 (fused_common.cuh) orders every peer's pushes of this call before
// my reads of the staged rows.  The epoch is advanced by the last block to finish: each block
// fences its writes at system scope before counting itself, so that block holds every other
// block's writes when it records the epoch.
#pragma once

#include "fused_two_shot.cuh"  // PeerTransport: the barrier's (empty) alias fence

namespace weave {

// One-shot algorithm (algo 2): staging layout of os_slot (uint4 units), parity x:
//   [x][q][r]      source q's partial row r        q in [0, world)
//   [x][world][r]  the residual of global row r (pushed by its owner)
// Rank `owner`'s staging block of parity x, as seen from this device.
__device__ __forceinline__ uint4* os_stage(const KernelParams& p, int owner, int parity) {
  return static_cast<uint4*>(p.os_slots[owner]) +
         static_cast<size_t>(parity) * (p.world + 1) * p.os_rows * (p.hidden / 8);
}

struct OneShotIo {
  static constexpr bool kMultimem = false;
  const KernelParams& p;
  uint32_t vpr;
  const uint4* stage;  // my os_slot, this call's parity
  __device__ OneShotIo(const KernelParams& kp, int parity)
      : p(kp), vpr(static_cast<uint32_t>(kp.hidden / 8)), stage(os_stage(kp, kp.rank, parity)) {}
  __device__ bool valid(int64_t) const { return true; }
  __device__ bool mine(int64_t r) const { return r / p.shard == p.rank; }
  __device__ const uint4* source(int q, int64_t r) const {
    return q == p.rank ? static_cast<const uint4*>(p.partial) + r * vpr
                       : stage + (q * p.os_rows + r) * vpr;
  }
  __device__ const uint4* residual(int64_t r) const {
    return mine(r) ? static_cast<const uint4*>(p.residual) + (r - p.rank * p.shard) * vpr
                   : stage + (p.world * p.os_rows + r) * vpr;
  }
  __device__ uint4* new_residual(int64_t r) const {
    return mine(r) ? static_cast<uint4*>(p.new_residual) + (r - p.rank * p.shard) * vpr : nullptr;
  }
  __device__ void pad(int64_t, int, int, uint32_t) const {}
  __device__ void emit(int64_t r, uint32_t c, uint4 v) const {
    static_cast<uint4*>(p.normed)[r * vpr + c] = v;
  }
};

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads, 1)
    oneshot_reduce_add_norm_kernel(const __grid_constant__ KernelParams p) {
  __shared__ float smem[kThreads / 32];
  __shared__ uint32_t s_epoch;
  __shared__ int s_last;
  const uint32_t epoch = call_epoch(p.epochs + kEpochOneShot, &s_epoch);
  const int parity = static_cast<int>(epoch & 1u);
  const uint32_t vpr = static_cast<uint32_t>(p.hidden / 8);
  const int nb = gridDim.x, b = blockIdx.x;
  stamp(p, 0);
  // push: rows r % nb == b of my partial (and of my residual, for rows of my slice)
  const int64_t nr = b < p.tokens ? (p.tokens - b + nb - 1) / nb : 0;
  const int64_t total = nr * vpr;
  for (int64_t idx = threadIdx.x; idx < total; idx += kThreads) {
    const int64_t k = idx / vpr, c = idx - k * vpr;
    const int64_t r = b + k * nb;
    const bool mine = r / p.shard == p.rank;
    const uint4 v = static_cast<const uint4*>(p.partial)[r * vpr + c];
    uint4 res;
    if (mine) res = static_cast<const uint4*>(p.residual)[(r - p.rank * p.shard) * vpr + c];
    for (int k2 = 1; k2 < p.world; ++k2) {
      int q = p.rank + k2;
      q = q >= p.world ? q - p.world : q;
      uint4* peer = os_stage(p, q, parity);
      peer[(p.rank * p.os_rows + r) * vpr + c] = v;
      if (mine) peer[(p.world * p.os_rows + r) * vpr + c] = res;
    }
  }
  stamp(p, 1);  // push issued
  block_barrier<PeerTransport>(p, kBarOneShot, b, epoch);
  stamp(p, 2);  // barrier passed
  const OneShotIo io(p, parity);
  norm_rows<T, kVec>(p, io, p.tokens, smem);
  // padding rows of my slice (only when T % world != 0): new residual = residual
  const int64_t first_pad = p.tokens - p.rank * p.shard;
  for (int64_t i = first_pad < 0 ? 0 : first_pad; i < p.shard; ++i) {
    if (i % nb != b) continue;
    for (uint32_t c = threadIdx.x; c < vpr; c += kThreads)
      static_cast<uint4*>(p.new_residual)[i * vpr + c] =
          static_cast<const uint4*>(p.residual)[i * vpr + c];
  }
  stamp(p, 3);  // reduce + norm done
  if (last_block_to_finish(p.epochs + kCountOneShot, &s_last))
    finish_call(p, kCountOneShot, kEpochOneShot, epoch);
}

}  // namespace weave

// Fused AllReduce + residual add + RMSNorm, part 5 of 6: the copy-engine algorithm (algo 1;
// peer transport, one process driving every GPU).
//
// Protocol.  The two-shot data flow with the NVLink traffic on the copy engines and NO device-side
// waiting, so only the local reduce uses SMs and nothing spins.  Ranks meet on the host
// (handlers.cu) and order their streams with cross-device CUDA events.  The slice rows [0, S) are
// cut into C chunks (C = the call's `ce_chunks`, at most kMaxCeChunks and S; the same cut on every
// rank), and three streams of rank p pipeline them: the library's push stream, the call's stream s,
// the library's pull stream.  Call n on rank p:
//   0. record ev_ce_begin on s; the push stream waits for it (inputs ready, previous call done)
//   1. push stream, per chunk c: cudaMemcpyPeerAsync per peer q: my partial rows of chunk c of
//      q's slice -> q's in_slot [p*S + i]; record ev_pushed[c]
//   2. host rendezvous 2 ("pushed"): every rank recorded call n's ev_pushed[*]
//   3. s, per chunk c: wait for every peer's ev_pushed[c]; ce kernel (any grid, blocks
//      independent) on chunk c's rows of my slice from LOCAL memory; the normalized rows go to
//      my out_slot and to `normed`; record ev_reduced[c]
//   4. host rendezvous 3 ("reduced"): every rank recorded call n's ev_reduced[*]
//   5. pull stream, per chunk c: wait for every peer's ev_reduced[c], then cudaMemcpyPeerAsync
//      per peer q: q's out_slot rows of chunk c of q's slice -> my normed (pull); record
//      ev_pulled; s waits for ev_pulled and for my last ev_pushed (so the call ends on s)
// So push c+1, kernel c and pull c-1 can run at once.  With C = 1 this is the unchunked sequence:
// push, kernel, pull.
//
// Reuse.  q pushes into my in_slot (call n+1) after its step 0 of call n+1, i.e. after its s waited
// for its pulls of call n, which waited for my kernel n (every chunk): my kernel n has finished
// reading in_slot.  My kernel n+1 writes my out_slot after every peer's ev_pushed of n+1, recorded
// after that peer's step 0 of n+1, i.e. after its pulls of call n.  An event is re-recorded only
// before or after a rendezvous that every peer reaches only after its waits on the previous record
// (ev_pushed: re-recorded before rendezvous 2 of n+1, waited on before rendezvous 3 of n;
// ev_reduced: re-recorded after rendezvous 2 of n+1, waited on before it), so one set of events per
// rank suffices.  Against the kernels' algorithms the stream order of the calls on each rank
// suffices: each one ends only once its accesses to peers' buffers are done.
//
// Bounded waits.  A rendezvous times out after the workspace's timeout: the handler records {rank,
// peer, rendezvous 2 or 3, block -1, call} in the error record and returns an error (nothing
// traps); the rendezvous is then marked broken and every later copy-engine call fails at once.
// Under CUDA graph capture the handler refuses (cross-device events cannot be captured).
//
// Memory orders: no device-side flags.  Every cross-GPU dependency is a CUDA event recorded after
// the producing copy or kernel and waited on by the consuming stream, which orders the memory
// accesses as stream order does.
#pragma once

#include "fused_norm_rows.cuh"

namespace weave {

// The kernel between the push and pull copies (protocol above).  Normalized rows of my slice
// go to my out_slot (peers pull them from there) and straight into `normed`.
// Rows of one chunk of my slice, [row_begin, row_end): index i of norm_rows is slice row
// base + i.  Every method forwards the shifted index to SliceRows.
struct CopyEngineIo : SliceRows {
  static constexpr bool kMultimem = false;
  int64_t base;
  __device__ explicit CopyEngineIo(const KernelParams& kp) : SliceRows(kp), base(kp.row_begin) {}
  __device__ bool valid(int64_t i) const { return SliceRows::valid(base + i); }
  __device__ const uint4* source(int q, int64_t i) const { return SliceRows::source(q, base + i); }
  __device__ const uint4* residual(int64_t i) const { return SliceRows::residual(base + i); }
  __device__ uint4* new_residual(int64_t i) const { return SliceRows::new_residual(base + i); }
  __device__ void pad(int64_t i, int lane, int tpr, uint32_t vpr) const {
    SliceRows::pad(base + i, lane, tpr, vpr);
  }
  __device__ void emit(int64_t i, uint32_t c, uint4 v) const {
    const size_t off = global_offset(base + i, c);
    *reinterpret_cast<uint4*>(static_cast<char*>(p.out_slots[p.rank]) + off) = v;
    *reinterpret_cast<uint4*>(static_cast<char*>(p.normed) + off) = v;
  }
};

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads, 1)
    ce_reduce_add_norm_kernel(const __grid_constant__ KernelParams p) {
  __shared__ float smem[kThreads / 32];
  // peers' pushes of this chunk were ordered before this kernel by events (COPY-ENGINE ALGORITHM)
  const CopyEngineIo io(p);
  norm_rows<T, kVec>(p, io, p.row_end - p.row_begin, smem);
}

}  // namespace weave

// Fused AllReduce + residual add + RMSNorm across tensor-parallel ranks, one kernel.
//
//   normed (T, H) = RMSNorm(sum_r partial_r + residual) * weight      replicated on every rank
//   new_residual (S, H) = round_to_dtype(sum_r partial_r + residual)   sharded by token
//
// S = ceil(T / world) rows per rank; rank r owns global rows [r*S, min((r+1)*S, T)).  Rows of
// the local shard past T (only when T % world != 0) are padding: new_residual = residual there.
//
// ============================================================================================
// PROTOCOL
// ============================================================================================
// Buffers (per rank, allocated once by the workspace, outside XLA's allocator; see
// workspace.cu for sizes; Smax = ceil(Tmax / world)):
//   in_slot   (world * Smax, H)              PeerTransport: staging rows [src*S + i] = source
//                                            rank src's partial row for MY row i (pushed by src)
//                                            MultimemTransport: my own partial at global rows
//   out_slot  (world * Smax, H) x num_slots  every rank stores the normalized rows it owns into
//                                            the out_slot of every OTHER rank at their global
//                                            row (its own go straight to `normed`; into its own
//                                            out_slot only with multimem)
//   os_slot   2 parities x (world + 1) x Tos rows x H   one-shot staging (see ONE-SHOT below)
//   pads      uint32 [5 barriers][128 blocks][8 source ranks]   signal words, one 32-bit word per
//                                            (barrier, block, source): no flags packed in bytes
//   epochs    uint32 [130]                   local only: [b] calls block b of the two-shot
//                                            kernel has taken part in; [128] one-shot calls,
//                                            [129] its block-arrival counter
// Peers reach in_slot, out_slot and pads through peer pointers (one process, peer access
// enabled) or CUDA IPC mappings (one process per GPU).  MultimemTransport reads in_slot and
// writes out_slot through their multicast addresses instead; signals always use unicast words.
//
// Work split.  Every rank launches the same grid (nb blocks, same `ctas` attribute).  Row i of
// owner q's slice (i in [0, rows_q)) belongs to block i % nb.  Block b on rank p does exactly
// the work that block b on the other ranks depends on, so barriers pair blocks by index:
//   phase 0  publish:   rows of EVERY owner q assigned to b.  Peer: push partial row q*S+i into
//                       q's in_slot row [p*S + i] (NVLink stores: posted, no round trip); my
//                       own rows are not staged, phase 1 reads them from `partial`.
//                       Multimem: copy partial row q*S+i into my in_slot at the same row.
//   barrier 0 ("start"): my published rows for block b are visible; wait for every peer's b
//   phase 1  reduce:    rows of MY slice assigned to b, several rows at once (a group of
//                       threads per row): sum the world staged rows in source order 0..world-1
//                       from LOCAL memory (Peer; source p is `partial` itself) or one
//                       multimem.ld_reduce (Multimem), in fp32;
//                       + residual, round (= new residual), RMSNorm, store the normalized row
//                       into every peer's out_slot and my `normed` (NVLink stores) or every
//                       out_slot (one multimem.st)
//   barrier 1 ("end"):  my stores into every out_slot for block b are done AND I have finished
//                       reading the staged rows for block b; wait for every peer's block b
//   phase 2  copy-out:  rows of every other owner (multimem: every owner) assigned to b:
//                       local out_slot -> normed
// Hopper (kTma): phases 0 and 2 move their rows with TMA bulk copies (global -> shared ->
// global, one issuing thread per block); the issuer waits for its bulk stores to complete and
// fences the async proxy (fence.proxy.async.global) before the block's __syncthreads that
// precedes the barrier's release, and fences the async proxy after an acquire before bulk-
// reading rows that peers wrote.  Phase 1 is the same in both variants.
// Diagnostics: with the workspace's stamps on, thread 0 of each block records %globaltimer at
// each phase boundary into host-mapped memory (weave_jax.fused.phases).
// Each row is computed by exactly one rank and broadcast, so all ranks hold bitwise-identical
// `normed`; the fixed summation order makes the result independent of timing.
//
// Why two barriers suffice with single-buffered slots.  Passing barrier 1 of call k on my block
// b means every peer's block b has finished writing my in_slot and out_slot rows of partition b
// and reading nothing of mine after that.  My next kernel only starts after ALL my blocks passed
// barrier 1 (stream order), so by then every peer finished every access to my buffers for call
// k, whatever the partition of call k+1 (token counts may change between calls).  Peers PUSH
// into my in_slot in phase 0 of call k+1, before barrier 0.  That is safe because I read my in_slot only in phase 1 of call k, which
// precedes my barrier-1 signal of call k, which precedes (in the peer's program order, via its
// acquire) its phase 0 of call k+1.  Likewise peers store into my out_slot in phase 1 of k+1,
// after barrier 0 of k+1, which I signal only after my copy-out of call k (earlier phase of the
// same kernel, or `done` ordered before the next kernel by events).
//
// Epochs.  Block b signals value e = epochs[b] + 1 and waits until every source's word reaches e
// (wrap-safe signed compare).  epochs[b] is read and advanced INSIDE the kernel by block b, so
// replaying a captured CUDA graph (XLA command buffer) keeps working: the host never supplies
// the epoch.  Every rank makes the same sequence of calls with the same grid, so epochs[b] is
// equal on all ranks at each call.  A peer can be at most one barrier ahead: it cannot pass
// barrier 1 of call k before I signal it, so a word never runs two values ahead of its waiter.
//
// Memory orders.
//   signal:  __syncthreads() (all threads of the block have issued their data stores/loads),
//            then thread t does st.release.sys on the word of (barrier, b, my rank) in rank t's
//            pads.  bar.sync orders the block's accesses before thread t's release at CTA
//            scope; release is cumulative, so the data is visible at system scope (NVLink peers)
//            before the flag.  MultimemTransport adds `fence.proxy.alias` before the release and
//            after the acquire, because the multicast and unicast addresses of a slot are
//            different virtual aliases of the same memory (unicast copy-in, multicast reads).
//   wait:    thread t spins with ld.acquire.sys on the word of (barrier, b, rank t) in my pads,
//            then __syncthreads() hands the acquired ordering to the whole block (the acquire
//            also invalidates this SM's L1, so staged rows are not read stale).  Barrier 0
//            orders peers' pushes before my reads; barrier 1 orders peers' out_slot stores
//            before my copy-out, and my staged-row reads before peers' next-call pushes.
//   epochs:  plain global load/store by thread 0; only this device touches them, stream order
//            separates calls.
//
// Bounded waits.  Spins read %globaltimer; past `timeout_ns` the first timing-out thread (claim
// word in device memory, atomicCAS) writes {rank, peer waited on, barrier, block, epoch} into
// host-mapped memory, fences at system scope, and executes __trap().  The host reads that
// record after XLA reports the launch failure and raises an error naming rank and barrier.
// ============================================================================================
// COPY-ENGINE ALGORITHM (algo 1, peer transport, one process driving every GPU): the two-shot
// data flow with the NVLink traffic on the copy engines and NO device-side waiting, so only the
// local reduce uses SMs and nothing spins.  Ranks meet on the host (handlers.cu) and order
// their streams with cross-device CUDA events.  The slice rows [0, S) are cut into C chunks
// (C = the call's `ce_chunks`, at most kMaxCeChunks and S; the same cut on every rank), and
// three streams of rank p pipeline them: the library's push stream, the call's stream s, the
// library's pull stream.  Call n on rank p:
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
// So push c+1, kernel c and pull c-1 can run at once.  With C = 1 this is the unchunked
// sequence: push, kernel, pull.
// DIRECT variant (algorithm "copy_engine_direct" at world 2, either local kernel; at world > 2
// it pulls as above): before rendezvous 2 each rank publishes its call's `normed` pointer.  In
// step 3 the kernel's out_slot store goes to the peer's `normed` instead (same row offset,
// NVLink bulk stores), and step 5 is only: s waits for the peer's ev_reduced[C-1] (its every
// chunk) and for my last ev_pushed.  No pull copies, no out_slot traffic.  My kernel writes the
// peer's `normed` only after the peer's ev_pushed[c], recorded after the peer's step 0, i.e.
// once the peer's stream reached the call that owns that buffer; the peer's call ends only
// after my kernel's last chunk.  Reuse of in_slot is as below with "its pulls" read as "its
// wait for my ev_reduced".
// Reuse (pull variant).  q pushes into my in_slot (call n+1) after its step 0 of call n+1, i.e.
// after its s waited for its pulls of call n, which waited for my kernel n (every chunk): my
// kernel n has finished reading in_slot.  My kernel n+1 writes my out_slot after every peer's ev_pushed of
// n+1, recorded after that peer's step 0 of n+1, i.e. after its pulls of call n.  An event is
// re-recorded only before or after a rendezvous that every peer reaches only after its waits
// on the previous record (ev_pushed: re-recorded before rendezvous 2 of n+1, waited on before
// rendezvous 3 of n; ev_reduced: re-recorded after rendezvous 2 of n+1, waited on before it),
// so one set of events per rank suffices.  Against the kernels' algorithms the stream order of
// the calls on each rank suffices: each one ends only once its accesses to peers' buffers are
// done.
// A rendezvous times out after the workspace's timeout: the handler records {rank, peer,
// rendezvous 2 or 3, block -1, call} in the error record and returns an error (nothing traps);
// the rendezvous is then marked broken and every later copy-engine call fails at once.
// Under CUDA graph capture the handler refuses (cross-device events cannot be captured).
//
// ONE-SHOT ALGORITHM (algo 2, peer only, T <= Tos): for small messages, one barrier per call.
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
// Calls of different algorithms use disjoint barrier words and epochs; the buffers they share
// (in_slot, out_slot) are ordered by the reuse arguments above, because every kernel ends
// only after the barrier that marks the end of its accesses.
// ============================================================================================
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

namespace weave {

constexpr int kMaxRanks = 8;
// Paired kernels (two-shot, one-shot): pads hold 128 blocks.  Pairs make progress without
// co-residency as long as blocks are dispatched in index order on every rank (each rank's
// lowest waiting block is paired with a resident one).  128 <= the 132 SMs of H100/H200.
constexpr int kMaxCtas = 128;
constexpr int kMaxCeCtas = 1024;   // the copy-engine kernel's blocks are not paired
constexpr int kMaxCeChunks = 32;   // copy-engine pipeline depth (events per rank and kind)
constexpr int kMinCtas = 2;
constexpr int kThreads = 512;
constexpr int kMaxVecPerThread = 4;                      // 16-byte vectors per thread per row
constexpr int kMaxHidden = kThreads * kMaxVecPerThread * 8;  // 16384 elements
constexpr int kOneShotBytes = 1 << 20;                   // Tos = this / (H * 2) rows, >= 1

// 16-byte vectors per thread per row in phase 1: 2 while a row fits in kThreads * 2 vectors
// (H <= 8192), else kMaxVecPerThread.
inline int vec_per_thread(int64_t hidden) {
  return hidden / 8 <= kThreads * 2 ? 2 : kMaxVecPerThread;
}

// KernelParams::threads_per_row for hidden size H: enough that each thread holds at most
// vec_per_thread(H) vectors.
inline int threads_per_row(int64_t hidden) {
  int tpr = 32;
  while (tpr * vec_per_thread(hidden) < hidden / 8) tpr *= 2;
  return tpr;
}
// barrier ids (first index of the pads)
// 2 and 3 name the copy-engine algorithm's host rendezvous (error records only; their pad words
// stay unused)
constexpr int kBarStart = 0, kBarEnd = 1, kBarCePushed = 2, kBarCeReduced = 3, kBarOneShot = 4;
constexpr int kNumBarriers = 5;
constexpr int kPadWords = kNumBarriers * kMaxCtas * kMaxRanks;
// epochs[] words
constexpr int kEpochOneShot = kMaxCtas, kCountOneShot = kMaxCtas + 1;
constexpr int kEpochWords = kMaxCtas + 2;
// Phase stamps (diagnostics, off unless the workspace turns them on): per block, kStamps words.
constexpr int kStamps = 8;

// Host-mapped (cudaHostAllocMapped) error record, one per device.
struct ErrorRecord {
  int32_t code;     // 0 none, 1 barrier timeout
  int32_t rank;     // rank that timed out
  int32_t peer;     // rank it was waiting for
  int32_t barrier;  // kBar*
  int32_t block;    // block index
  uint32_t epoch;   // value it waited for
};

struct KernelParams {
  const void* partial;    // (T, H) local, XLA buffer
  const void* residual;   // (S, H) local, XLA buffer
  const void* weight;     // (H,)
  void* normed;           // (T, H) XLA output (start's own output for start/done)
  void* new_residual;     // (S, H) XLA output
  void* in_slots[kMaxRanks];    // rank q's in_slot as seen from this device (staging rows)
  void* out_slots[kMaxRanks];   // rank q's out_slot (the slot chosen for this call)
  void* os_slots[kMaxRanks];    // rank q's one-shot staging (both parities)
  void* in_mc;                  // multicast address of in_slot (MultimemTransport only)
  void* out_mc;                 // multicast address of out_slot (MultimemTransport only)
  uint32_t* pads[kMaxRanks];    // rank q's signal pads
  uint32_t* epochs;             // local [kEpochWords]
  int32_t* claim;               // local device word: first timeout claims the record
  ErrorRecord* err;             // host-mapped record (device alias)
  int64_t tokens;               // T
  int64_t hidden;               // H, multiple of 8
  int64_t shard;                // S = ceil(T / world)
  int64_t os_rows;              // Tos: rows of one one-shot staging block
  int64_t row_begin;            // copy-engine kernel: rows [row_begin, row_end) of my slice
  int64_t row_end;              //   (one chunk of the call; the other kernels ignore them)
  int32_t threads_per_row;      // power of 2 in [32, 512] with H / 8 <= threads_per_row * kVec
  int32_t rank;
  int32_t world;
  float eps;
  uint64_t timeout_ns;
  uint64_t* stamps;             // host-mapped [kMaxCtas][kStamps] %globaltimer stamps, or nullptr
};

// ------------------------------------------------------------------ small device helpers

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void st_release_sys(uint32_t* addr, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(addr), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* addr) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(addr) : "memory");
  return v;
}

// Diagnostics: when stamps are on, thread 0 of each block records %globaltimer once the whole
// block has reached point k of the call (the last call overwrites the earlier ones).  `stamps`
// is the same for every thread, so the __syncthreads is reached by all or none.
__device__ __forceinline__ void stamp(const KernelParams& p, int k) {
  if (p.stamps == nullptr) return;
  __syncthreads();
  if (threadIdx.x == 0) p.stamps[blockIdx.x * kStamps + k] = global_timer_ns();
}

// Rows of owner q's slice: [q*S, min((q+1)*S, T)), possibly empty.  Host and device.
__host__ __device__ __forceinline__ int64_t rows_of_owner(const KernelParams& p, int q) {
  const int64_t n = p.tokens - q * p.shard;
  return n < 0 ? 0 : (n > p.shard ? p.shard : n);
}

__device__ __forceinline__ int pad_index(int barrier, int block, int src) {
  return (barrier * kMaxCtas + block) * kMaxRanks + src;
}

static __device__ __noinline__ void report_timeout(const KernelParams& p, int barrier, int peer,
                                            uint32_t epoch) {
  if (atomicCAS(p.claim, 0, 1) == 0) {
    volatile ErrorRecord* e = p.err;
    e->rank = p.rank;
    e->peer = peer;
    e->barrier = barrier;
    e->block = blockIdx.x;
    e->epoch = epoch;
    __threadfence_system();  // fields before code
    e->code = 1;
    __threadfence_system();
  }
  __trap();
}

// Bounded spin until `word` (written by rank `peer`) reaches `epoch` (wrap-safe compare).
__device__ __forceinline__ void wait_word(const KernelParams& p, const uint32_t* word, uint32_t epoch,
                                          int barrier, int peer) {
  const uint64_t t0 = global_timer_ns();
  uint32_t spins = 0;
  while (static_cast<int32_t>(ld_acquire_sys(word) - epoch) < 0) {
    if ((++spins & 255u) == 0 && global_timer_ns() - t0 > p.timeout_ns) {
      report_timeout(p, barrier, peer, epoch);
    }
  }
}

// Barrier `id` among block `slot_block` of every rank: thread t < world signals rank t and
// waits for rank t; see PROTOCOL above.  Called by every thread of the block.
template <class Transport>
__device__ __forceinline__ void block_barrier(const KernelParams& p, int id, int slot_block,
                                              uint32_t epoch) {
  __syncthreads();
  const int t = threadIdx.x;
  if (t < p.world) {
    Transport::alias_fence();
    st_release_sys(p.pads[t] + pad_index(id, slot_block, p.rank), epoch);
    wait_word(p, p.pads[p.rank] + pad_index(id, slot_block, t), epoch, id, t);
    Transport::alias_fence();
  }
  __syncthreads();
}

// The epoch of this call: the value in `word` + 1, read by thread 0 and shared with the block.
__device__ __forceinline__ uint32_t call_epoch(const uint32_t* word, uint32_t* s_epoch) {
  if (threadIdx.x == 0) *s_epoch = *word + 1;
  __syncthreads();
  return *s_epoch;
}

// Last block of the one-shot kernel: reset the arrival counter, record the call's epoch.
__device__ __forceinline__ void finish_call(const KernelParams& p, int count_word, int epoch_word,
                                            uint32_t epoch) {
  if (threadIdx.x == 0) {
    p.epochs[count_word] = 0;
    p.epochs[epoch_word] = epoch;
  }
}

// Grid-wide "everyone is done" for the one-shot kernel: each block fences its writes at system
// scope and counts itself; returns true in every thread of the last block to arrive, which
// then holds the acquire side of every block's writes.
__device__ __forceinline__ bool last_block_to_finish(uint32_t* counter, int* s_flag) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    *s_flag = atomicAdd(counter, 1u) == gridDim.x - 1;
    if (*s_flag) __threadfence_system();
  }
  __syncthreads();
  return *s_flag;
}

// ------------------------------------------------------------------ dtype traits

template <typename T>
struct Vec;  // 8 elements in one 16-byte uint4

template <>
struct Vec<__nv_bfloat16> {
  __device__ static __forceinline__ void to_float(const uint4& v, float f[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ static __forceinline__ uint4 from_float(const float f[8]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __nv_bfloat162 h = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);  // round to nearest even
      w[i] = *reinterpret_cast<uint32_t*>(&h);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct Vec<__half> {
  __device__ static __forceinline__ void to_float(const uint4& v, float f[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 x = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  __device__ static __forceinline__ uint4 from_float(const float f[8]) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
      w[i] = *reinterpret_cast<uint32_t*>(&h);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

// ------------------------------------------------------------------ row copies

// Where owner q's rows go: local row i of q's slice is copied from src + i*row and to dst + i*row.
struct RowSpan {
  const char* src;
  char* dst;
};

// Copies rows of every owner q != skip assigned to this block (local rows i with i % nb == b),
// with 16-byte accesses.  spans(q) gives the RowSpan of owner q.  (row, vector) pairs are flattened
// so small H still fills the block, and kUnroll independent loads are in flight per thread
// before the stores.
template <class Spans>
__device__ __forceinline__ void copy_rows(const KernelParams& p, Spans spans, int skip = -1) {
  const uint32_t vpr = static_cast<uint32_t>(p.hidden / 8);
  const int64_t row_bytes = p.hidden * 2;
  const int nb = gridDim.x, b = blockIdx.x;
  for (int q = 0; q < p.world; ++q) {
    if (q == skip) continue;
    const int64_t rows_q = rows_of_owner(p, q);
    if (b >= rows_q) continue;
    const uint32_t nr = static_cast<uint32_t>((rows_q - b + nb - 1) / nb);
    const uint32_t total = nr * vpr;
    const RowSpan span = spans(q);
    constexpr int kUnroll = 8;
    for (uint32_t base = threadIdx.x; base < total; base += kThreads * kUnroll) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint32_t idx = base + u * kThreads;
        if (idx < total) {
          const uint32_t k = idx / vpr, c = idx - k * vpr;
          const size_t off = static_cast<size_t>(b + static_cast<int64_t>(k) * nb) * row_bytes + c * 16;
          v[u] = *reinterpret_cast<const uint4*>(span.src + off);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint32_t idx = base + u * kThreads;
        if (idx < total) {
          const uint32_t k = idx / vpr, c = idx - k * vpr;
          const size_t off = static_cast<size_t>(b + static_cast<int64_t>(k) * nb) * row_bytes + c * 16;
          *reinterpret_cast<uint4*>(span.dst + off) = v[u];
        }
      }
    }
  }
}

// ------------------------------------------------------------------ TMA bulk row copies
// The two-shot kernel's kTma variant (sm_90+): phases 0 and 2 as Hopper bulk copies
// (cp.async.bulk) driven by one thread per block through kTmaStages shared-memory stages:
// global -> shared (completion on an mbarrier), shared -> global (bulk group).  Why: phase
// stamps on 2 x H200 (2026-11-22) showed the copy phases bound per SM by 16-byte LSU stores
// (~25 GB/s per SM), where bulk copies moved ~50 GB/s per SM.  Phase 1's stores stay 16-byte
// stores: sending its rows through shared memory and bulk stores measured slower (ffi/NOTES.md).
constexpr int kTmaStages = 8;
constexpr int kTmaChunk = 16384;                                   // bytes per stage
constexpr int kTmaSmemBytes = kTmaStages * kTmaChunk + kTmaStages * 8;  // + mbarriers

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define WEAVE_NO_TMA 1  // sm_80 build: the TMA path traps (launch refuses it before that)
#endif

__device__ __forceinline__ void tma_init(uint64_t* mbar) {
#ifdef WEAVE_NO_TMA
  __trap();
#else
  if (threadIdx.x == 0) {
    for (int s = 0; s < kTmaStages; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(mbar + s)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
#endif
  __syncthreads();
}

__device__ __forceinline__ void tma_load(void* smem, const void* src, uint32_t bytes, uint64_t* mbar) {
#ifndef WEAVE_NO_TMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
               ::"r"(smem_u32(mbar)), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(smem_u32(smem)), "l"(src), "r"(bytes), "r"(smem_u32(mbar)) : "memory");
#endif
}

__device__ __forceinline__ void tma_wait(uint64_t* mbar, uint32_t parity) {
#ifndef WEAVE_NO_TMA
  uint32_t done = 0;
  while (!done) {
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 " selp.u32 %0, 1, 0, p;\n}"
                 : "=r"(done) : "r"(smem_u32(mbar)), "r"(parity) : "memory");
  }
#endif
}

__device__ __forceinline__ void tma_store(void* dst, const void* smem, uint32_t bytes) {
#ifndef WEAVE_NO_TMA
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
               ::"l"(dst), "r"(smem_u32(smem)), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
#endif
}

// Thread 0 (the issuer): every bulk store of this thread has been performed; fenced so that the
// generic-proxy release of the next barrier (after a __syncthreads) covers them.
__device__ __forceinline__ void tma_drain_stores() {
#ifndef WEAVE_NO_TMA
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  asm volatile("fence.proxy.async.global;" ::: "memory");
#endif
}


// Rows of every owner q != skip assigned to this block, in (owner, row, chunk) order.
template <class Spans>
struct RowChunks {
  const KernelParams& p;
  Spans spans;
  int skip, q = -1;
  int64_t i = 0, off = 0, rows_q = 0, row_bytes;
  __device__ RowChunks(const KernelParams& kp, Spans sp, int sk)
      : p(kp), spans(sp), skip(sk), row_bytes(kp.hidden * 2) { next_owner(); }
  __device__ void next_owner() {
    for (++q; q < p.world; ++q) {
      if (q == skip) continue;
      rows_q = rows_of_owner(p, q);
      if (blockIdx.x < rows_q) break;
    }
    i = blockIdx.x;
    off = 0;
  }
  __device__ bool valid() const { return q < p.world; }
  __device__ void next() {
    off += kTmaChunk;
    if (off < row_bytes) return;
    off = 0;
    i += gridDim.x;
    if (i >= rows_q) next_owner();
  }
  __device__ uint32_t bytes() const {
    return static_cast<uint32_t>(row_bytes - off < kTmaChunk ? row_bytes - off : kTmaChunk);
  }
  __device__ const char* src() const { return spans(q).src + i * row_bytes + off; }
  __device__ char* dst() const { return spans(q).dst + i * row_bytes + off; }
};

// copy_rows through TMA.  `uses` counts the stage fills of earlier calls in this kernel (the
// mbarrier phases continue across calls); thread 0 drives, every thread must call it.
// Stores become visible to peers at the next block_barrier's release: thread 0 waits for the
// bulk group to complete and fences the async proxy before the block synchronizes.
template <class Spans>
__device__ void tma_copy_rows(const KernelParams& p, Spans spans, char* buf, uint64_t* mbar,
                              uint32_t& uses, int skip = -1) {
#ifndef WEAVE_NO_TMA
  if (threadIdx.x == 0) {
    asm volatile("fence.proxy.async.global;" ::: "memory");  // generic writes before TMA reads
    RowChunks<Spans> ld(p, spans, skip), st(p, spans, skip);
    uint32_t n_ld = 0, n_st = 0;
    for (; n_ld < kTmaStages && ld.valid(); ++n_ld, ld.next()) {
      const uint32_t s = (uses + n_ld) % kTmaStages;
      tma_load(buf + s * kTmaChunk, ld.src(), ld.bytes(), mbar + s);
    }
    while (n_st < n_ld) {
      const uint32_t g = uses + n_st, s = g % kTmaStages;
      tma_wait(mbar + s, (g / kTmaStages) & 1u);
      tma_store(st.dst(), buf + s * kTmaChunk, st.bytes());
      st.next();
      ++n_st;
      // refill the stage of the store issued one step earlier once it has been read
      if (n_st >= 2 && ld.valid()) {
        asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
        const uint32_t s2 = (uses + n_ld) % kTmaStages;
        tma_load(buf + s2 * kTmaChunk, ld.src(), ld.bytes(), mbar + s2);
        ld.next();
        ++n_ld;
      }
    }
    tma_drain_stores();
    uses += n_ld;
  }
#endif
  __syncthreads();
}

// ------------------------------------------------------------------ phase 1: reduce + norm

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

// ------------------------------------------------------------------ transports (two-shot)

// NVLink stores through peer pointers: push partial rows to their owner, reduce from local
// memory, push normalized rows to every rank.  Every cross-GPU access is a posted store.
struct PeerTransport {
  // My own normalized rows go straight into `normed`, so phase 2 copies only the peers' rows.
  static constexpr bool kOwnRowsInNormed = true;
  // phase 0: my partial row q*S+i -> owner q's in_slot row [rank*S + i], q != rank
  __device__ static __forceinline__ void publish(const KernelParams& p) {
    const int64_t row_bytes = p.hidden * 2;
    copy_rows(p, [&](int q) {
      return RowSpan{static_cast<const char*>(p.partial) + q * p.shard * row_bytes,
                     static_cast<char*>(p.in_slots[q]) + p.rank * p.shard * row_bytes};
    }, /*skip=*/p.rank);
  }
  struct Io : SliceRows {
    static constexpr bool kMultimem = false;
    using SliceRows::SliceRows;
    // Where rank q receives my row i: q's out_slot, or for me, `normed`.
    __device__ char* dest(int q, int64_t i) const {
      void* base = q == p.rank ? p.normed : p.out_slots[q];
      return static_cast<char*>(base) + global_offset(i, 0);
    }
    // Store one normalized vector at every rank, starting with the next rank so that ranks
    // spread their traffic over the links.
    __device__ void emit(int64_t i, uint32_t c, uint4 v) const {
      for (int k = 0; k < p.world; ++k) {
        int q = p.rank + 1 + k;
        q = q >= p.world ? q - p.world : q;
        reinterpret_cast<uint4*>(dest(q, i))[c] = v;
      }
    }
  };
  __device__ static __forceinline__ void alias_fence() {}
};

// NVLS multicast: one ld_reduce over the multicast address sums all ranks in the switch; one
// multimem.st writes every rank.  Only sm_90+; built for sm_90a.  The reduction order is the
// switch's, identical for all ranks because each row is still computed by one rank only.
struct MultimemTransport {
  static constexpr bool kOwnRowsInNormed = false;  // multimem.st writes every out_slot
  // phase 0: my partial -> my own in_slot at the same (global) rows
  __device__ static __forceinline__ void publish(const KernelParams& p) {
    const int64_t row_bytes = p.hidden * 2;
    copy_rows(p, [&](int q) {
      return RowSpan{static_cast<const char*>(p.partial) + q * p.shard * row_bytes,
                     static_cast<char*>(p.in_slots[p.rank]) + q * p.shard * row_bytes};
    });
  }
  struct Io : SliceRows {
    static constexpr bool kMultimem = true;
    using SliceRows::SliceRows;
    template <typename T, int kVec>
    __device__ void mc_sum(int64_t i, int lane, int tpr, float acc[kVec][8]) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      const uint4* row = static_cast<const uint4*>(p.in_mc) + (p.rank * p.shard + i) * vpr;
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        const uint32_t c = lane + v * tpr;
        if (c < vpr) {
          const uint4* addr = row + c;
          uint4 r;
          if constexpr (std::is_same_v<T, __nv_bfloat16>) {
            asm volatile("multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.bf16x2 {%0,%1,%2,%3}, [%4];"
                         : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                         : "l"(addr)
                         : "memory");
          } else {
            asm volatile("multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.f16x2 {%0,%1,%2,%3}, [%4];"
                         : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                         : "l"(addr)
                         : "memory");
          }
          Vec<T>::to_float(r, acc[v]);
        }
      }
#else
      __trap();
#endif
    }
    __device__ const uint4* source(int, int64_t) const { return nullptr; }  // unused
    __device__ void emit(int64_t i, uint32_t c, uint4 v) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      char* addr = static_cast<char*>(p.out_mc) + global_offset(i, c);
      asm volatile("multimem.st.relaxed.sys.global.v4.f32 [%0], {%1,%2,%3,%4};" ::"l"(addr),
                   "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                   : "memory");
#else
      __trap();
#endif
    }
  };
  __device__ static __forceinline__ void alias_fence() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.alias;" ::: "memory");
#endif
  }
};

// ------------------------------------------------------------------ the kernels

// Two-shot (algo 0).  kVec: 16-byte vectors per thread per row in phase 1 (2 when
// H <= 8192, else 4); fewer vectors per thread leave registers for a row's loads (two sources,
// the residual and the weight) to be in flight at once, without spills.
// kTma (PeerTransport, sm_90+; what the handlers launch there): phases 0 and 2 through
// tma_copy_rows, launched with kTmaSmemBytes of dynamic shared memory.
template <typename T, class Transport, int kVec, bool kTma = false>
__global__ void __launch_bounds__(kThreads, 1)
    fused_reduce_add_norm_kernel(const __grid_constant__ KernelParams p) {
  __shared__ float smem[kThreads / 32];
  __shared__ uint32_t s_epoch;
  extern __shared__ __align__(128) char tma_buf[];
  uint64_t* mbar = reinterpret_cast<uint64_t*>(tma_buf + kTmaStages * kTmaChunk);
  uint32_t uses = 0;
  if constexpr (kTma) tma_init(mbar);
  const uint32_t epoch = call_epoch(p.epochs + blockIdx.x, &s_epoch);
  stamp(p, 0);
  const int64_t row_bytes = p.hidden * 2;

  if constexpr (kTma) {  // phase 0
    tma_copy_rows(p, [&](int q) {
      return RowSpan{static_cast<const char*>(p.partial) + q * p.shard * row_bytes,
                     static_cast<char*>(p.in_slots[q]) + p.rank * p.shard * row_bytes};
    }, tma_buf, mbar, uses, /*skip=*/p.rank);
  } else {
    Transport::publish(p);
  }
  stamp(p, 1);  // phase 0 done
  block_barrier<Transport>(p, kBarStart, blockIdx.x, epoch);
  stamp(p, 2);  // barrier 0 passed
  const typename Transport::Io io(p);
  norm_rows<T, kVec>(p, io, p.shard, smem);  // phase 1
  stamp(p, 3);  // phase 1 done
  block_barrier<Transport>(p, kBarEnd, blockIdx.x, epoch);
  stamp(p, 4);  // barrier 1 passed

  // phase 2: my out_slot -> normed (rows of every owner assigned to block b; peer transport:
  // my own rows are in normed already)
  auto out_spans = [&](int q) {
    return RowSpan{static_cast<const char*>(p.out_slots[p.rank]) + q * p.shard * row_bytes,
                   static_cast<char*>(p.normed) + q * p.shard * row_bytes};
  };
  const int skip_owner = Transport::kOwnRowsInNormed ? p.rank : -1;
  if constexpr (kTma) tma_copy_rows(p, out_spans, tma_buf, mbar, uses, skip_owner);
  else copy_rows(p, out_spans, skip_owner);
  stamp(p, 5);  // copy-out done
  if (threadIdx.x == 0) p.epochs[blockIdx.x] = epoch;
}

// Copy-engine algorithm (algo 1): the kernel between the push and pull copies (see COPY-ENGINE
// ALGORITHM above).  Normalized rows of my slice go to my out_slot (peers pull them from
// there) and straight into `normed`.
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

// The copy-engine kernel with every byte moved by the TMA (sm_90+), warp-specialized.  Why: on
// one H200 (ffi/NOTES.md, "What bounds a row per SM") the load/store kernel above moves ~57 GB/s
// of traffic per block at small grids; bulk copies through shared memory move more, but only if
// no thread of the computing warps waits for a copy to be issued or to finish reading.
//   - kG rows at a time, one per row group of norm_rows' mapping (kG = 1 for 4096 < H <= 8192,
//     2 for 2048 < H <= 4096): the block's rows r_k = b + k*nb, iteration j holds k = j*kG + g.
//   - One producer warp (one thread of it) issues every bulk copy: iteration j's rows (two
//     sources and the residual each) into stage j % kCeStages (mbarrier full[s], transaction
//     bytes), and once the consumers are done with them, their stores from the same stage
//     (normed row to `normed` and to out_slot -- my out_slot, or in the DIRECT variant the
//     peer's `normed` -- and the new residual).  A stage is refilled only after its stores
//     have finished reading it (cp.async.bulk.wait_group.read).
//   - The kThreads consumer threads compute in place: the new residual over source 0's vectors,
//     the normed row over source 1's, then fence to the async proxy, a named barrier among
//     themselves, and one arrival on done[s].  They never wait on a copy's issue.
//   - A padding row of my slice (past my_rows) loads only its residual and stores it back as the
//     new residual; its group computes nothing.
// Every row is computed by norm_rows' thread group (kThreads / kG threads, two vectors each, the
// same warp-then-group reduction, the same sums in the same order), so its results are bitwise
// equal to every other algorithm's.  World 2 only.  Everything the consumers compute with is
// known at compile time but the row length: a version with the group size at run time was
// 1.26x slower at 16 blocks (ffi/NOTES.md), and with 4+ rows per iteration the one issuing
// thread falls behind (0.47-0.79x the load/store kernel at H = 1024-2048), so smaller rows keep
// the load/store kernel.
constexpr int kCeStages = 4;
constexpr int kCeTmaThreads = kThreads + 32;  // 16 consumer warps + 1 producer warp
constexpr int kCeTmaSmemMax = 226 * 1024;     // 227 KiB per block on sm_90, less static smem

// Rows per iteration of the TMA kernel for hidden size H (0: the kernel does not take H).
__host__ __device__ __forceinline__ int ce_tma_rows(int64_t hidden) {
  return hidden > 4 * kThreads * 2 && hidden <= 8 * kThreads * 2 ? 1
         : hidden > 2 * kThreads * 2 && hidden <= 4 * kThreads * 2 ? 2 : 0;
}

__host__ __device__ __forceinline__ int64_t ce_tma_smem_bytes(int world, int64_t hidden) {
  // 128: the mbarriers; a stage holds ce_tma_rows rows of world + 1 slots
  return 128 + (world + 1) * kCeStages * ce_tma_rows(hidden) * hidden * 2;
}

template <typename T, int kG>
__global__ void __launch_bounds__(kCeTmaThreads, 1)
    ce_tma_reduce_add_norm_kernel(const __grid_constant__ KernelParams p) {
#ifdef WEAVE_NO_TMA
  __trap();
#else
  constexpr int V = 2, kSrcs = 3;  // sources 0 and 1 (rank order), then the residual
  constexpr int kTpr = kThreads / kG, kWpg = kTpr / 32;
  extern __shared__ __align__(128) unsigned char ce_smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(ce_smem);  // [kCeStages] the rows' loads landed
  uint64_t* done = full + kCeStages;                      // [kCeStages] the consumers are done
  const uint32_t vpr = static_cast<uint32_t>(p.hidden / 8), row_bytes = vpr * 16;
  uint4* stages = reinterpret_cast<uint4*>(ce_smem + 128);  // [kCeStages][kG][kSrcs][vpr]
  __shared__ float red[kThreads / 32];
  const CopyEngineIo io(p);
  const int t = threadIdx.x, nb = gridDim.x, b = blockIdx.x;
  const int64_t nrows = p.row_end - p.row_begin;
  const int64_t nk = b < nrows ? (nrows - b + nb - 1) / nb : 0;  // my rows
  const int64_t nj = (nk + kG - 1) / kG;                           // my iterations
  auto slots = [&](int64_t j, int g) { return stages + ((j % kCeStages) * kG + g) * kSrcs * vpr; };
  if (t == 0) {
    for (int s = 0; s < kCeStages; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(full + s)) : "memory");
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(done + s)) : "memory");
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();  // the last block-wide barrier: the producer warp leaves the consumers' loop

  if (t >= kThreads) {  // producer warp
    if (t != kThreads) return;
    auto load = [&](int64_t j) {
      if (j >= nj) return;
      uint64_t* m = full + j % kCeStages;
      uint32_t bytes = 0;
#pragma unroll
      for (int g = 0; g < kG; ++g)
        if (j * kG + g < nk) bytes += io.valid(b + (j * kG + g) * nb) ? kSrcs * row_bytes : row_bytes;
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                   ::"r"(smem_u32(m)), "r"(bytes) : "memory");
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        if (j * kG + g >= nk) break;
        const int64_t r = b + (j * kG + g) * nb;
        uint4* st = slots(j, g);
        const bool row = io.valid(r);
        const uint4* src[kSrcs] = {io.residual(r), io.source(0, r), io.source(1, r)};
        uint4* dst[kSrcs] = {st + 2 * vpr, st, st + vpr};
        for (int q = 0; q < (row ? kSrcs : 1); ++q)  // a padding row: its residual into slot 0
          asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], "
                       "[%1], %2, [%3];" ::"r"(smem_u32(row ? dst[q] : st)), "l"(src[q]),
                       "r"(row_bytes), "r"(smem_u32(m)) : "memory");
      }
    };
    auto store = [&](void* dst, const uint4* from) {  // one bulk group per iteration
      asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                   ::"l"(dst), "r"(smem_u32(from)), "r"(row_bytes) : "memory");
    };
    for (int64_t j = 0; j < kCeStages; ++j) load(j);
    for (int64_t j = 0; j < nj; ++j) {
      tma_wait(done + j % kCeStages, (j / kCeStages) & 1);
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        if (j * kG + g >= nk) break;
        const int64_t r = b + (j * kG + g) * nb;
        const uint4* st = slots(j, g);
        if (io.valid(r)) {
          const size_t off = io.global_offset(io.base + r, 0);
          store(static_cast<char*>(p.normed) + off, st + vpr);
          store(static_cast<char*>(p.out_slots[p.rank]) + off, st + vpr);
        }
        store(io.new_residual(r), st);
      }
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
      if (j >= 1) {  // iteration j-1's stores have read its stage: refill it
        asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
        load(j - 1 + kCeStages);
      }
    }
    // the pull copies after this kernel read out_slot (direct: the peer's call ends after
    // this kernel): the bulk stores must be complete and visible when the kernel ends
    tma_drain_stores();
    return;
  }

  const int g = t / kTpr, lane = t % kTpr, warp = t / 32;
  const uint4* weight = static_cast<const uint4*>(p.weight);
  float wf[V][8];  // the weight, converted once: the consumers' instructions bound a row
#pragma unroll
  for (int v = 0; v < V; ++v)
    if (lane + v * kTpr < vpr) Vec<T>::to_float(weight[lane + v * kTpr], wf[v]);
  for (int64_t j = 0; j < nj; ++j) {
    tma_wait(full + j % kCeStages, (j / kCeStages) & 1);
    const int64_t k = j * kG + g;
    const bool row = k < nk && io.valid(b + k * nb);  // uniform across my group
    uint4* st = slots(j, g);
    float xf[V][8];  // the new residual as rounded to T, in fp32
    float sumsq = 0.f;
    if (row) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const uint32_t c = lane + v * kTpr;
        if (c < vpr) {
          float acc[8], f[8];
          Vec<T>::to_float(st[c], acc);  // sources in rank order, then the residual
#pragma unroll
          for (int q = 1; q < kSrcs; ++q) {
            Vec<T>::to_float(st[q * vpr + c], f);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] += f[e];
          }
          const uint4 x = Vec<T>::from_float(acc);  // the new residual, rounded to T
          st[c] = x;
          Vec<T>::to_float(x, xf[v]);
#pragma unroll
          for (int e = 0; e < 8; ++e) sumsq += xf[v][e] * xf[v][e];
        }
      }
    }
    // group_sum's order; no barrier before writing `red`: every consumer read the last
    // iteration's `red` before the end-of-iteration barrier below
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sumsq += __shfl_xor_sync(0xffffffffu, sumsq, o);
    if (t % 32 == 0) red[warp] = sumsq;
    asm volatile("bar.sync 1, %0;" ::"n"(kThreads) : "memory");
    if (row) {
      float total = 0.f;
#pragma unroll
      for (int i = 0; i < kWpg; ++i) total += red[g * kWpg + i];
      const float rstd = rsqrtf(total / static_cast<float>(p.hidden) + p.eps);
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const uint32_t c = lane + v * kTpr;
        if (c < vpr) {
          float y[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) y[e] = wf[v][e] * (xf[v][e] * rstd);
          st[vpr + c] = Vec<T>::from_float(y);
        }
      }
      // this row's generic smem writes before the async proxy's reads (the producer's stores)
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    }
    asm volatile("bar.sync 1, %0;" ::"n"(kThreads) : "memory");
    if (t == 0)
      asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];"
                   ::"r"(smem_u32(done + j % kCeStages)) : "memory");
  }
#endif
}

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

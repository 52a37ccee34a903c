// Fused AllReduce + residual add + RMSNorm, part 1 of 6: what every algorithm shares -- the
// buffers, the kernel parameters, the paired-block barrier (memory orders, bounded waits, the
// error record), the 16-byte vector types and the row copies.  The algorithms' own protocols
// open their files: fused_two_shot.cuh, fused_one_shot.cuh, fused_copy_engine.cuh.
//
//   normed (T, H) = RMSNorm(sum_r partial_r + residual) * weight      replicated on every rank
//   new_residual (S, H) = round_to_dtype(sum_r partial_r + residual)   sharded by token
//
// S = ceil(T / world) rows per rank; rank r owns global rows [r*S, min((r+1)*S, T)).  Rows of
// the local shard past T (only when T % world != 0) are padding: new_residual = residual there.
//
// Buffers (per rank, allocated once by the workspace, outside XLA's allocator; see
// workspace.cu for sizes; Smax = ceil(Tmax / world)):
//   in_slot   (world * Smax, H)              PeerTransport: staging rows [src*S + i] = source
//                                            rank src's partial row for MY row i (pushed by src)
//                                            MultimemTransport: my own partial at global rows
//   out_slot  (world * Smax, H) x num_slots  every rank stores the normalized rows it owns into
//                                            the out_slot of every OTHER rank at their global
//                                            row (its own go straight to `normed`; into its own
//                                            out_slot only with multimem)
//   os_slot   2 parities x (world + 1) x Tos rows x H   one-shot staging (fused_one_shot.cuh)
//   pads      uint32 [5 barriers][128 blocks][8 source ranks]   signal words, one 32-bit word per
//                                            (barrier, block, source): no flags packed in bytes
//   epochs    uint32 [130]                   local only: [b] calls block b of the two-shot
//                                            kernel has taken part in; [128] one-shot calls,
//                                            [129] its block-arrival counter
// Peers reach in_slot, out_slot and pads through peer pointers (one process, peer access
// enabled) or CUDA IPC mappings (one process per GPU).  MultimemTransport reads in_slot and
// writes out_slot through their multicast addresses instead; signals always use unicast words.
//
// Barriers.  A paired kernel (two-shot, one-shot) meets its peers per block: barrier `id` of
// block b is the word pads[id][b][src] on every rank; rank p's block b writes word
// (id, b, p) in every rank's pads and waits for words (id, b, q) in its own.  The value written
// is the call's epoch (the block's or the kernel's count of calls so far + 1), so words are
// never reset.  A peer can be at most one barrier ahead of its waiter, so a wrap-safe signed
// compare against the epoch suffices.
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
//            also invalidates this SM's L1, so staged rows are not read stale).  What each
//            barrier orders is in its algorithm's file.
//   epochs:  plain global load/store by thread 0; only this device touches them, stream order
//            separates calls.
//
// Bounded waits.  Spins read %globaltimer; past `timeout_ns` the first timing-out thread (claim
// word in device memory, atomicCAS) writes {rank, peer waited on, barrier, block, epoch} into
// host-mapped memory, fences at system scope, and executes __trap().  The host reads that
// record after XLA reports the launch failure and raises an error naming rank and barrier.
//
// Diagnostics: with the workspace's stamps on, thread 0 of each block records %globaltimer at
// each phase boundary into host-mapped memory (weave_jax.fused.phases).
//
// Calls of different algorithms use disjoint barrier words and epochs; the buffers they share
// (in_slot, out_slot) are ordered by the reuse arguments in the algorithms' files, because every
// kernel ends only after the barrier (or event) that marks the end of its accesses.
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

}  // namespace weave

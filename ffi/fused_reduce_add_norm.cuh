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
//                                            the out_slot of EVERY rank (itself included), at
//                                            their global row
//   res_slot  (Smax, H) x num_slots          split (start/done) mode only: new residual
//   pads      uint32 [2 barriers][32 blocks][8 source ranks]   signal words, one 32-bit word per
//                                            (barrier, block, source): no flags packed in bytes
//   epochs    uint32 [32]                    local only: calls block b has taken part in
// Peers reach in_slot, out_slot and pads through peer pointers (one process, peer access
// enabled) or CUDA IPC mappings (one process per GPU).  MultimemTransport reads in_slot and
// writes out_slot through their multicast addresses instead; signals always use unicast words.
//
// Work split.  Every rank launches the same grid (nb blocks, same `ctas` attribute).  Row i of
// owner q's slice (i in [0, rows_q)) belongs to block i % nb.  Block b on rank p does exactly
// the work that block b on the other ranks depends on, so barriers pair blocks by index:
//   phase 0  publish:   rows of EVERY owner q assigned to b.  Peer: push partial row q*S+i into
//                       q's in_slot row [p*S + i] (NVLink stores: posted, no round trip).
//                       Multimem: copy partial row q*S+i into my in_slot at the same row.
//   barrier 0 ("start"): my published rows for block b are visible; wait for every peer's b
//   phase 1  reduce:    rows of MY slice assigned to b, several rows at once (a group of
//                       threads per row): sum the world staged rows in source order 0..world-1
//                       from LOCAL memory (Peer) or one multimem.ld_reduce (Multimem), in fp32;
//                       + residual, round (= new residual), RMSNorm, store the normalized row
//                       into out_slot of every rank (NVLink stores or one multimem.st)
//   barrier 1 ("end"):  my stores into every out_slot for block b are done AND I have finished
//                       reading the staged rows for block b; wait for every peer's block b
//   phase 2  copy-out:  rows of every owner assigned to b: local out_slot -> normed
//                       (skipped in split mode: `done` copies the whole slot on XLA's stream)
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
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

namespace weave {

constexpr int kMaxRanks = 8;
constexpr int kMaxCtas = 32;
constexpr int kMinCtas = 2;
constexpr int kThreads = 512;
constexpr int kMaxVecPerThread = 4;                      // 16-byte vectors per thread per row
constexpr int kMaxHidden = kThreads * kMaxVecPerThread * 8;  // 16384 elements
constexpr int kNumBarriers = 2;
constexpr int kPadWords = kNumBarriers * kMaxCtas * kMaxRanks;

// Host-mapped (cudaHostAllocMapped) error record, one per device.
struct ErrorRecord {
  int32_t code;     // 0 none, 1 barrier timeout
  int32_t rank;     // rank that timed out
  int32_t peer;     // rank it was waiting for
  int32_t barrier;  // 0 start, 1 end
  int32_t block;    // block index
  uint32_t epoch;   // value it waited for
};

struct KernelParams {
  const void* partial;    // (T, H) local, XLA buffer
  const void* residual;   // (S, H) local, XLA buffer
  const void* weight;     // (H,)
  void* normed;           // (T, H) XLA output; nullptr in split mode (no copy-out phase)
  void* new_residual;     // (S, H) XLA output, or the workspace res_slot in split mode
  void* in_slots[kMaxRanks];    // rank q's in_slot as seen from this device (staging rows)
  void* out_slots[kMaxRanks];   // rank q's out_slot (the slot chosen for this call)
  void* in_mc;                  // multicast address of in_slot (MultimemTransport only)
  void* out_mc;                 // multicast address of out_slot (MultimemTransport only)
  uint32_t* pads[kMaxRanks];    // rank q's signal pads
  uint32_t* epochs;             // local [kMaxCtas]
  int32_t* claim;               // local device word: first timeout claims the record
  ErrorRecord* err;             // host-mapped record (device alias)
  int64_t tokens;               // T
  int64_t hidden;               // H, multiple of 8
  int64_t shard;                // S = ceil(T / world)
  int32_t threads_per_row;      // power of 2 in [32, 512] with H / 8 <= threads_per_row * 4
  int32_t rank;
  int32_t world;
  float eps;
  uint64_t timeout_ns;
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

// Barrier `id` among block blockIdx.x of every rank; see PROTOCOL above.
template <class Transport>
__device__ __forceinline__ void block_barrier(const KernelParams& p, int id, uint32_t epoch) {
  __syncthreads();
  const int t = threadIdx.x;
  if (t < p.world) {
    Transport::alias_fence();
    st_release_sys(p.pads[t] + pad_index(id, blockIdx.x, p.rank), epoch);
    const uint32_t* word = p.pads[p.rank] + pad_index(id, blockIdx.x, t);
    const uint64_t t0 = global_timer_ns();
    uint32_t spins = 0;
    while (static_cast<int32_t>(ld_acquire_sys(word) - epoch) < 0) {
      if ((++spins & 255u) == 0 && global_timer_ns() - t0 > p.timeout_ns) {
        report_timeout(p, id, t, epoch);
      }
    }
    Transport::alias_fence();
  }
  __syncthreads();
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

// Copies rows of every owner q assigned to this block (local rows i with i % nb == b), with
// 16-byte accesses.  spans(q) gives the RowSpan of owner q.  (row, vector) pairs are flattened
// so small H still fills the block, and kUnroll independent loads are in flight per thread
// before the stores.
template <class Spans>
__device__ __forceinline__ void copy_rows(const KernelParams& p, Spans spans) {
  const uint32_t vpr = static_cast<uint32_t>(p.hidden / 8);
  const int64_t row_bytes = p.hidden * 2;
  const int nb = gridDim.x, b = blockIdx.x;
  for (int q = 0; q < p.world; ++q) {
    int64_t rows_q = p.tokens - q * p.shard;
    rows_q = rows_q < 0 ? 0 : (rows_q > p.shard ? p.shard : rows_q);
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

// ------------------------------------------------------------------ transports

// NVLink stores through peer pointers: push partial rows to their owner, reduce from local
// memory, push normalized rows to every rank.  Every cross-GPU access is a posted store.
struct PeerTransport {
  // phase 0: my partial row q*S+i -> owner q's in_slot row [rank*S + i]
  __device__ static __forceinline__ void publish(const KernelParams& p) {
    const int64_t row_bytes = p.hidden * 2;
    copy_rows(p, [&](int q) {
      return RowSpan{static_cast<const char*>(p.partial) + q * p.shard * row_bytes,
                     static_cast<char*>(p.in_slots[q]) + p.rank * p.shard * row_bytes};
    });
  }
  // Sum of the staged rows [src*S + i], src = 0..world-1 in that order, for the vectors
  // c = lane + v * tpr of my row i.
  template <typename T>
  __device__ static __forceinline__ void reduce(const KernelParams& p, int64_t i, int lane,
                                                float acc[kMaxVecPerThread][8]) {
    const uint32_t vpr = static_cast<uint32_t>(p.hidden / 8);
    const uint4* staged = static_cast<const uint4*>(p.in_slots[p.rank]);
#pragma unroll
    for (int v = 0; v < kMaxVecPerThread; ++v)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[v][e] = 0.f;
    for (int q = 0; q < p.world; ++q) {
      const uint4* row = staged + (q * p.shard + i) * vpr;
      uint4 t[kMaxVecPerThread];
#pragma unroll
      for (int v = 0; v < kMaxVecPerThread; ++v) {  // all loads of this source in flight
        const uint32_t c = lane + v * p.threads_per_row;
        if (c < vpr) t[v] = row[c];
      }
#pragma unroll
      for (int v = 0; v < kMaxVecPerThread; ++v) {
        const uint32_t c = lane + v * p.threads_per_row;
        if (c < vpr) {
          float f[8];
          Vec<T>::to_float(t[v], f);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[v][e] += f[e];
        }
      }
    }
  }
  // Store one normalized vector (global byte offset `off`) into every rank's out_slot,
  // starting with the next rank so that ranks spread their traffic over the links.
  __device__ static __forceinline__ void broadcast(const KernelParams& p, size_t off, uint4 v) {
    for (int k = 0; k < p.world; ++k) {
      int q = p.rank + 1 + k;
      q = q >= p.world ? q - p.world : q;
      *reinterpret_cast<uint4*>(static_cast<char*>(p.out_slots[q]) + off) = v;
    }
  }
  __device__ static __forceinline__ void alias_fence() {}
};

// NVLS multicast: one ld_reduce over the multicast address sums all ranks in the switch; one
// multimem.st writes every rank.  Only sm_90+; built for sm_90a.  The reduction order is the
// switch's, identical for all ranks because each row is still computed by one rank only.
struct MultimemTransport {
  // phase 0: my partial -> my own in_slot at the same (global) rows
  __device__ static __forceinline__ void publish(const KernelParams& p) {
    const int64_t row_bytes = p.hidden * 2;
    copy_rows(p, [&](int q) {
      return RowSpan{static_cast<const char*>(p.partial) + q * p.shard * row_bytes,
                     static_cast<char*>(p.in_slots[p.rank]) + q * p.shard * row_bytes};
    });
  }
  template <typename T>
  __device__ static __forceinline__ void reduce(const KernelParams& p, int64_t i, int lane,
                                                float acc[kMaxVecPerThread][8]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const uint32_t vpr = static_cast<uint32_t>(p.hidden / 8);
    const uint4* row = static_cast<const uint4*>(p.in_mc) + (p.rank * p.shard + i) * vpr;
#pragma unroll
    for (int v = 0; v < kMaxVecPerThread; ++v) {
      const uint32_t c = lane + v * p.threads_per_row;
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
  __device__ static __forceinline__ void broadcast(const KernelParams& p, size_t off, uint4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    char* addr = static_cast<char*>(p.out_mc) + off;
    asm volatile("multimem.st.relaxed.sys.global.v4.f32 [%0], {%1,%2,%3,%4};" ::"l"(addr),
                 "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
#else
    __trap();
#endif
  }
  __device__ static __forceinline__ void alias_fence() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.alias;" ::: "memory");
#endif
  }
};

// ------------------------------------------------------------------ the kernel

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

template <typename T, class Transport>
__global__ void __launch_bounds__(kThreads, 1)
    fused_reduce_add_norm_kernel(const __grid_constant__ KernelParams p) {
  __shared__ float smem[kThreads / 32];
  __shared__ uint32_t s_epoch;
  if (threadIdx.x == 0) s_epoch = p.epochs[blockIdx.x] + 1;
  __syncthreads();
  const uint32_t epoch = s_epoch;
  const int nb = gridDim.x, b = blockIdx.x;
  const uint32_t vpr = static_cast<uint32_t>(p.hidden / 8);

  Transport::publish(p);  // phase 0
  block_barrier<Transport>(p, 0, epoch);

  // phase 1: reduce + residual + RMSNorm on my rows (a group of tpr threads per row), broadcast
  const int tpr = p.threads_per_row;
  const int groups = kThreads / tpr, g = threadIdx.x / tpr, lane = threadIdx.x % tpr;
  const int64_t my_start = p.rank * p.shard;
  int64_t my_rows = p.tokens - my_start;
  my_rows = my_rows < 0 ? 0 : (my_rows > p.shard ? p.shard : my_rows);
  const int64_t nr = b < p.shard ? (p.shard - b + nb - 1) / nb : 0;  // shard rows of block b
  const uint4* weight = static_cast<const uint4*>(p.weight);
  for (int64_t k0 = 0; k0 < nr; k0 += groups) {
    const int64_t k = k0 + g;
    const int64_t i = b + k * nb;  // local row of this group
    const bool row = k < nr && i < my_rows;
    const uint4* res_row = static_cast<const uint4*>(p.residual) + i * vpr;
    uint4* new_res_row = static_cast<uint4*>(p.new_residual) + i * vpr;
    uint4 x[kMaxVecPerThread];
    float sumsq = 0.f;
    if (row) {
      float acc[kMaxVecPerThread][8];
      Transport::template reduce<T>(p, i, lane, acc);
#pragma unroll
      for (int v = 0; v < kMaxVecPerThread; ++v) {
        const uint32_t c = lane + v * tpr;
        if (c < vpr) {
          float r[8];
          Vec<T>::to_float(res_row[c], r);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[v][e] += r[e];
          x[v] = Vec<T>::from_float(acc[v]);  // the new residual, rounded to T
          new_res_row[c] = x[v];
          Vec<T>::to_float(x[v], r);
#pragma unroll
          for (int e = 0; e < 8; ++e) sumsq += r[e] * r[e];
        }
      }
    } else if (k < nr) {  // padding row of the local shard: nothing to reduce
      for (uint32_t c = lane; c < vpr; c += tpr) new_res_row[c] = res_row[c];
    }
    const float total = group_sum(sumsq, smem, tpr);
    if (row) {
      const float rstd = rsqrtf(total / static_cast<float>(p.hidden) + p.eps);
      const size_t row_off = static_cast<size_t>(my_start + i) * vpr * 16;
#pragma unroll
      for (int v = 0; v < kMaxVecPerThread; ++v) {
        const uint32_t c = lane + v * tpr;
        if (c < vpr) {
          float xf[8], w[8];
          Vec<T>::to_float(x[v], xf);
          Vec<T>::to_float(weight[c], w);
#pragma unroll
          for (int e = 0; e < 8; ++e) xf[e] = w[e] * (xf[e] * rstd);
          Transport::broadcast(p, row_off + c * 16, Vec<T>::from_float(xf));
        }
      }
    }
  }
  block_barrier<Transport>(p, 1, epoch);

  // phase 2: my out_slot -> normed (rows of every owner assigned to block b)
  if (p.normed != nullptr) {
    const int64_t row_bytes = p.hidden * 2;
    copy_rows(p, [&](int q) {
      return RowSpan{static_cast<const char*>(p.out_slots[p.rank]) + q * p.shard * row_bytes,
                     static_cast<char*>(p.normed) + q * p.shard * row_bytes};
    });
  }
  if (threadIdx.x == 0) p.epochs[b] = epoch;
}

}  // namespace weave

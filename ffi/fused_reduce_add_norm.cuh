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
// workspace.cu for sizes):
//   in_slot   (Tmax, H)                       each rank copies its whole `partial` here
//   out_slot  (Tmax, H)      x num_slots      every rank stores the normalized rows it owns
//                                             into the out_slot of EVERY rank (itself included)
//   res_slot  (ceil(Tmax/world), H) x slots   split (start/done) mode only: new residual
//   pads      uint32 [2 barriers][32 blocks][8 source ranks]   signal words, one 32-bit word per
//                                             (barrier, block, source): no flags packed in bytes
//   epochs    uint32 [32]                     local only: calls block b has taken part in
// Peers reach in_slot, out_slot and pads through peer pointers (one process, peer access
// enabled) or CUDA IPC mappings (one process per GPU).  MultimemTransport reads in_slot and
// writes out_slot through their multicast addresses instead; signals always use unicast words.
//
// Work split.  Every rank launches the same grid (nb blocks, same `ctas` attribute).  Row i of
// owner q's slice (i in [0, rows_q)) belongs to block i % nb.  Block b on rank p does exactly
// the work that block b on the other ranks depends on, so barriers pair blocks by index:
//   phase 0  copy-in:   rows of EVERY owner assigned to b: partial -> local in_slot
//   barrier 0 ("start"): my rows for block b are in my in_slot; wait for every peer's block b
//   phase 1  reduce:    rows of MY slice assigned to b: sum in_slot of ranks 0..world-1 in that
//                       fixed order (fp32), + residual, round (= new residual), RMSNorm,
//                       store the normalized row into out_slot of every rank
//   barrier 1 ("end"):  my stores into every out_slot for block b are done AND I have finished
//                       reading every peer's in_slot for block b; wait for every peer's block b
//   phase 2  copy-out:  rows of every owner assigned to b: local out_slot -> normed
//                       (skipped in split mode: `done` copies the whole slot on XLA's stream)
// Each row is computed by exactly one rank and broadcast, so all ranks hold bitwise-identical
// `normed`; the fixed summation order makes the result independent of timing.
//
// Why two barriers suffice with single-buffered slots.  Barrier 1 of call k on my block b means
// every peer's block b has finished reading my in_slot rows (partition b) and writing my
// out_slot rows (partition b).  My next kernel only starts after ALL my blocks passed barrier 1
// (stream order), so by then every peer finished every access to my buffers for call k,
// whatever the partition of call k+1 (token counts may change between calls).  Peers write my
// out_slot in call k+1 only after barrier 0 of call k+1, which my block signals after my
// copy-out of call k (same kernel, earlier phase, or `done` ordered before via events).
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
//            then __syncthreads() hands the acquired ordering to the whole block.  Barrier 0
//            orders peers' in_slot writes before my reads; barrier 1 orders peers' out_slot
//            writes before my copy-out, and my in_slot reads before peers' next-call writes.
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
constexpr int kMaxVecPerThread = 8;                      // 16-byte vectors per thread per row
constexpr int kMaxHidden = kThreads * kMaxVecPerThread * 8;  // 32768 elements
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
  void* in_slots[kMaxRanks];    // rank q's in_slot as seen from this device
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

// ------------------------------------------------------------------ transports

// NVLink loads/stores through peer pointers.
struct PeerTransport {
  // Sum the 8 elements at byte offset `off` of every rank's in_slot, ranks 0..world-1 in order.
  template <typename T>
  __device__ static __forceinline__ void reduce(const KernelParams& p, size_t off, float acc[8]) {
    uint4 v[kMaxRanks];
#pragma unroll
    for (int q = 0; q < kMaxRanks; ++q) {  // issue every load before the first use
      if (q < p.world) {
        v[q] = *reinterpret_cast<const uint4*>(static_cast<const char*>(p.in_slots[q]) + off);
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.f;
#pragma unroll
    for (int q = 0; q < kMaxRanks; ++q) {
      if (q < p.world) {
        float f[8];
        Vec<T>::to_float(v[q], f);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += f[i];
      }
    }
  }
  // Store one normalized vector into every rank's out_slot, starting with the next rank so
  // that ranks spread their traffic over the links.
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
  template <typename T>
  __device__ static __forceinline__ void reduce(const KernelParams& p, size_t off, float acc[8]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const char* addr = static_cast<const char*>(p.in_mc) + off;
    uint4 v;
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      asm volatile("multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.bf16x2 {%0,%1,%2,%3}, [%4];"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                   : "l"(addr)
                   : "memory");
    } else {
      asm volatile("multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.f16x2 {%0,%1,%2,%3}, [%4];"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                   : "l"(addr)
                   : "memory");
    }
    Vec<T>::to_float(v, acc);
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

// ------------------------------------------------------------------ shared phases

// Copy rows of every owner assigned to this block between a (T, H) buffer and a slot, with
// 16-byte accesses; (row, vector) pairs are flattened so small H still fills the block.
__device__ __forceinline__ void copy_block_rows(const KernelParams& p, const char* src,
                                                char* dst) {
  const uint32_t vpr = static_cast<uint32_t>(p.hidden / 8);
  const int nb = gridDim.x, b = blockIdx.x;
  for (int q = 0; q < p.world; ++q) {
    const int64_t start = q * p.shard;
    int64_t rows_q = p.tokens - start;
    rows_q = rows_q < 0 ? 0 : (rows_q > p.shard ? p.shard : rows_q);
    if (b >= rows_q) continue;
    const uint32_t nr = static_cast<uint32_t>((rows_q - b + nb - 1) / nb);
    const uint32_t total = nr * vpr;
    constexpr int kUnroll = 4;
    for (uint32_t base = threadIdx.x; base < total; base += kThreads * kUnroll) {
      uint4 v[kUnroll];
      size_t off[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint32_t idx = base + u * kThreads;
        if (idx < total) {
          const uint32_t k = idx / vpr, c = idx - k * vpr;
          off[u] = ((start + b + static_cast<int64_t>(k) * nb) * p.hidden + c * 8) * 2;
          v[u] = *reinterpret_cast<const uint4*>(src + off[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * kThreads < total) *reinterpret_cast<uint4*>(dst + off[u]) = v[u];
      }
    }
  }
}

__device__ __forceinline__ float block_sum(float v, float* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // smem reuse across rows
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float s = lane < kThreads / 32 ? smem[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  return s;  // every thread holds the block total, summed in a fixed order
}

template <typename T, class Transport>
__global__ void __launch_bounds__(kThreads, 1) fused_reduce_add_norm_kernel(const __grid_constant__ KernelParams p) {
  __shared__ float smem[kThreads / 32];
  __shared__ uint32_t s_epoch;
  if (threadIdx.x == 0) s_epoch = p.epochs[blockIdx.x] + 1;
  __syncthreads();
  const uint32_t epoch = s_epoch;
  const int nb = gridDim.x, b = blockIdx.x;
  const uint32_t vpr = static_cast<uint32_t>(p.hidden / 8);

  // phase 0: partial -> my in_slot (rows of every owner assigned to block b)
  copy_block_rows(p, static_cast<const char*>(p.partial), static_cast<char*>(p.in_slots[p.rank]));
  block_barrier<Transport>(p, 0, epoch);

  // phase 1: reduce + residual + RMSNorm on my rows, broadcast
  const int64_t my_start = p.rank * p.shard;
  int64_t my_rows = p.tokens - my_start;
  my_rows = my_rows < 0 ? 0 : (my_rows > p.shard ? p.shard : my_rows);
  const uint4* weight = static_cast<const uint4*>(p.weight);
  for (int64_t i = b; i < p.shard; i += nb) {
    const uint4* res_row = static_cast<const uint4*>(p.residual) + i * vpr;
    uint4* new_res_row = static_cast<uint4*>(p.new_residual) + i * vpr;
    if (i >= my_rows) {  // padding row of the local shard: nothing to reduce
      for (uint32_t c = threadIdx.x; c < vpr; c += kThreads) new_res_row[c] = res_row[c];
      continue;
    }
    const size_t row_off = static_cast<size_t>(my_start + i) * p.hidden * 2;
    uint4 x[kMaxVecPerThread];
    float sumsq = 0.f;
#pragma unroll
    for (int k = 0; k < kMaxVecPerThread; ++k) {
      const uint32_t c = threadIdx.x + k * kThreads;
      if (c < vpr) {
        float acc[8], r[8];
        Transport::template reduce<T>(p, row_off + c * 16, acc);
        Vec<T>::to_float(res_row[c], r);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] += r[e];
        x[k] = Vec<T>::from_float(acc);  // the new residual, rounded to T
        new_res_row[c] = x[k];
        Vec<T>::to_float(x[k], acc);
#pragma unroll
        for (int e = 0; e < 8; ++e) sumsq += acc[e] * acc[e];
      }
    }
    const float rstd = rsqrtf(block_sum(sumsq, smem) / static_cast<float>(p.hidden) + p.eps);
#pragma unroll
    for (int k = 0; k < kMaxVecPerThread; ++k) {
      const uint32_t c = threadIdx.x + k * kThreads;
      if (c < vpr) {
        float xf[8], w[8];
        Vec<T>::to_float(x[k], xf);
        Vec<T>::to_float(weight[c], w);
#pragma unroll
        for (int e = 0; e < 8; ++e) xf[e] = w[e] * (xf[e] * rstd);
        Transport::broadcast(p, row_off + c * 16, Vec<T>::from_float(xf));
      }
    }
  }
  block_barrier<Transport>(p, 1, epoch);

  // phase 2: my out_slot -> normed (rows of every owner assigned to block b)
  if (p.normed != nullptr) {
    copy_block_rows(p, static_cast<const char*>(p.out_slots[p.rank]), static_cast<char*>(p.normed));
  }
  if (threadIdx.x == 0) p.epochs[b] = epoch;
}

}  // namespace weave

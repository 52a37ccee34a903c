// Fused AllReduce + residual add + RMSNorm, part 4 of 6: the two-shot algorithm (algo 0) and
// its two transports.  Shared pieces (buffers, barriers, memory orders) are in
// fused_common.cuh.
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
// Each row is computed by exactly one rank and broadcast, so all ranks hold bitwise-identical
// `normed`; the fixed summation order makes the result independent of timing.
//
// Why two barriers suffice with single-buffered slots.  Passing barrier 1 of call k on my block
// b means every peer's block b has finished writing my in_slot and out_slot rows of partition b
// and reading nothing of mine after that.  My next kernel only starts after ALL my blocks passed
// barrier 1 (stream order), so by then every peer finished every access to my buffers for call
// k, whatever the partition of call k+1 (token counts may change between calls).  Peers PUSH
// into my in_slot in phase 0 of call k+1, before barrier 0.  That is safe because I read my
// in_slot only in phase 1 of call k, which precedes my barrier-1 signal of call k, which
// precedes (in the peer's program order, via its acquire) its phase 0 of call k+1.  Likewise
// peers store into my out_slot in phase 1 of k+1, after barrier 0 of k+1, which I signal only
// after my copy-out of call k (earlier phase of the same kernel, or `done` ordered before the
// next kernel by events).
//
// Epochs.  Block b signals value e = epochs[b] + 1 and waits until every source's word reaches e
// (wrap-safe signed compare).  epochs[b] is read and advanced INSIDE the kernel by block b, so
// replaying a captured CUDA graph (XLA command buffer) keeps working: the host never supplies
// the epoch.  Every rank makes the same sequence of calls with the same grid, so epochs[b] is
// equal on all ranks at each call.  A peer can be at most one barrier ahead: it cannot pass
// barrier 1 of call k before I signal it, so a word never runs two values ahead of its waiter.
//
// Memory orders (the barrier's release/acquire pair: fused_common.cuh).  Barrier 0 orders
// peers' pushes before my reads; barrier 1 orders peers' out_slot stores before my copy-out,
// and my staged-row reads before peers' next-call pushes.
#pragma once

#include <type_traits>

#include "fused_norm_rows.cuh"
#include "fused_tma_copy.cuh"

namespace weave {

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

}  // namespace weave

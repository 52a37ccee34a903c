// Fused AllReduce + residual add + RMSNorm, part 3 of 6: TMA bulk row copies, the two-shot
// kernel's phases 0 and 2 on sm_90+.
//
// Protocol.  One thread per block (thread 0) issues every copy: global -> shared through
// kTmaStages stages, each completing on its mbarrier (transaction bytes), then shared ->
// global as a bulk group.  A stage is refilled only once the store issued from it has read it
// (cp.async.bulk.wait_group.read).  Fences:
//   - before the first bulk load, fence.proxy.async.global: rows that peers wrote with generic
//     stores (and that the block acquired at the preceding barrier) must be visible to the
//     async proxy that reads them;
//   - after the last bulk store, cp.async.bulk.wait_group 0 and fence.proxy.async.global: the
//     stores are complete and ordered before the generic-proxy release of the next barrier
//     (which follows a __syncthreads), so peers that acquire it see the rows.
// On sm_80 these functions trap; the handlers never launch the TMA kernel there.
#pragma once

#include "fused_common.cuh"

namespace weave {

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

}  // namespace weave

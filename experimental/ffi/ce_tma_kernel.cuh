// EXPERIMENTAL, never built into the library: the copy-engine algorithm's local kernel with
// every byte moved by the TMA (sm_90+), warp-specialized.  Built only by the benches beside it
// (experimental/README.md: what it was for and what it measured).  It reuses the library's
// CopyEngineIo and TMA primitives, so it runs the same rows with the same operands as
// weave::ce_reduce_add_norm_kernel.
#pragma once

#include "fused_reduce_add_norm.cuh"

namespace weave {

// Why: on one H200 (2026-12-01) the load/store kernel moves ~57 GB/s of traffic per block at
// small grids; bulk copies through shared memory move more, but only if no thread of the
// computing warps waits for a copy to be issued or to finish reading.
//   - kG rows at a time, one per row group of norm_rows' mapping (kG = 1 for 4096 < H <= 8192,
//     2 for 2048 < H <= 4096): the block's rows r_k = b + k*nb, iteration j holds k = j*kG + g.
//   - One producer warp (one thread of it) issues every bulk copy: iteration j's rows (two
//     sources and the residual each) into stage j % kCeStages (mbarrier full[s], transaction
//     bytes), and once the consumers are done with them, their stores from the same stage
//     (normed row to `normed` and to my out_slot, and the new residual).  A stage is refilled only after its stores
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
// 1.26x slower at 16 blocks, and with 4+ rows per iteration the one issuing
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
    // the pull copies after this kernel read out_slot: the bulk stores must be complete and
    // visible when the kernel ends
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

}  // namespace weave

// Fused AllReduce + residual add + RMSNorm across tensor-parallel ranks: every kernel of the
// library, one include for the handlers.
//
//   normed (T, H) = RMSNorm(sum_r partial_r + residual) * weight      replicated on every rank
//   new_residual (S, H) = round_to_dtype(sum_r partial_r + residual)   sharded by token
//
// Each part opens with its share of the protocol:
//   fused_common.cuh       buffers, kernel parameters, the paired-block barrier (epochs, memory
//                          orders, bounded waits, error record), vector types, row copies
//   fused_norm_rows.cuh    phase 1 of every algorithm: sum in rank order, residual, RMSNorm
//   fused_tma_copy.cuh     TMA bulk row copies (the two-shot kernel's phases 0 and 2, sm_90+)
//   fused_two_shot.cuh     algo 0: reduce-scatter + norm + all-gather, two barriers; the peer
//                          and multimem transports
//   fused_copy_engine.cuh  algo 1: NVLink traffic on the copy engines, a local kernel, host
//                          rendezvous and cross-device events
//   fused_one_shot.cuh     algo 2: every rank reduces every row, one barrier (small messages)
// Algorithm codes are the FFI attribute `algo` (handlers.cu); which one runs for a call is
// decided in Python (weave_jax/fused/ops.py), never here.
#pragma once

#include "fused_common.cuh"
#include "fused_copy_engine.cuh"
#include "fused_norm_rows.cuh"
#include "fused_one_shot.cuh"
#include "fused_tma_copy.cuh"
#include "fused_two_shot.cuh"

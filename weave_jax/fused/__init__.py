"""Fused AllReduce + residual add + RMSNorm through XLA FFI (kernel sources in ``ffi/``).

    ws = init_workspace(mesh, max_tokens=32768, hidden=8192, dtype=jnp.bfloat16)
    # inside shard_map over "tp":
    normed, new_residual = fused_reduce_add_norm(partial, residual, weight, eps=1e-6)

Without the compiled library (no nvcc at install), importing works and every entry point that
needs it raises ``FusedUnavailableError``.

Verified on 2xH200 (JAX 0.11.2, 2026-11-22): the peer transport in one process, including the
Hopper (TMA) two-shot kernel -- the GPU test file with WEAVE_TEST_SHAPES=30 (edge cases and
random shapes in bf16 and fp16 against an fp32 psum reference with bitwise-equal ranks, 10,000
chained calls, bad inputs, the ``on_stream`` variant, start/done, phase stamps and the timeout
error): 138 passed, 1 skipped.  One process per GPU (``jax.distributed``, IPC workspace):
verified on 2xH200 on 2026-11-30 (``tests/test_ipc_gpu.py``: handles exchanged, write/read-back
probe, one-shot / two-shot / 16-byte-copy kernels against psum + fp32 norm).  CUDA-graph replay
of the unsplit call (XLA command buffers; its default target where verified): 2xH200 on
2026-12-01, 10,000 replayed calls bitwise equal to the plain target's.  Unverified: the multimem
transport (see ``ffi/NOTES.md``).  Phase stamps for profiling: ``weave_jax.fused.phases``;
handler invocation counts (graph replay): ``workspace.handler_calls``.
"""
from weave_jax.fused._lib import FusedUnavailableError, available
from weave_jax.fused.gate import multicast_policy
from weave_jax.fused.ops import fused_done, fused_reduce_add_norm, fused_start, on_stream
from weave_jax.fused.workspace import (FusedTimeoutError, Workspace, free_workspace,
                                       init_workspace, raise_on_timeout, timeout_error)

__all__ = [
    "FusedTimeoutError", "FusedUnavailableError", "Workspace", "available", "free_workspace",
    "fused_done", "fused_reduce_add_norm", "fused_start", "init_workspace", "multicast_policy",
    "on_stream", "raise_on_timeout", "timeout_error",
]

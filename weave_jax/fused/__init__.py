"""Fused AllReduce + residual add + RMSNorm through XLA FFI (kernel sources in ``ffi/``).

    ws = Workspace(mesh, max_tokens=32768, hidden=8192, dtype=jnp.bfloat16).open()
    # inside shard_map over "tp":
    normed, new_residual = fused_reduce_add_norm(partial, residual, weight, eps=1e-6,
                                                 workspace=ws)

Without the compiled library (no nvcc at install), importing works and every entry point that
needs it raises ``FusedUnavailableError``.

Verified on 2 x H200 (JAX 0.11.2): the peer transport in one process (2026-11-22: edge cases
and random shapes in bf16 and fp16 against an fp32 psum reference with bitwise-equal ranks,
10,000 chained calls, bad inputs, start/done, phase stamps, the timeout error); one process per
GPU over CUDA IPC (2026-11-30, ``tests/test_ipc_gpu.py``); CUDA-graph replay of the unsplit call
(2026-12-01, 10,000 replayed calls bitwise equal to the plain target's).  Unverified: the
multimem transport (``ffi/NOTES.md``).  Phase stamps: ``weave_jax.fused.phases``.
"""
from weave_jax.fused._lib import FusedUnavailableError, available
from weave_jax.fused.gate import multicast_policy
from weave_jax.fused.ops import fused_done, fused_reduce_add_norm, fused_start, on_stream
from weave_jax.fused.workspace import FusedTimeoutError, Workspace

__all__ = [
    "FusedTimeoutError", "FusedUnavailableError", "Workspace", "available", "fused_done",
    "fused_reduce_add_norm", "fused_start", "multicast_policy", "on_stream",
]

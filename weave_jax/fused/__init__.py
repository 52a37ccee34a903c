"""Fused AllReduce + residual add + RMSNorm through XLA FFI (kernel sources in ``ffi/``).

    ws = init_workspace(mesh, max_tokens=32768, hidden=8192, dtype=jnp.bfloat16)
    # inside shard_map over "tp":
    normed, new_residual = fused_reduce_add_norm(partial, residual, weight, eps=1e-6, ctas=16)

Without the compiled library (no nvcc at install), importing works and every entry point that
needs it raises ``FusedUnavailableError``.

Verified on 2xH200 (JAX 0.11.2): the peer transport in one process (>= 200 random/edge shapes
in bf16 and fp16 against an fp32 psum reference with bitwise-equal ranks -- 216 of the GPU test
file's 226 tests passed before that run's time limit, none failed -- plus, in a second run,
10,000 chained calls, bad inputs, the ``on_stream`` variant and the timeout error in bf16).  Unverified: the multimem
transport, the one-process-per-GPU (IPC) workspace, and command-buffer replay (see
``ffi/NOTES.md``).
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

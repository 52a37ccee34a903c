"""The token-weaving schedule: run a chain of sublayers over two halves of the batch so that one
half's ``reduce_add_norm`` overlaps the other half's compute.

A *stage* is one row-parallel sublayer: ``stage(normed, half, ctx) -> (partial, ctx')`` followed
by ``reduce_add_norm`` with that stage's norm weight.  ``ctx`` carries what half B needs from
half A at the same stage (the attention keys/values of the earlier tokens).

Unsplit (one half):       p = f_k(n);  n, r = comm(p, r, w_k)           for k = 0..S-1

Woven (halves A, B), with order pinned by ``optimization_barrier`` so that XLA can neither
merge the halves' GEMMs/collectives nor move B's compute ahead of A's::

    p_A = f_k(n_A)                     ; barrier(p_A, n_B)   f_k(A) before f_k(B)
    h_A = start(p_A)                   ; barrier(h_A, n_B)   [async backends] start(A) first
    p_B = f_k(n_B)    (overlaps h_A)   ; barrier(h_A, p_B)   done(A) after f_k(B)
    n_A = done(h_A)
    h_B = start(p_B)                   ; barrier(h_B, n_A)   [async backends]
    p_A = f_{k+1}(n_A) (overlaps h_B)  ; barrier(h_B, p_A)   done(B) after f_{k+1}(A)
    n_B = done(h_B) ...

For XLA backends ``start`` is the whole collective, so the "[async]" barriers are skipped
(they would force the collective to finish before the other half's compute starts).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from weave_jax.comm.base import CommBackend

Stage = tuple[Callable[..., tuple[jax.Array, Any]], jax.Array, str]   # (fn, norm weight, scope)

_barrier = jax.lax.optimization_barrier


def run_unsplit(stages: Sequence[Stage], half, normed, residual, backend: CommBackend, eps):
  """Stages back to back on one chunk of tokens.  Returns (normed, residual)."""
  for fn, weight, scope in stages:
    with jax.named_scope(scope):
      partial, _ = fn(normed, half, None)
      normed, residual = backend.reduce_add_norm(partial, residual, weight, eps=eps)
  return normed, residual


def run_woven(stages: Sequence[Stage], halves, normed, residual, backend: CommBackend, eps):
  """Stages over halves (A, B), interleaved as in the module docstring.

  ``normed`` / ``residual`` are pairs (A, B).  Returns the final pairs.
  """
  (half_a, half_b), (n_a, n_b), (r_a, r_b) = halves, normed, residual
  h_b = None
  for k, (fn, weight, scope) in enumerate(stages):
    with jax.named_scope(scope):
      with jax.named_scope("half_A"):
        p_a, ctx = fn(n_a, half_a, None)
      if h_b is not None:                      # done(B of stage k-1) after f_k(A)
        h_b, p_a = _barrier((h_b, p_a))
        with jax.named_scope("comm_B"):
          n_b, r_b = backend.done(h_b)
      p_a, n_b = _barrier((p_a, n_b))          # f_k(A) before f_k(B)
      with jax.named_scope("comm_A"):
        h_a = backend.start(p_a, r_a, weight, eps=eps)
      if backend.async_start:
        h_a, n_b = _barrier((h_a, n_b))
      with jax.named_scope("half_B"):
        p_b, _ = fn(n_b, half_b, ctx)
      h_a, p_b = _barrier((h_a, p_b))          # done(A) after f_k(B)
      with jax.named_scope("comm_A"):
        n_a, r_a = backend.done(h_a)
      with jax.named_scope("comm_B"):
        h_b = backend.start(p_b, r_b, weight, eps=eps)
      if backend.async_start:
        h_b, n_a = _barrier((h_b, n_a))
  with jax.named_scope("comm_B"):
    n_b, r_b = backend.done(h_b)
  return (n_a, n_b), (r_a, r_b)

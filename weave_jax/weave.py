"""The token-weaving schedule: run a chain of sublayers over two halves of the batch so that one
half's ``reduce_add_norm`` overlaps the other half's compute.

A *stage* is one row-parallel sublayer ``(fn, norm_weight, scope)``:
``fn(normed, half, ctx) -> (partial, ctx')`` followed by ``reduce_add_norm`` with that stage's
norm weight.  ``ctx`` carries what half B needs from half A at the same stage (e.g. the
attention cache A wrote).

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
(they would force the collective to finish before the other half's compute starts).  Half A's
starts use slot 0, half B's slot 1 (``CommBackend.start``): the program depends on nothing but
its inputs.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Sequence

import jax

from weave_jax.comm.base import CommBackend

Stage = tuple[Callable[..., tuple[jax.Array, Any]], jax.Array, str]   # (fn, norm weight, scope)

_barrier = jax.lax.optimization_barrier


class Result(NamedTuple):
  """What ``run`` returns; one entry per half in ``normed`` and ``residuals``."""
  normed: tuple            # per half: (T_half, H) replicated output of the last stage's norm
  residuals: tuple         # per half: the residual stream in the backend's layout
  ctxs: list               # per stage: its final ctx (half B's when woven, else the half's)


def run(stages: Sequence[Stage], halves: Sequence, residuals: Sequence, backend: CommBackend, *,
        eps: float, normed: Sequence | None = None) -> Result:
  """Runs ``stages`` over one half (unsplit) or two halves (woven, module docstring).

  Contract (runs inside ``jax.shard_map``; shapes per rank):

  - ``stages``: a sequence of ``(fn, weight, scope)``.  ``fn(normed, half, ctx)`` returns
    ``(partial (T_half, H), ctx')``: this rank's row-parallel partial sum for the half's tokens
    and whatever half B needs from half A at this stage.  For half A (and unsplit) ``ctx`` is
    None; for half B it is half A's ``ctx'`` of the same stage.  ``weight`` (H,) is the RMSNorm
    scale applied after the stage's reduction; ``scope`` names the stage in profiles.
  - ``halves``: one or two opaque objects handed to ``fn`` (the tokens, positions, metadata of
    each half; ``fn`` reads its own).  The caller splits the batch: half A is tokens [0, s),
    half B tokens [s, T), and pads each half to a multiple of the TP size (the residual shards
    of the ``*rs_ag``/fused backends are 1/TP of a half).
  - ``residuals``: one per half, in the backend's layout:
    ``backend.residual_shape(T_half, H, tp)`` (zeros before the first stage).
  - ``normed``: the first stage's input per half (None: the first stage ignores it, e.g. an
    embedding).
  - ``eps``: RMSNorm epsilon.

  Returns ``Result(normed, residuals, ctxs)``.
  """
  if not stages:
    raise ValueError("weave.run: stages is empty")
  if len(halves) not in (1, 2):
    raise ValueError(f"weave.run: halves must hold 1 (unsplit) or 2 (woven) halves, got "
                     f"{len(halves)}")
  if len(residuals) != len(halves):
    raise ValueError(f"weave.run: {len(residuals)} residuals for {len(halves)} halves")
  if normed is None:
    normed = (None,) * len(halves)
  if len(normed) != len(halves):
    raise ValueError(f"weave.run: {len(normed)} normed inputs for {len(halves)} halves")
  for k, stage in enumerate(stages):
    if not (isinstance(stage, (tuple, list)) and len(stage) == 3 and callable(stage[0])):
      raise TypeError(f"weave.run: stages[{k}] must be (fn, weight, scope), got {stage!r}")
  if not isinstance(backend, CommBackend):
    raise TypeError(f"weave.run: backend must be a CommBackend (weave_jax.ops.backend), got "
                    f"{type(backend).__name__}")
  if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps > 0:
    raise ValueError(f"weave.run: eps={eps!r} must be a positive number")
  if len(halves) == 1:
    n, r, ctxs = _unsplit(stages, halves[0], normed[0], residuals[0], backend, eps)
    return Result((n,), (r,), ctxs)
  return _woven(stages, tuple(halves), tuple(normed), tuple(residuals), backend, eps)


def _unsplit(stages, half, normed, residual, backend: CommBackend, eps):
  """Stages back to back on one chunk of tokens.  Returns (normed, residual, ctxs)."""
  ctxs = []
  for fn, weight, scope in stages:
    with jax.named_scope(scope):
      partial, ctx = fn(normed, half, None)
      ctxs.append(ctx)
      normed, residual = backend.reduce_add_norm(partial, residual, weight, eps=eps)
  return normed, residual, ctxs


def _woven(stages, halves, normed, residual, backend: CommBackend, eps) -> Result:
  """Stages over halves (A, B), interleaved as in the module docstring."""
  (half_a, half_b), (n_a, n_b), (r_a, r_b) = halves, normed, residual
  h_b = None
  ctxs = []
  for fn, weight, scope in stages:
    with jax.named_scope(scope):
      with jax.named_scope("half_A"):
        p_a, ctx = fn(n_a, half_a, None)
      if h_b is not None:                      # done(B of stage k-1) after f_k(A)
        h_b, p_a = _barrier((h_b, p_a))
        with jax.named_scope("comm_B"):
          n_b, r_b = backend.done(h_b)
      p_a, n_b = _barrier((p_a, n_b))          # f_k(A) before f_k(B)
      with jax.named_scope("comm_A"):
        h_a = backend.start(p_a, r_a, weight, eps=eps, slot=0)
      if backend.async_start:
        h_a, n_b = _barrier((h_a, n_b))
      with jax.named_scope("half_B"):
        p_b, ctx = fn(n_b, half_b, ctx)
      ctxs.append(ctx)
      h_a, p_b = _barrier((h_a, p_b))          # done(A) after f_k(B)
      with jax.named_scope("comm_A"):
        n_a, r_a = backend.done(h_a)
      with jax.named_scope("comm_B"):
        h_b = backend.start(p_b, r_b, weight, eps=eps, slot=1)
      if backend.async_start:
        h_b, n_a = _barrier((h_b, n_a))
  with jax.named_scope("comm_B"):
    n_b, r_b = backend.done(h_b)
  return Result((n_a, n_b), (r_a, r_b), ctxs)

"""The communication seam: every row-parallel sublayer ends in ``reduce_add_norm``.

All functions here run *inside* ``jax.shard_map`` over the tensor-parallel mesh axis (the
backend's ``axis_name``; ``AXIS = "tp"`` by default); the mesh may have further axes.  Shapes
below are per-rank (local) shapes.

    reduce_add_norm(partial, residual, weight) -> (normed, residual')

- ``partial``  (T, H): this rank's row-parallel output (a partial sum over ranks).
- ``residual`` (T, H) replicated when ``backend.residual_sharded`` is False, else
  (T // tp, H): rank r owns tokens [r*T/tp, (r+1)*T/tp).  T is a multiple of tp for the
  sharded XLA backend (the caller pads); ``backend.residual_shape`` gives the layout.
- ``weight``   (H,): RMSNorm scale.
- ``normed``   (T, H): RMSNorm(sum_r partial_r + residual) * weight, replicated.
- ``residual'``: the new residual stream (sum + residual), in the backend's layout.

The math: reduce (XLA backends reduce in the activation dtype, as NCCL does for the vLLM
baseline; the fused kernel accumulates in float32), ``x = sum + residual`` rounded to the
activation dtype (that rounded value *is* the new residual, as in HF), then
``normed = weight * (x_f32 * rsqrt(mean(x_f32**2) + eps))`` cast to the activation dtype.

Backends may split the call into ``start``/``done`` so that a schedule can place other work
between them (see ``weave_jax.weave``); the default ``start`` does everything and ``done``
returns its result.  ``start`` takes a ``slot`` (0 or 1): calls in flight at once use distinct
slots, chosen by the caller from the call's place in the schedule, so the traced program is a
function of its inputs alone.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

AXIS = "tp"


def axis_size(axis_name: str) -> int:
  """The size of a shard_map axis while tracing (``jax.lax.axis_size`` where it exists)."""
  if hasattr(jax.lax, "axis_size"):
    return jax.lax.axis_size(axis_name)
  return jax.lax.psum(1, axis_name)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm in float32, cast back to ``x.dtype``. x: (..., H), weight: (H,)."""
  xf = x.astype(jnp.float32)
  var = jnp.mean(xf * xf, axis=-1, keepdims=True)
  y = xf * jax.lax.rsqrt(var + eps)
  return (weight.astype(jnp.float32) * y).astype(x.dtype)


def add_norm(reduced_f32: jax.Array, residual: jax.Array, weight: jax.Array, eps: float):
  """Residual add + RMSNorm on already-reduced values.  Returns (normed, new_residual)."""
  new_residual = (reduced_f32 + residual.astype(jnp.float32)).astype(residual.dtype)
  return rms_norm(new_residual, weight, eps), new_residual


@dataclasses.dataclass(frozen=True)
class CommBackend:
  """Base class.  Subclasses are frozen (hashable) so they can live in a static config."""

  name: str = "base"
  #: the shard_map axis the reduction runs over
  axis_name: str = AXIS
  #: True when the residual stream is sharded by token (rank r owns a contiguous 1/tp slice).
  residual_sharded: bool = False
  #: True when the backend performs no reduction (numerically wrong on purpose).
  is_reference_wrong: bool = False
  #: True when ``start`` only enqueues work elsewhere and returns a handle at once, so a
  #: schedule may pin it before other compute (the fused backends); False when ``start`` is the
  #: whole collective (XLA backends).
  async_start: ClassVar[bool] = False

  def reduce_add_norm(self, partial, residual, weight, *, eps: float):
    raise NotImplementedError

  # The split form used by the weave schedule.  ``start`` returns an opaque handle.
  def start(self, partial, residual, weight, *, eps: float, slot: int = 0) -> Any:
    del slot  # nothing is in flight: start is the whole call
    return self.reduce_add_norm(partial, residual, weight, eps=eps)

  def done(self, handle):
    return handle

  def residual_shape(self, tokens: int, hidden: int, tp: int) -> tuple[int, int]:
    """Local residual shape for ``tokens`` tokens (a multiple of tp for the sharded XLA
    backend; the fused kernel takes ceil(tokens / tp) rows)."""
    return (-(-tokens // tp), hidden) if self.residual_sharded else (tokens, hidden)

  def check_tokens(self, tokens: int, tp: int) -> None:
    """Raises ValueError when this backend cannot reduce ``tokens`` rows over ``tp`` ranks."""
    del tokens, tp

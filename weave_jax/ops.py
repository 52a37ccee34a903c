"""The public op: ``reduce_add_norm`` for any JAX model's row-parallel sublayers.

Every row-parallel sublayer (attention out-projection, MLP down-projection) ends in an
all-reduce followed by a residual add and the next RMSNorm.  Replace those three with one call,
inside your ``shard_map`` (any axis name; the mesh may have further axes, e.g. data x tensor)::

    normed, residual = weave_jax.ops.reduce_add_norm(
        partial, residual, norm_weight, eps=1e-5, axis_name="tensor", backend="rs_ag")

Backends (``weave_jax.comm.BACKENDS``): "psum" (XLA all-reduce; residual replicated), "rs_ag"
(XLA reduce-scatter + norm on 1/N of the tokens + all-gather; residual sharded by token),
"nocomm" (no reduction: the upper bound, numerically wrong on purpose), "fused_p2p" /
"fused_multimem" (the CUDA kernel; residual sharded; needs an open ``Workspace``).

Residual layout (``residual_shape``): replicated (T, H) for "psum"/"nocomm"; for the sharded
backends rank r holds rows [r*S, (r+1)*S) with S = T / N ("rs_ag": T a multiple of N) or
ceil(T / N) (fused).  ``shard_residual`` takes a rank's rows of a replicated stream.

Run a program that makes fused calls through ``run_checked`` (or inside
``workspace.raise_on_timeout()``): a kernel timeout then raises ``FusedTimeoutError`` naming
the rank and barrier.
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from weave_jax.comm import BACKENDS, FUSED, CommBackend, get_backend
from weave_jax.comm.base import axis_size
from weave_jax.options import FusedOptions


def backend(name: str, *, axis_name: str, workspace=None,
            options: FusedOptions | None = None) -> CommBackend:
  """The backend object ``name`` over ``axis_name`` (what ``weave_jax.weave.run`` takes).

  ``workspace`` (a ``weave_jax.fused.Workspace`` built with the same ``axis_name``) and
  ``options`` only for the fused backends."""
  return get_backend(name, axis_name=axis_name, options=options, workspace=workspace)


def _axis_size(axis_name: str) -> int:
  try:
    return axis_size(axis_name)
  except NameError as e:
    raise ValueError(f"reduce_add_norm: axis_name={axis_name!r} is not an axis of the enclosing "
                     "shard_map") from e


def residual_shape(backend: CommBackend, tokens: int, hidden: int, tp: int) -> tuple[int, int]:
  """Per-rank residual shape that ``backend`` takes for ``tokens`` rows over ``tp`` ranks."""
  return backend.residual_shape(tokens, hidden, tp)


def shard_residual(residual, *, axis_name: str, backend: CommBackend):
  """This rank's rows of a replicated (T, H) residual in ``backend``'s layout (inside
  shard_map); the whole array for the replicated backends."""
  if not backend.residual_sharded:
    return residual
  tp = _axis_size(axis_name)
  rows = backend.residual_shape(residual.shape[0], residual.shape[1], tp)[0]
  padded = jnp.pad(residual, ((0, rows * tp - residual.shape[0]), (0, 0)))
  start = jax.lax.axis_index(axis_name) * rows
  return jax.lax.dynamic_slice_in_dim(padded, start, rows, axis=0)


def _check(partial, residual, weight, eps, b: CommBackend, tp: int) -> None:
  op = "reduce_add_norm"
  for name, x, ndim in (("partial", partial, 2), ("residual", residual, 2),
                        ("weight", weight, 1)):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{op}: {name} must be an array, got {type(x).__name__}")
    if x.ndim != ndim:
      raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")
  tokens, hidden = partial.shape
  if tokens < 1 or hidden < 1:
    raise ValueError(f"{op}: partial shape {partial.shape} is empty")
  if weight.shape != (hidden,):
    raise ValueError(f"{op}: weight shape {weight.shape} != ({hidden},)")
  b.check_tokens(tokens, tp)
  want = b.residual_shape(tokens, hidden, tp)
  if residual.shape != want:
    raise ValueError(f"{op}: residual shape {residual.shape} != {want}, the {b.name} layout for "
                     f"{tokens} tokens over {tp} ranks (ops.residual_shape)")
  if residual.dtype != partial.dtype:
    raise TypeError(f"{op}: residual dtype {residual.dtype} != partial dtype {partial.dtype}")
  if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps > 0:
    raise ValueError(f"{op}: eps={eps!r} must be a positive number")


def reduce_add_norm(partial, residual, weight, *, eps: float, axis_name: str, backend,
                    workspace=None, options: FusedOptions | None = None):
  """Reduce over ``axis_name``, add the residual, RMSNorm.  Runs inside ``jax.shard_map``.

  Args:
    partial: (T, H) this rank's partial sum (a row-parallel matmul's output).
    residual: the residual stream in the backend's layout (``residual_shape``): (T, H) for
      "psum"/"nocomm", (T / N, H) for "rs_ag", (ceil(T / N), H) for the fused backends.
    weight: (H,) RMSNorm scale.
    eps: RMSNorm epsilon.
    axis_name: the shard_map axis of the tensor-parallel group.
    backend: a name from ``weave_jax.comm.BACKENDS`` or a backend object (``backend()``).
    workspace: the open ``weave_jax.fused.Workspace`` (fused backends only).
    options: ``FusedOptions`` (fused backends only).

  Returns (normed (T, H) replicated, new residual in the same layout as ``residual``), in the
  input dtype: ``normed = RMSNorm(sum_ranks(partial) + residual) * weight``.
  """
  if not isinstance(axis_name, str) or not axis_name:
    raise TypeError(f"reduce_add_norm: axis_name must be a non-empty str, got {axis_name!r}")
  if isinstance(backend, CommBackend):
    if workspace is not None or options is not None:
      raise ValueError("reduce_add_norm: pass workspace/options when building the backend, not "
                       "with a backend object")
    if backend.axis_name != axis_name:
      raise ValueError(f"reduce_add_norm: backend reduces over {backend.axis_name!r}, "
                       f"axis_name={axis_name!r}")
    b = backend
  elif isinstance(backend, str):
    if backend not in BACKENDS:
      raise ValueError(f"reduce_add_norm: backend={backend!r} must be one of {BACKENDS}")
    if backend in FUSED and workspace is None:
      raise ValueError(f"reduce_add_norm: backend {backend!r} needs workspace= (an open "
                       "weave_jax.fused.Workspace)")
    b = get_backend(backend, axis_name=axis_name, options=options, workspace=workspace)
  else:
    raise TypeError(f"reduce_add_norm: backend must be a name or a CommBackend, got "
                    f"{type(backend).__name__}")
  _check(partial, residual, weight, eps, b, _axis_size(axis_name))
  return b.reduce_add_norm(partial, residual, weight, eps=eps)


def run_checked(fn, *args, workspace=None, **kwargs):
  """``fn(*args, **kwargs)`` with its results ready; with a fused ``workspace``, a kernel
  timeout raises ``FusedTimeoutError`` naming the rank and barrier instead of XLA's error."""
  if workspace is None:
    return jax.block_until_ready(fn(*args, **kwargs))
  with workspace.raise_on_timeout():
    return jax.block_until_ready(fn(*args, **kwargs))


__all__ = ["backend", "reduce_add_norm", "residual_shape", "run_checked", "shard_residual"]

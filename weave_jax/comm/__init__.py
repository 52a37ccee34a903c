"""Communication backends behind the one seam, ``reduce_add_norm`` (see ``base``)."""
from __future__ import annotations

from weave_jax.comm.base import AXIS, CommBackend, add_norm, rms_norm
from weave_jax.comm.xla import NoComm, Psum, ReduceScatterAllGather

_XLA = {"psum": Psum, "rs_ag": ReduceScatterAllGather, "nocomm": NoComm}
FUSED = ("fused_p2p", "fused_multimem")
BACKENDS = tuple(_XLA) + FUSED


def fused_available() -> tuple[bool, str]:
  """Whether the fused FFI backends can run here, and if not, why."""
  try:
    from weave_jax.comm import fused
  except ImportError as e:
    return False, f"fused backend not importable: {e}"
  return fused.available()


def get_backend(name: str, *, axis_name: str = AXIS, options=None, workspace=None) -> CommBackend:
  """The backend called ``name`` reducing over the shard_map axis ``axis_name``.

  The fused backends need ``workspace`` (a ``weave_jax.fused.Workspace``) and take ``options``
  (a ``weave_jax.options.FusedOptions``); the XLA backends take neither.
  """
  if not isinstance(name, str):
    raise TypeError(f"backend name must be a str, got {type(name).__name__}")
  if not isinstance(axis_name, str) or not axis_name:
    raise TypeError(f"backend {name!r}: axis_name must be a non-empty str, got {axis_name!r}")
  if name in _XLA:
    if options is not None or workspace is not None:
      raise ValueError(f"backend {name!r} takes no options or workspace (only the fused "
                       f"backends {FUSED} do)")
    return _XLA[name](axis_name=axis_name)
  if name in FUSED:
    from weave_jax.comm import fused  # imports the FFI binding lazily: CPU users never need it
    return fused.make_backend(name, workspace=workspace, options=options, axis_name=axis_name)
  raise ValueError(f"unknown communication backend {name!r}; choose one of {BACKENDS}")


__all__ = ["AXIS", "BACKENDS", "CommBackend", "add_norm", "fused_available", "get_backend", "rms_norm"]

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


def get_backend(name: str, **options) -> CommBackend:
  """The backend called ``name``; ``options`` go to the fused backends (e.g. ``ctas=8``)."""
  if name in _XLA:
    if options:
      raise ValueError(f"backend {name!r} takes no options, got {sorted(options)}")
    return _XLA[name]()
  if name in FUSED:
    from weave_jax.comm import fused  # imports the FFI binding lazily: CPU users never need it
    return fused.make_backend(name, **options)
  raise ValueError(f"unknown communication backend {name!r}; choose one of {BACKENDS}")


__all__ = ["AXIS", "BACKENDS", "CommBackend", "add_norm", "fused_available", "get_backend", "rms_norm"]

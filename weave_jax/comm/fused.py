"""The fused backends: reduce-scatter, residual add, RMSNorm and all-gather in one FFI call.

Unsplit calls run one CUDA kernel; woven calls (``start``/``done``) of >= 8 MiB move their
NVLink traffic on the copy engines around a local add + RMSNorm kernel, so the other half's
GEMMs keep the SMs (``weave_algorithm``; ``weave_jax.fused.ops`` explains the algorithms).

- ``FusedP2P`` ("fused_p2p"): NVLink stores through peer pointers (runs wherever peer access works).
- ``FusedMultimem`` ("fused_multimem"): NVLS multicast; needs a workspace built with
  ``transport="multimem"``, which only the multicast gate can create (opt-in, never on hosts
  that disable NVLS).

Both keep the residual sharded by token (``residual_sharded=True``): local residual is
(T // tp, H).  Call ``weave_jax.fused.init_workspace`` before tracing.  If the workspace's
peer write/read-back probe failed, the backend computes ``rs_ag`` instead and warns once.
"""
from __future__ import annotations

import dataclasses
import itertools
import warnings

import jax
from typing import ClassVar

from weave_jax.comm.base import CommBackend
from weave_jax.comm.xla import ReduceScatterAllGather
from weave_jax.fused import _lib
from weave_jax.fused import ops
from weave_jax.fused import workspace as ws_lib

_warned: set[str] = set()
_slots = itertools.count()


_rs_ag = ReduceScatterAllGather().reduce_add_norm  # the fallback when the peer probe failed


def available() -> tuple[bool, str]:
  """Whether the fused library loads here, and if not, why."""
  try:
    _lib.load()
  except _lib.FusedUnavailableError as e:
    return False, str(e)
  return True, "libweave_fused loaded"


_OPTIONS = ("ctas", "weave_ctas", "algorithm", "weave_algorithm", "ce_ctas", "ce_chunks",
            "side_priority", "cmd_buffer")


def make_backend(name: str, **options) -> CommBackend:
  """``fused_p2p`` or ``fused_multimem``; options: ``ctas`` and ``weave_ctas`` (2..128),
  ``algorithm`` and ``weave_algorithm`` ("auto", "one_shot", "two_shot", "two_shot_lsu",
  "copy_engine"), ``ce_ctas`` (2..1024), ``ce_chunks`` ("auto" or 1..32), ``side_priority``
  ("high", "normal"), ``cmd_buffer`` (bool, or None for the verified default)."""
  cls = {"fused_p2p": FusedP2P, "fused_multimem": FusedMultimem}[name]
  unknown = set(options) - set(_OPTIONS)
  if unknown:
    raise ValueError(f"backend {name!r}: unknown options {sorted(unknown)}; it takes "
                     f"{', '.join(_OPTIONS)}")
  for field, hi in (("ctas", ops.MAX_CTAS), ("weave_ctas", ops.MAX_CTAS),
                    ("ce_ctas", ops.MAX_CE_CTAS)):
    ops.check_grid(f"backend {name!r}", field, options.get(field, getattr(cls, field)), hi)
  for field in ("algorithm", "weave_algorithm"):
    algorithm = options.get(field, getattr(cls, field))
    if algorithm != "auto" and algorithm not in ops.ALGORITHMS:
      raise ValueError(f"backend {name!r}: {field}={algorithm!r} must be 'auto' or one of "
                       f"{sorted(ops.ALGORITHMS)}")
    if cls.transport != "peer" and algorithm not in ("auto", "two_shot"):
      raise ValueError(f"backend {name!r}: the {cls.transport} transport runs only two_shot")
  ops.check_chunks(f"backend {name!r}", options.get("ce_chunks", cls.ce_chunks))
  cmd_buffer = options.get("cmd_buffer", cls.cmd_buffer)
  if cmd_buffer is not None and cmd_buffer not in (True, False):  # 0 / 1 from a variant name
    raise ValueError(f"backend {name!r}: cmd_buffer={cmd_buffer!r} must be a bool or None")
  algorithm = options.get("algorithm", cls.algorithm)
  if cmd_buffer and algorithm in ops.COPY_ENGINE_ALGORITHMS:
    raise ValueError(f"backend {name!r}: cmd_buffer=True cannot run algorithm={algorithm!r}")
  if options.get("cmd_buffer") is not None:
    options["cmd_buffer"] = bool(cmd_buffer)
  priority = options.get("side_priority", cls.side_priority)
  if priority not in ops.SIDE_PRIORITIES:
    raise ValueError(f"backend {name!r}: side_priority={priority!r} must be one of "
                     f"{sorted(ops.SIDE_PRIORITIES)}")
  return cls(**options)


@dataclasses.dataclass(frozen=True)
class FusedP2P(CommBackend):
  name: str = "fused_p2p"
  residual_sharded: bool = True
  #: thread blocks (2..128) of unsplit calls (``reduce_add_norm``).  128: the fastest kernel
  #: setting measured on 2 x H200 (1.5-1.6x XLA psum + norm in wall time from 16 to 128 MiB, BENCHMARKS.md).
  ctas: int = ops.DEFAULT_CTAS
  #: thread blocks of the start/done calls that run a kernel (woven calls below the copy-engine
  #: threshold, or any ``weave_algorithm`` but "copy_engine"): fewer SMs taken from the GEMMs
  #: they overlap.  32: the best woven kernel setting measured (32 / 64 / 128 CTAs on
  #: Llama-3.3-70B shapes, BENCHMARKS.md).
  weave_ctas: int = ops.DEFAULT_WEAVE_CTAS
  #: algorithm of unsplit calls: "auto" (by message size,
  #: ``weave_jax.fused.ops.choose_algorithm``), "one_shot", "two_shot", "two_shot_lsu" or
  #: "copy_engine".
  algorithm: str = "auto"
  #: algorithm of woven (start) calls; "auto" prefers the copy engines for large messages,
  #: which leave the SMs to the other half's GEMMs.
  weave_algorithm: str = "auto"
  #: blocks of the copy-engine algorithm's local reduce kernel (2..1024).
  ce_ctas: int = ops.DEFAULT_CE_CTAS
  #: chunks (1..32) a copy-engine call is pipelined in, or "auto" (``ops.ce_chunks_for``).
  ce_chunks: int | str = "auto"
  #: priority of the side stream that woven (start) calls run on: "normal" or "high"
  #: (``weave_jax.fused.ops.fused_start``; "high" measured no faster in the woven model).
  side_priority: str = "normal"
  #: unsplit calls through the command-buffer-compatible target, so XLA records them into CUDA
  #: graphs with the layer's other kernels (``weave_jax.fused.ops.fused_reduce_add_norm``).
  #: None (default): where graph replay was verified (``ops.graph_target_default``: the
  #: kernels of the peer transport, not the copy engines).  A recorded call must not run
  #: while a woven call is pending (the handler refuses it; the library's own forward never
  #: mixes woven and unsplit calls in one program).
  cmd_buffer: bool | None = None
  #: start() only enqueues on the library's side stream and returns a token, so the weave
  #: schedule may pin it before the other half's compute (see weave_jax.weave).
  async_start: ClassVar[bool] = True
  transport: ClassVar[str] = "peer"

  def _fused_ok(self) -> bool:
    _lib.load()  # raises FusedUnavailableError with build instructions
    ws = ws_lib.current()
    if ws is None or ws.peer_ok:
      return True  # an uninitialised workspace raises in validation
    if self.name not in _warned:
      _warned.add(self.name)
      warnings.warn(f"{self.name}: peer access probe failed ({ws.probe_message}); using rs_ag "
                    "(XLA reduce-scatter + norm + all-gather) instead", RuntimeWarning,
                    stacklevel=3)
    return False

  def _algo(self, woven: bool = False) -> dict:
    algorithm = self.weave_algorithm if woven else self.algorithm
    if self.transport != "peer":
      algorithm = "two_shot"
    return dict(algorithm=algorithm, ce_ctas=self.ce_ctas, ce_chunks=self.ce_chunks)

  def woven_as_tuned(self) -> bool:
    """False when "auto" would run large woven calls on the two-shot kernel instead of the copy
    engines, which the tuning table's woven-vs-unsplit verdicts were measured with
    (weave_jax/tuning/splits.json): with one process per GPU (IPC workspace; the copy engines
    need one process driving every GPU).  That kernel path measured slower than unsplit calls
    in the model (0.94-1.00x the psum baseline against 1.03-1.07x, Llama shapes, 2 x H200,
    BENCHMARKS.md fifth session).  An explicit ``weave_algorithm`` is the user's choice and keeps
    the table's verdicts."""
    ws = ws_lib.current()
    return not (self.weave_algorithm == "auto" and ws is not None and ws.mode == "ipc")

  def reduce_add_norm(self, partial, residual, weight, *, eps: float):
    if not self._fused_ok():
      return _rs_ag(partial, residual, weight, eps=eps)
    return ops.fused_reduce_add_norm(partial, residual, weight, eps=eps, ctas=self.ctas,
                                     transport=self.transport, cmd_buffer=self.cmd_buffer,
                                     **self._algo())

  def start(self, partial, residual, weight, *, eps: float):
    """Launches on the library's side stream; slots rotate so ``num_slots`` may be in flight.

    Returns a pytree of arrays only (the slot is static), so the weave schedule can pin it with
    ``optimization_barrier``."""
    if not self._fused_ok():
      return _Handle(None, _rs_ag(partial, residual, weight, eps=eps), -1)
    slot = next(_slots) % ws_lib.current().num_slots
    pending = ops.fused_start(partial, residual, weight, eps=eps, ctas=self.weave_ctas, slot=slot,
                              transport=self.transport, side_priority=self.side_priority,
                              **self._algo(woven=True))
    return _Handle(pending, (partial, residual, weight), slot)

  def done(self, handle: "_Handle"):
    if handle.pending is None:          # the rs_ag fallback already computed the result
      return handle.arrays
    partial, residual, weight = handle.arrays
    return ops.fused_done(handle.pending, partial, residual, weight, slot=handle.slot)


@dataclasses.dataclass(frozen=True)
class _Handle:
  """What ``start`` hands to ``done``: start's pending (token, normed, new_residual) (None for
  the fallback), start's inputs (or the fallback's result), slot."""
  pending: object
  arrays: tuple
  slot: int


jax.tree_util.register_pytree_node(
    _Handle, lambda h: ((h.pending, h.arrays), h.slot), lambda slot, c: _Handle(c[0], c[1], slot))


@dataclasses.dataclass(frozen=True)
class FusedMultimem(FusedP2P):
  name: str = "fused_multimem"
  transport: ClassVar[str] = "multimem"

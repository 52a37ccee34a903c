"""Typed options of the fused backends (``fused_p2p``, ``fused_multimem``).

Frozen and hashable (part of ``RunConfig``, hence of the compile cache key).  A field left at
None takes the tuned value for the device, TP size and token bucket
(``weave_jax.tuned.kernel_params``).  Bad names or values raise at construction.
"""
from __future__ import annotations

import dataclasses

from weave_jax.checks import is_int

#: the kernel algorithms a user may name; "auto" picks among them by message size.
ALGORITHMS = ("one_shot", "two_shot", "copy_engine")
MIN_CTAS, MAX_CTAS = 2, 128     # kMaxCtas: one row of barrier pads per block
MAX_CE_CTAS = 1024              # kMaxCeCtas: the copy-engine kernel's blocks are not paired
MAX_CE_CHUNKS = 32              # kMaxCeChunks: the copy-engine pipeline's depth


def check_grid(op: str, field: str, value, hi: int) -> None:
  """Raises ValueError unless ``value`` is an integer grid size in MIN_CTAS..hi."""
  if not (is_int(value) and MIN_CTAS <= value <= hi):
    raise ValueError(f"{op}: {field}={value!r} must be an integer in {MIN_CTAS}..{hi}")


def check_chunks(op: str, value) -> None:
  """Raises ValueError unless ``value`` is "auto" or an integer in 1..MAX_CE_CHUNKS."""
  if isinstance(value, str) and value == "auto":
    return
  if not (is_int(value) and 1 <= value <= MAX_CE_CHUNKS):
    raise ValueError(f"{op}: ce_chunks={value!r} must be 'auto' or an integer in "
                     f"1..{MAX_CE_CHUNKS}")


def check_algorithm(op: str, field: str, value) -> None:
  if not (isinstance(value, str) and (value == "auto" or value in ALGORITHMS)):
    raise ValueError(f"{op}: {field}={value!r} must be 'auto' or one of {ALGORITHMS}")


def check_cmd_buffer(op: str, cmd_buffer, algorithm: str) -> None:
  """Raises ValueError for cmd_buffer=True with the copy-engine algorithm."""
  if cmd_buffer and algorithm == "copy_engine":
    raise ValueError(f"{op}: cmd_buffer=True cannot run algorithm='copy_engine' (its ranks "
                     "meet on the host every call, which a replayed CUDA graph skips)")


@dataclasses.dataclass(frozen=True, slots=True)
class FusedOptions:
  """Options of the fused AllReduce + RMSNorm backends.

  ctas: thread blocks (2..128) of unsplit calls' kernels; None = tuned.
  weave_ctas: thread blocks (2..128) of woven (start/done) calls that run a kernel; None = tuned.
  algorithm: unsplit calls: "auto" (by message size), "one_shot", "two_shot" or "copy_engine".
  weave_algorithm: woven calls, same choices; "auto" prefers the copy engines for large
    messages, which leave the SMs to the other half's GEMMs.
  ce_ctas: blocks (2..1024) of the copy-engine algorithm's local reduce kernel; None = tuned.
  ce_chunks: chunks (1..32) a copy-engine call is pipelined in, or "auto" (tuned).
  cmd_buffer: unsplit calls through the command-buffer (CUDA graph) compatible target; None =
    where graph replay was verified (the kernels of the peer transport).
  """
  ctas: int | None = None
  weave_ctas: int | None = None
  algorithm: str = "auto"
  weave_algorithm: str = "auto"
  ce_ctas: int | None = None
  ce_chunks: int | str = "auto"
  cmd_buffer: bool | None = None

  def __post_init__(self):
    op = "FusedOptions"
    for field, hi in (("ctas", MAX_CTAS), ("weave_ctas", MAX_CTAS), ("ce_ctas", MAX_CE_CTAS)):
      value = getattr(self, field)
      if value is not None:
        check_grid(op, field, value, hi)
    check_algorithm(op, "algorithm", self.algorithm)
    check_algorithm(op, "weave_algorithm", self.weave_algorithm)
    check_chunks(op, self.ce_chunks)
    if not (self.cmd_buffer is None or isinstance(self.cmd_buffer, bool)):
      raise ValueError(f"{op}: cmd_buffer={self.cmd_buffer!r} must be True, False or None")
    check_cmd_buffer(op, self.cmd_buffer, self.algorithm)

  @classmethod
  def from_dict(cls, options: dict) -> "FusedOptions":
    """From ``{name: value}`` (e.g. parsed from a command line); unknown names raise."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(names))
    if unknown:
      raise ValueError(f"FusedOptions: unknown options {unknown}; it takes {', '.join(names)}")
    return cls(**options)

  def changed(self) -> dict:
    """The fields that differ from the defaults."""
    default = FusedOptions()
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)}

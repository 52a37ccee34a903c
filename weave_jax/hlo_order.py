"""Read the scheduled order of a compiled executable: which compute runs between each
collective's start and done.  The static half of "verify overlap" (the trace is the other).

    report = collective_windows(engine.compiled(4096)[1].as_text())
"""
from __future__ import annotations

import dataclasses
import re

_COLLECTIVE = re.compile(
    r"\b(all-reduce|reduce-scatter|all-gather|collective-permute|all-to-all)(-start|-done)?\b")
# GEMMs / attention as XLA GPU emits them: cuBLAS(Lt) and cuDNN custom calls, Triton GEMM
# fusions, plain dot ops; our fused communication kernels are custom calls named weave_*.
_COMPUTE = re.compile(r"__cublas|cublasLt|__cudnn|cudnn|triton_gemm|gemm_fusion|\bdot\(|"
                      r"kind=kCustom|custom-call")
_WEAVE_FFI = re.compile(r"weave_[a-z_]*(start|done)?")


@dataclasses.dataclass
class Window:
  kind: str            # e.g. "all-reduce"
  name: str            # HLO instruction name of the start
  compute_between: int # compute ops scheduled between start and done


def _entry_lines(hlo_text: str) -> list[str]:
  """Instruction lines of the ENTRY computation (in schedule order for a compiled module)."""
  lines, inside = [], False
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY"):
      inside = True
      continue
    if inside:
      if line.startswith("}"):
        break
      lines.append(line.strip())
  return lines


def _is_compute(line: str) -> bool:
  return bool(_COMPUTE.search(line)) and not _COLLECTIVE.search(line) and "weave_" not in line


def collective_windows(hlo_text: str) -> list[Window]:
  """For every async collective (``*-start`` ... ``*-done``) in the entry computation, count
  the compute ops between them.  Synchronous collectives count as windows with 0 between."""
  lines = _entry_lines(hlo_text)
  open_: dict[str, tuple[str, int]] = {}
  windows: list[Window] = []
  compute_seen = 0
  for line in lines:
    name = line.split("=", 1)[0].strip().lstrip("ROOT ").strip()
    m = _COLLECTIVE.search(line.split("=", 1)[-1])
    if m and m.group(2) == "-start":
      open_[name] = (m.group(1), compute_seen)
    elif m and m.group(2) == "-done":
      operand = re.search(r"-done\(([^)]*)\)", line)
      start = operand.group(1).split()[-1].lstrip("%") if operand else None
      kind, seen = open_.pop(start, (m.group(1), compute_seen))
      windows.append(Window(kind, start or name, compute_seen - seen))
    elif m:
      windows.append(Window(m.group(1), name, 0))
    elif _is_compute(line):
      compute_seen += 1
  return windows


def summary(hlo_text: str) -> str:
  ws = collective_windows(hlo_text)
  overlapped = sum(w.compute_between > 0 for w in ws)
  by_kind: dict[str, int] = {}
  for w in ws:
    by_kind[w.kind] = by_kind.get(w.kind, 0) + 1
  return (f"{len(ws)} collectives {by_kind}; {overlapped} have compute scheduled between start "
          f"and done; compute-between per collective: {[w.compute_between for w in ws]}")

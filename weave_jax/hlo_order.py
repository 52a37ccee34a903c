"""Read the scheduled order of a compiled executable: which compute runs between each
collective's start and done.  The static half of "verify overlap" (the trace is the other).

    report = collective_windows(engine.compiled(4096)[1].as_text())

Also ``copies_of_outputs``: whether XLA copies the outputs of a custom call (the fused start's
outputs are written after the call returns, so a copy of them would read unfinished data).
"""
from __future__ import annotations

import dataclasses
import re

_COLLECTIVE = re.compile(
    r"^(all-reduce|reduce-scatter|all-gather|collective-permute|all-to-all)(-start|-done)?$")
# The opcode is the first `word(` after the `=` (shapes such as bf16[8,8]{1,0} or tuples never
# match it).
_OPCODE = re.compile(r"\s([a-z][\w\-.]*)\(")


def _opcode(rhs: str) -> str:
  m = _OPCODE.search(" " + rhs)
  return m.group(1) if m else ""


def _is_compute(name: str, opcode: str, rhs: str) -> bool:
  """GEMMs and attention as XLA GPU emits them: cuBLAS(Lt) / cuDNN custom calls, Triton GEMM
  fusions, plain dots.  Our own FFI communication kernels (``weave_*``) are not compute."""
  if "weave_" in rhs:
    return False
  if opcode == "custom-call":
    return bool(re.search(r"cublas|cudnn", rhs))
  if opcode == "fusion":
    return "gemm" in name or "dot" in name
  return opcode in ("dot", "convolution")


@dataclasses.dataclass
class Window:
  kind: str            # e.g. "all-reduce"
  name: str            # HLO instruction name of the start
  compute_between: int # compute ops scheduled between start and done
  scope: str = ""      # op_name metadata (named-scope path) of the collective
  between: tuple[str, ...] = ()   # op_name of each compute op between start and done


def _op_name(rhs: str) -> str:
  m = re.search(r'op_name="([^"]*)"', rhs)
  return m.group(1) if m else ""


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


def collective_windows(hlo_text: str) -> list[Window]:
  """For every async collective (``*-start`` ... ``*-done``) in the entry computation, count
  the compute ops between them.  Synchronous collectives count as windows with 0 between."""
  lines = _entry_lines(hlo_text)
  open_: dict[str, tuple[str, int, str]] = {}
  windows: list[Window] = []
  compute: list[str] = []   # op_names of the compute ops seen so far
  for line in lines:
    if "=" not in line:
      continue
    lhs, rhs = line.split("=", 1)
    name = lhs.removeprefix("ROOT").strip().lstrip("%")
    op = _opcode(rhs)
    m = _COLLECTIVE.match(op)
    if m and m.group(2) == "-start":
      open_[name] = (m.group(1), len(compute), _op_name(rhs))
    elif m and m.group(2) == "-done":
      start = re.search(r"-done\(%?([\w.\-]+)", rhs)
      start = start.group(1) if start else name
      kind, seen, scope = open_.pop(start, (m.group(1), len(compute), _op_name(rhs)))
      between = tuple(compute[seen:])
      windows.append(Window(kind, start, len(between), scope, between))
    elif m:
      windows.append(Window(m.group(1), name, 0, _op_name(rhs)))
    elif _is_compute(name, op, rhs):
      compute.append(_op_name(rhs))
  return windows


def summary(hlo_text: str) -> str:
  ws = collective_windows(hlo_text)
  overlapped = sum(w.compute_between > 0 for w in ws)
  by_kind: dict[str, int] = {}
  for w in ws:
    by_kind[w.kind] = by_kind.get(w.kind, 0) + 1
  return (f"{len(ws)} collectives {by_kind}; {overlapped} have compute scheduled between start "
          f"and done; compute-between per collective: {[w.compute_between for w in ws]}")


_PASS_THROUGH = {"get-tuple-element", "tuple", "opt-barrier", "bitcast"}


def copies_of_outputs(hlo_text: str, target: str) -> list[str]:
  """Names of the ``copy`` / ``copy-start`` instructions (any computation) that read an output
  of a custom call to ``target``, directly or through get-tuple-element, tuple, opt-barrier or
  bitcast."""
  defs = {}
  for line in hlo_text.splitlines():
    lhs, eq, rhs = line.strip().partition(" = ")
    if eq:
      defs[lhs.removeprefix("ROOT").strip().lstrip("%")] = rhs
  uses = lambda rhs, names: any(
      re.search(rf"%?(?<![\w.\-]){re.escape(n)}(?![\w.\-])", rhs.split("(", 1)[-1]) for n in names)
  derived = {n for n, rhs in defs.items()
             if _opcode(rhs) == "custom-call" and f'custom_call_target="{target}"' in rhs}
  grew = True
  while grew:
    new = {n for n, rhs in defs.items() if n not in derived and _opcode(rhs) in _PASS_THROUGH
           and uses(rhs, derived)}
    derived |= new
    grew = bool(new)
  return [n for n, rhs in defs.items() if _opcode(rhs) in ("copy", "copy-start")
          and uses(rhs, derived)]

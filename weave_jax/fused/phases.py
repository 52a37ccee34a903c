"""Phase stamps of the fused kernels: where a call's time goes, per block.

Nsight Compute cannot profile these kernels (its replay serializes the launches that the
barriers pair), so the kernels themselves can stamp ``%globaltimer`` at their phase boundaries.
Stamps are off by default; with them on, thread 0 of every block writes one 8-byte host-mapped
word per point after a ``__syncthreads``, so a call gets slightly slower.  Each call overwrites
the stamps of the previous one, so read them after the call you want::

    phases.enable(ws, True)
    jax.block_until_ready(f(...))        # one fused call (the last one is what is recorded)
    print(phases.summary(phases.read(ws), "two_shot"))
    phases.enable(ws, False)

%globaltimer ticks in ns but may advance in steps of up to ~1 µs, so read phases of a few µs
with care.
"""
from __future__ import annotations

import ctypes
import statistics

import numpy as np

from weave_jax.fused import _lib
from weave_jax.fused.workspace import Workspace
from weave_jax.options import MAX_CTAS  # kMaxCtas: one row of stamps per block

STAMPS = 8   # kStamps in ffi/fused_reduce_add_norm.cuh

# Each kernel's stamp points in order: "start", then the phase that ends at each later point.
POINTS = {
    "two_shot": ("start", "phase 0 push", "barrier 0", "phase 1 reduce+norm", "barrier 1",
                 "phase 2 copy-out"),
    "one_shot": ("start", "push", "barrier", "reduce+norm"),
}


def _ordinals(ws: Workspace) -> tuple[int, ...]:
  ws.require_open("phase stamps")
  return ws.ordinals


def enable(ws: Workspace, on: bool = True) -> None:
  """Turns stamping on (clearing old stamps) or off for every local device's next launches."""
  lib = _lib.load()
  for o in _ordinals(ws):
    if lib.weave_ws_set_stamps(o, int(bool(on))) != 0:
      raise RuntimeError(f"phase stamps: device {o} has no workspace")


def read(ws: Workspace) -> dict[int, np.ndarray]:
  """{CUDA ordinal: uint64 array (MAX_CTAS, STAMPS) of ns; 0 where a block recorded nothing}.
  Call after the device finished (e.g. after jax.block_until_ready)."""
  lib = _lib.load()
  out = {}
  for o in _ordinals(ws):
    buf = (ctypes.c_uint64 * (MAX_CTAS * STAMPS))()
    if lib.weave_ws_read_stamps(o, buf, len(buf)) < 0:
      raise RuntimeError(f"phase stamps: device {o} has no workspace")
    out[o] = np.frombuffer(buf, dtype=np.uint64).reshape(MAX_CTAS, STAMPS).copy()
  return out


def summary(stamps: dict[int, np.ndarray], algorithm: str) -> dict[str, float]:
  """Median over the blocks of every device of each phase's µs, plus ``span``: the first
  block's start to the last block's end on the slowest device.

  Blocks that recorded every point of ``algorithm`` count; raises if none did."""
  if algorithm not in POINTS:
    raise ValueError(f"phase stamps: algorithm {algorithm!r} not in {sorted(POINTS)}")
  points = POINTS[algorithm]
  n = len(points)
  durations = [[] for _ in range(n - 1)]
  spans = []
  for arr in stamps.values():
    blocks = arr[:, :n].astype(np.int64)
    blocks = blocks[(blocks > 0).all(axis=1)]
    if len(blocks) == 0:
      continue
    spans.append((blocks[:, -1].max() - blocks[:, 0].min()) / 1e3)
    for k in range(n - 1):
      durations[k].extend(((blocks[:, k + 1] - blocks[:, k]) / 1e3).tolist())
  if not spans:
    raise ValueError(f"phase stamps: no block recorded all {n} points of {algorithm}")
  out = {points[k + 1]: statistics.median(durations[k]) for k in range(n - 1)}
  out["span"] = max(spans)
  return out

"""The one place where the Pallas Mosaic GPU API differs between jax 0.11.2 (the GPU machines)
and the newest jax (CPU development).

Kernels import ``pl`` and ``plgpu`` from here and call the helpers below instead of the
version-specific names.  Every API the kernels use that is *not* listed here has the same name
and signature in both versions (checked against both wheels' sources, 2026-12-07):
``plgpu.kernel``, ``SMEM``, ``Barrier``, ``ACC``, ``TilingTransform``, ``SwizzleTransform``,
``Layout``, ``copy_gmem_to_smem``, ``copy_smem_to_gmem``, ``barrier_wait``, ``wgmma``,
``commit_smem``, ``wait_smem_to_gmem``, ``broadcasted_iota``, ``layout_cast``,
``CompilerParams``.
"""
from __future__ import annotations

import inspect

try:
  # jax >= 0.12: ``jax.pallas`` is the preferred path; ``jax.experimental.pallas`` is an alias.
  from jax import pallas as pl
  from jax.pallas import mosaic_gpu as plgpu
except ImportError:
  # jax 0.11.2 only has the experimental paths.
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

# jax 0.11.2's ``plgpu.load(src, idx, *, layout)`` took an index; newer jax dropped it.
_LOAD_TAKES_IDX = "idx" in inspect.signature(plgpu.load).parameters


def load(ref, *, layout):
  """``ref[...]`` into registers with an explicit fragmented ``layout``."""
  if _LOAD_TAKES_IDX:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


__all__ = ["pl", "plgpu", "load"]

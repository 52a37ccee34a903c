"""The one place where the Pallas Mosaic GPU API differs between jax 0.11.2 (the GPU machines)
and the newest jax (0.12.1 here); kernels import ``pl`` and ``plgpu`` from this module only.

Compared on 2026-12-07 from both versions' public signatures (``inspect.signature`` and
dataclass fields of every name the kernels use):

* import path: 0.12 adds ``jax.pallas`` / ``jax.pallas.mosaic_gpu`` (the ``jax.experimental``
  paths become aliases); 0.11.2 has only ``jax.experimental.pallas[.mosaic_gpu]`` -- resolved
  below.
* ``plgpu.load``: 0.11.2 takes ``(src, idx, *, layout)``, 0.12 drops ``idx`` -- not used by the
  kernels (they load with ``ref[...]``, whose default layout after a swizzled, tiled SMEM ref is
  the WGMMA layout in both versions).
* ``plgpu.kernel(cost_estimate=)``, ``CompilerParams(is_multi_process=, collective_id=)``,
  ``InterpretGPUParams(on_race=)`` and ``bool`` predicates on copies / arrives exist only in
  0.12 -- not used.
* The Mosaic GPU interpreter (``interpret=plgpu.InterpretGPUParams()``) of 0.11.2 has no rule
  for ``pl.run_state`` (the wgmma accumulator scope), so kernels using it interpret only on
  0.12; both versions lower them for CUDA.

Every other name the kernels use has the same signature in both: ``plgpu.kernel``, ``SMEM``,
``Barrier``, ``ACC``, ``TilingTransform``, ``SwizzleTransform``, ``Layout``,
``copy_gmem_to_smem``, ``copy_smem_to_gmem``, ``barrier_wait``, ``barrier_arrive``, ``wgmma``,
``commit_smem``, ``wait_smem_to_gmem``, ``broadcasted_iota``, ``layout_cast``,
``set_max_registers``, ``CompilerParams(approx_math=)``, ``InterpretGPUParams()``, and
``pl.ds``, ``pl.when``, ``pl.loop``, ``pl.run_scoped``, ``pl.run_state``, ``pl.cdiv``.
"""
from __future__ import annotations

try:
  from jax import pallas as pl                    # jax >= 0.12: the preferred path
  from jax.pallas import mosaic_gpu as plgpu
except ImportError:
  from jax.experimental import pallas as pl       # jax 0.11.2: the only path
  from jax.experimental.pallas import mosaic_gpu as plgpu

__all__ = ["pl", "plgpu"]

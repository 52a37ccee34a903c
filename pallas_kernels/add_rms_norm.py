"""Residual add + RMSNorm as one Pallas GPU (Triton-lowered) kernel.

This is the step that follows every reduce-scatter in the ``rs_ag`` backend
(``weave_jax.comm.xla.ReduceScatterAllGather``), with the semantics of
``weave_jax.comm.base.add_norm``:

    x      = (reduced.astype(f32) + residual.astype(f32)).astype(d)    # new_residual, (T, H)
    xf     = x.astype(f32)                                             # the *rounded* sum
    normed = (weight.astype(f32) * (xf * rsqrt(mean(xf**2, -1) + eps))).astype(d)

where ``d`` is the residual (and weight) dtype.  The norm reads the rounded ``x`` on purpose:
that rounded value is the new residual stream, as in Hugging Face.

Layout: a 1-D grid over row blocks.  Program ``i`` owns rows ``[i*R, (i+1)*R)`` (``R`` =
``block_rows``) and the whole hidden dimension, so one HBM read of each input and one write of
each output per element; the row reduction happens in registers.  Triton needs power-of-2
tensor shapes, so the block is ``(R, Hp)`` with ``Hp = next_power_of_2(H)``; columns ``>= H``
and rows ``>= T`` are masked on every load (``other=0``, so they add nothing to the sum of
squares) and on every store.  Hence any ``H`` in ``1..16384`` works and ``T`` need not be a
multiple of ``R``.  The masks are explicit (not left to the lowering) because jax 0.11's Triton
lowering does not add bounds masks for partial blocks.

Benchmark on a GPU against the XLA-fused reference: ``python pallas_kernels/add_rms_norm.py``.
"""
from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import numpy as np

_OP = "add_rms_norm"
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
#: Largest hidden size: one row of H float32 values must fit in the registers of one program.
MAX_HIDDEN = 16384
#: Cap on R * next_power_of_2(H) elements per program (register budget of 16 warps).
MAX_BLOCK_ELEMS = 16384
#: Default block size in elements: small H gets several rows per program so that each program
#: still moves a few tens of KiB; H >= 4096 gets one row per program.
_TARGET_BLOCK_ELEMS = 4096
_MAX_DEFAULT_ROWS = 16


def add_rms_norm_reference(reduced: jax.Array, residual: jax.Array, weight: jax.Array, *,
                           eps: float) -> tuple[jax.Array, jax.Array]:
  """Plain jnp version; same op order as ``weave_jax.comm.base.add_norm``.

  Returns ``(normed, new_residual)``, both (T, H) in ``residual.dtype``.
  """
  dtype = residual.dtype
  new_residual = (reduced.astype(jnp.float32) + residual.astype(jnp.float32)).astype(dtype)
  xf = new_residual.astype(jnp.float32)                       # (T, H)
  var = jnp.mean(xf * xf, axis=-1, keepdims=True)             # (T, 1)
  y = xf * lax.rsqrt(var + eps)
  return (weight.astype(jnp.float32) * y).astype(dtype), new_residual


def _add_rms_norm_kernel(reduced_ref, residual_ref, weight_ref, *refs,
                         eps: float, num_rows: int, hidden: int):
  # refs: [poison inputs aliased to the outputs (ignored)...,] normed_ref, new_residual_ref.
  normed_ref, new_residual_ref = refs[-2:]
  block_rows, block_cols = reduced_ref.shape                  # (R, Hp)
  rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
  cols = jnp.arange(block_cols)
  col_ok = cols < hidden                                      # (Hp,)
  mask = (rows < num_rows)[:, None] & col_ok[None, :]         # (R, Hp)

  r = plgpu.load(reduced_ref, mask=mask, other=0.0).astype(jnp.float32)
  s = plgpu.load(residual_ref, mask=mask, other=0.0).astype(jnp.float32)
  x = (r + s).astype(new_residual_ref.dtype)                  # (R, Hp) the new residual
  plgpu.store(new_residual_ref, x, mask=mask)

  xf = x.astype(jnp.float32)
  var = jnp.sum(xf * xf, axis=1) / hidden                     # (R,) masked columns are 0
  y = xf * lax.rsqrt(var + eps)[:, None]
  w = plgpu.load(weight_ref, mask=col_ok, other=0.0).astype(jnp.float32)  # (Hp,)
  plgpu.store(normed_ref, (w[None, :] * y).astype(normed_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("eps", "block_rows", "num_warps", "interpret"))
def _launch(reduced, residual, weight, poison, *, eps: float, block_rows: int, num_warps: int,
            interpret: bool):
  """``poison``: None, or (normed, new_residual)-shaped buffers aliased to the outputs, so that
  any element the kernel fails to write keeps its poison value (tests only)."""
  tokens, hidden = reduced.shape
  hp = pl.next_power_of_2(hidden)
  row_spec = pl.BlockSpec((block_rows, hp), lambda i: (i, 0))
  out_shape = [jax.ShapeDtypeStruct((tokens, hidden), residual.dtype)] * 2
  extra = () if poison is None else tuple(poison)
  kernel = functools.partial(_add_rms_norm_kernel, eps=eps, num_rows=tokens, hidden=hidden)
  normed, new_residual = pl.pallas_call(
      kernel,
      grid=(pl.cdiv(tokens, block_rows),),
      in_specs=[row_spec, row_spec, pl.BlockSpec((hp,), lambda i: (0,))]
      + [row_spec] * len(extra),
      out_specs=[row_spec, row_spec],
      out_shape=out_shape,
      input_output_aliases={3 + k: k for k in range(len(extra))},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name=_OP,
  )(reduced, residual, weight, *extra)
  return normed, new_residual


def _validate(reduced, residual, weight, eps, block_rows):
  if reduced.ndim != 2 or residual.ndim != 2 or weight.ndim != 1:
    raise ValueError(f"{_OP}: expected reduced (T, H), residual (T, H), weight (H,), got "
                     f"{reduced.shape}, {residual.shape}, {weight.shape}")
  tokens, hidden = reduced.shape
  if residual.shape != reduced.shape:
    raise ValueError(f"{_OP}: residual shape {residual.shape} != reduced shape {reduced.shape}")
  if weight.shape != (hidden,):
    raise ValueError(f"{_OP}: weight shape {weight.shape} != ({hidden},)")
  if tokens < 1:
    raise ValueError(f"{_OP}: tokens={tokens} must be >= 1")
  if not 1 <= hidden <= MAX_HIDDEN:
    raise ValueError(f"{_OP}: hidden={hidden} outside 1..{MAX_HIDDEN}")
  if reduced.dtype not in _DTYPES:
    raise TypeError(f"{_OP}: reduced dtype {reduced.dtype} not float32 or bfloat16")
  if residual.dtype not in _DTYPES:
    raise TypeError(f"{_OP}: residual dtype {residual.dtype} not float32 or bfloat16")
  if weight.dtype != residual.dtype:
    raise TypeError(f"{_OP}: weight dtype {weight.dtype} != residual dtype {residual.dtype}")
  if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
    raise TypeError(f"{_OP}: eps must be a Python float (static), got {type(eps).__name__}")
  if not (math.isfinite(eps) and eps >= 0):
    raise ValueError(f"{_OP}: eps={eps} must be finite and >= 0")
  if block_rows is not None:
    hp = pl.next_power_of_2(hidden)
    if (isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer))
        or block_rows < 1 or block_rows & (block_rows - 1)):
      raise ValueError(f"{_OP}: block_rows={block_rows!r} must be a power of 2 >= 1")
    if block_rows * hp > MAX_BLOCK_ELEMS:
      raise ValueError(f"{_OP}: block_rows={block_rows} * next_power_of_2(H)={hp} exceeds "
                       f"{MAX_BLOCK_ELEMS} elements per program")


def _default_block_rows(tokens: int, hidden: int) -> int:
  hp = pl.next_power_of_2(hidden)
  rows = max(1, min(_MAX_DEFAULT_ROWS, _TARGET_BLOCK_ELEMS // hp))
  return min(rows, pl.next_power_of_2(tokens))   # no wholly-masked rows for tiny T


def _num_warps(block_elems: int) -> int:
  # ~16-32 float32 values per thread per live (R, Hp) tensor; 4..16 warps.
  return min(max(block_elems // 512, 4), 16)


def add_rms_norm(reduced: jax.Array, residual: jax.Array, weight: jax.Array, *, eps: float,
                 block_rows: int | None = None, interpret: bool = False,
                 ) -> tuple[jax.Array, jax.Array]:
  """Fused residual add + RMSNorm: ``weave_jax.comm.base.add_norm`` as one Pallas kernel.

  Args:
    reduced: (T, H) float32 or bfloat16, the already-reduced sublayer output (e.g. this rank's
      reduce-scatter shard).
    residual: (T, H) float32 or bfloat16 (``d``), the residual stream.
    weight: (H,) dtype ``d``, the RMSNorm scale.
    eps: RMSNorm epsilon, a static Python float >= 0.
    block_rows: rows per program, a power of 2 with ``block_rows * next_power_of_2(H) <=
      16384``; None picks ``min(16, 4096 // next_power_of_2(H))`` (at least 1, at most
      ``next_power_of_2(T)``).  T need not be a multiple of it.
    interpret: run the kernel with the Pallas interpreter (any backend, e.g. CPU tests).

  Returns:
    ``(normed, new_residual)``, both (T, H) dtype ``d``:
    ``new_residual = (reduced.astype(f32) + residual.astype(f32)).astype(d)`` and
    ``normed = (weight.astype(f32) * x * rsqrt(mean(x**2, -1) + eps)).astype(d)`` with
    ``x = new_residual.astype(f32)``.

  H may be any value in 1..16384: the block is padded to a power of 2 and masked.
  """
  _validate(reduced, residual, weight, eps, block_rows)
  return _call(reduced, residual, weight, None, eps=eps, block_rows=block_rows,
               interpret=interpret)


def _call(reduced, residual, weight, poison, *, eps, block_rows, interpret):
  tokens, hidden = reduced.shape
  if block_rows is None:
    block_rows = _default_block_rows(tokens, hidden)
  num_warps = _num_warps(int(block_rows) * pl.next_power_of_2(hidden))
  return _launch(reduced, residual, weight, poison, eps=float(eps), block_rows=int(block_rows),
                 num_warps=num_warps, interpret=bool(interpret))


def _run_example():
  """Times the kernel against the XLA-fused reference on the default GPU: median of many runs."""
  if jax.default_backend() != "gpu":
    raise SystemExit(f"{_OP}: _run_example needs a GPU, default backend is "
                     f"{jax.default_backend()!r}")
  # Each run enqueues `batch` calls back to back and waits once, so that host dispatch overlaps
  # the GPU work and the per-call time is GPU-bound; the median over `runs` is reported.
  eps, runs, batch, warmup = 1e-6, 100, 10, 20
  ref = jax.jit(add_rms_norm_reference, static_argnames="eps")
  fast = jax.jit(add_rms_norm, static_argnames=("eps", "block_rows", "interpret"))

  def median_us(fn, *args):
    for _ in range(warmup):
      jax.block_until_ready(fn(*args, eps=eps))
    times = []
    for _ in range(runs):
      t0 = time.perf_counter()
      outs = [fn(*args, eps=eps) for _ in range(batch)]
      jax.block_until_ready(outs)
      times.append((time.perf_counter() - t0) / batch)
    return float(np.median(times)) * 1e6

  print(f"{_OP} vs XLA reference on {jax.devices()[0].device_kind}")
  print(f"{'T':>6} {'H':>6} {'reduced':>8} {'d':>8} | {'pallas us':>9} {'GB/s':>7} | "
        f"{'xla us':>9} {'GB/s':>7} | max|diff| normed")
  for tokens, hidden, red_dtype, dtype in [
      (512, 4096, jnp.float32, jnp.bfloat16), (2048, 4096, jnp.float32, jnp.bfloat16),
      (8192, 4096, jnp.float32, jnp.bfloat16), (2048, 8192, jnp.float32, jnp.bfloat16),
      (2048, 5120, jnp.bfloat16, jnp.bfloat16), (2048, 896, jnp.float32, jnp.bfloat16),
      (1024, 16384, jnp.float32, jnp.bfloat16), (2048, 4096, jnp.float32, jnp.float32)]:
    k1, k2, k3 = jax.random.split(jax.random.key(tokens * 31 + hidden), 3)
    reduced = jax.random.normal(k1, (tokens, hidden), red_dtype)
    residual = jax.random.normal(k2, (tokens, hidden), dtype)
    weight = (1.0 + 0.1 * jax.random.normal(k3, (hidden,), jnp.float32)).astype(dtype)
    got, want = fast(reduced, residual, weight, eps=eps), ref(reduced, residual, weight, eps=eps)
    diff = float(jnp.max(jnp.abs(got[0].astype(jnp.float32) - want[0].astype(jnp.float32))))
    nbytes = (reduced.nbytes + residual.nbytes + 2 * residual.nbytes + weight.nbytes)
    t_fast = median_us(fast, reduced, residual, weight)
    t_ref = median_us(ref, reduced, residual, weight)
    print(f"{tokens:>6} {hidden:>6} {jnp.dtype(red_dtype).name:>8} {jnp.dtype(dtype).name:>8} | "
          f"{t_fast:9.1f} {nbytes / t_fast / 1e3:7.0f} | {t_ref:9.1f} {nbytes / t_ref / 1e3:7.0f}"
          f" | {diff:.3g}")


if __name__ == "__main__":
  _run_example()

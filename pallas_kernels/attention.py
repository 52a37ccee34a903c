"""Ragged paged attention: the one entry point the serving engine calls, and the choice of kernel.

    out = ragged_paged_attention(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc,
                                 num_seqs, sm_scale=None, impl="auto")          # (T, N, D)

Implementations (layout and semantics: ``pallas_kernels.paged_attention_ref``):

    "reference"  float32 jnp on gathered pages, any device; memory bounded, slow
    "triton"     Triton kernel through jax-triton (``ragged_paged_attention_triton``), NVIDIA GPUs
    "mosaic"     Pallas Mosaic GPU kernel (``ragged_paged_attention_mosaic``), Hopper (sm_90)
    "auto"       CPU -> reference; GPU -> the first kernel of the device's preference order that
                 is listed in ``VERIFIED`` for its architecture and can run here; none -> the
                 reference, with one loud warning.

``VERIFIED`` is the record of which kernel passed ``run/check_attention_gpu.py`` on which
architecture: "auto" never picks an unverified kernel.  Edit it after a GPU check passes.

Input checks: shapes and dtypes always (``check_shapes``, tracers included); values only when
the metadata arrives as host numpy arrays (``check_metadata``).  Inside a jitted step the
metadata is traced and cannot be inspected: the serving engine builds it on the host and
validates it there before the step runs.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.paged_attention_ref import (check_metadata, check_shapes,
                                                ragged_paged_attention_reference)

_OP = "ragged_paged_attention"
IMPLS = ("auto", "reference", "triton", "mosaic")

#: Kernels that passed ``run/check_attention_gpu.py`` (every layout within tolerance), by GPU
#: architecture.  Only these are candidates for impl="auto".  Add an impl after its check passes
#: on that architecture (state the date and device in the commit).
VERIFIED: dict[str, tuple[str, ...]] = {
    "sm_90": ("mosaic", "triton"),     # H100, 432 kernel-layouts, 2026-12-07
    "sm_89": (),
    "sm_80": (),
}

#: impl="auto" on a GPU: preference order by architecture (fastest expected first).
PREFERENCE: dict[str, tuple[str, ...]] = {
    "sm_90": ("mosaic", "triton"),
    "sm_89": ("triton",),
    "sm_80": ("triton",),
}


def device_arch(device=None) -> str:
  """'cpu', or 'sm_XY' for an NVIDIA GPU of compute capability X.Y (first device by default)."""
  device = device or jax.devices()[0]
  if device.platform != "gpu":
    return device.platform
  major, _, minor = str(getattr(device, "compute_capability", "0.0")).partition(".")
  return f"sm_{major}{minor or 0}"


def unavailable_reason(impl: str, arch: str, dtype: str = "bfloat16") -> str | None:
  """Why ``impl`` cannot run on ``arch`` for inputs of ``dtype`` here, or None when it can."""
  if impl == "reference":
    return None
  if impl not in ("triton", "mosaic"):
    raise ValueError(f"{_OP}: impl={impl!r} is not one of {IMPLS}")
  if not arch.startswith("sm_"):
    return f"it needs an NVIDIA GPU and the device is {arch}"
  if dtype not in ("bfloat16", "float16"):     # the inputs first: no install changes this
    return f"it supports bfloat16/float16, the inputs are {dtype}"
  if impl == "triton":
    if int(arch[3:]) < 80:
      return f"it needs sm_80 or newer, the device is {arch}"
    for module in ("triton", "jax_triton"):
      if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (`pip install weave_jax[triton]`)"
    return None
  if arch != "sm_90":
    return f"Mosaic GPU (TMA, wgmma) needs Hopper sm_90, the device is {arch}"
  try:
    mosaic_kernel()
  except ImportError as err:
    return str(err)
  return None


def mosaic_kernel():
  """``ragged_paged_attention_mosaic`` (imported on first use: CPU users never load Mosaic GPU)."""
  try:
    from pallas_kernels.ragged_paged_attention_mosaic import ragged_paged_attention_mosaic
  except ImportError as err:
    raise ImportError(f"the Mosaic GPU kernel does not import here: {err}") from err
  return ragged_paged_attention_mosaic


@functools.cache
def resolve_impl(impl: str, arch: str, dtype: str = "bfloat16") -> str:
  """The concrete implementation that ``impl`` means on ``arch`` for ``dtype`` inputs (warns
  once per fallback)."""
  if impl not in IMPLS:
    raise ValueError(f"{_OP}: impl={impl!r} is not one of {IMPLS}")
  if impl != "auto":
    reason = unavailable_reason(impl, arch, dtype)
    if reason:
      raise ValueError(f"{_OP}: impl={impl!r} cannot run here: {reason}")
    return impl
  if not arch.startswith("sm_"):
    return "reference"
  verified = VERIFIED.get(arch, ())
  for candidate in PREFERENCE.get(arch, ("triton",)):
    if candidate in verified and unavailable_reason(candidate, arch, dtype) is None:
      return candidate
  warnings.warn(f"{_OP}: no attention kernel is verified and runnable on {arch} for {dtype} "
                f"(VERIFIED[{arch!r}] = {verified}); impl='auto' falls back to the float32 jnp "
                "reference (slow: every query row gathers its request's pages)", stacklevel=3)
  return "reference"


def _kernel(impl: str):
  if impl == "reference":
    return ragged_paged_attention_reference
  if impl == "triton":
    from pallas_kernels.ragged_paged_attention_triton import ragged_paged_attention_triton
    return ragged_paged_attention_triton
  return mosaic_kernel()


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc, num_seqs,
                           *, sm_scale: float | None = None, impl: str = "auto") -> jax.Array:
  """Causal attention of a ragged batch of new tokens over a paged KV cache.

  Args:
    q: (T, N, D) query tokens of all requests, request i in rows
      query_start_loc[i]:query_start_loc[i + 1]; rows from query_start_loc[num_seqs] on are
      padding (output 0).
    k_pages, v_pages: (P, page, K, D) the layer's cache, same dtype as q.
    kv_lens: (S,) int32 tokens of each request in the cache, this step's included.
    block_tables: (S, M) int32 page ids of each request.
    query_start_loc: (S + 1,) int32.
    num_seqs: int32 scalar, requests present (rows >= num_seqs are padding).
    sm_scale: softmax scale (default 1/sqrt(D)).
    impl: "auto" | "reference" | "triton" | "mosaic" (see the module docstring).

  Returns:
    (T, N, D) in q.dtype.
  """
  check_shapes(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc)
  host = (kv_lens, block_tables, query_start_loc, num_seqs)
  if all(isinstance(a, (np.ndarray, np.integer, int)) for a in host):
    check_metadata(kv_lens, block_tables, query_start_loc, int(num_seqs),
                   num_pages=k_pages.shape[0], page_size=k_pages.shape[1],
                   num_tokens=q.shape[0])
  chosen = resolve_impl(impl, device_arch(), jnp.dtype(q.dtype).name)
  return _kernel(chosen)(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc, num_seqs,
                         sm_scale=sm_scale)

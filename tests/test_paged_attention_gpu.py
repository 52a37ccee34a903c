"""Ragged paged attention kernels on one GPU: every impl present (Triton always; Mosaic on
Hopper) against the float32 reference on random ragged layouts with NaN-poisoned unused slots
and pages.

The full check (216 layouts, every config and kind) is ``python run/check_attention_gpu.py``;
this runs a sample of it.  A missing jax-triton fails here (it is a failure of the Triton impl).
"""
from __future__ import annotations

import pathlib

import pytest
from conftest import load_module

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_check():
  return load_module(ROOT / "run" / "check_attention_gpu.py", "check_attention_gpu")


@pytest.mark.gpu
def test_attention_kernels_match_the_reference_on_random_layouts():
  check = _load_check()
  configs = (check.CONFIGS[0], check.CONFIGS[2])                   # bf16 page 16, fp16 page 64
  rows = check.run_check(num_layouts=4 * len(configs) * len(check.KINDS), seed=1,
                         configs=configs)
  check.print_table(rows)
  assert {r["impl"] for r in rows} >= {"triton"}
  failures = [f"{r['impl']} {r['config']} {r['kind']}: {f}" for r in rows for f in r["failures"]]
  assert not failures, "\n".join(failures[:10])


@pytest.mark.gpu
def test_auto_picks_a_verified_kernel_or_warns():
  from pallas_kernels import attention
  arch = attention.device_arch()
  attention.resolve_impl.cache_clear()
  verified = attention.VERIFIED.get(arch, ())
  if verified:
    assert attention.resolve_impl("auto", arch) in verified
  else:
    with pytest.warns(UserWarning, match="no attention kernel is verified"):
      assert attention.resolve_impl("auto", arch) == "reference"
  attention.resolve_impl.cache_clear()

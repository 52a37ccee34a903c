"""run/bench_attention.py on CPU: its options, the decode rows' bandwidth fractions (the copy
rate of the same run and the datasheet figure), and the chart.  The kernels themselves need a
GPU; the jnp reference stands in for them here.  Timings are never asserted."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import ROOT, load_module


@pytest.fixture(scope="module")
def bench_attention():
  return load_module(ROOT / "run" / "bench_attention.py", "bench_attention")


def test_quick_keeps_32_calls_per_timed_jit(bench_attention):
  args = bench_attention.parse_args(["--quick"])
  assert (args.inner, args.iters) == (32, 8)
  assert args.batches == [1, 16, 64, 256] and args.contexts == [4096, 16384]
  assert bench_attention.parse_args(["--inner", "4"]).inner == 4


def test_decode_rows_divide_by_the_copy_rate_and_the_datasheet(bench_attention):
  args = bench_attention.parse_args(["--batches", "2", "--contexts", "48", "--pages", "16",
                                     "--inner", "2", "--iters", "1"])
  rows = bench_attention.decode_rows(args, [], 100.0, 400.0, np.random.default_rng(0),
                                     jax.random.key(0))
  (row,) = rows
  assert row["impl"] == "reference" and (row["batch"], row["context"]) == (2, 48)
  assert row["bytes"] == 2 * 2 * 48 * 8 * 128 * 2 + 2 * 2 * 32 * 128 * 2
  for prefix in ("", "device_"):                # wall time, and the traced device span
    assert row[prefix + "ms"] > 0
    assert row[prefix + "gbps"] == pytest.approx(row["bytes"] / (row[prefix + "ms"] * 1e-3) / 1e9)
    assert row[prefix + "frac_of_copy"] == pytest.approx(row[prefix + "gbps"] / 100.0)
    assert row[prefix + "frac_of_datasheet"] == pytest.approx(row[prefix + "gbps"] / 400.0)
  text = bench_attention._fmt(row, "gbps")
  assert "of copy" in text and "of datasheet" in text and "device" in text

  args.device_time = False
  (no_sheet,) = bench_attention.decode_rows(args, [], 100.0, None, np.random.default_rng(0),
                                            jax.random.key(0))
  assert "frac_of_datasheet" not in no_sheet and "device_ms" not in no_sheet
  assert "datasheet" not in bench_attention._fmt(no_sheet, "gbps")


def _count(compiled_text: str, op: str, attribute: str = "") -> int:
  return sum(1 for line in compiled_text.splitlines() if f" {op}(" in line and attribute in line)


def test_chains_keep_every_call(bench_attention):
  """The barriers stop XLA from merging identical calls (the first two included) or hoisting
  the reference's page gathers (K and V, whole pages) out of the chain: n chained calls
  compile to 2 n of them."""
  step = bench_attention.build_step(np.random.default_rng(0), [3, 1], [40, 20], 16,
                                    jax.random.key(0))
  page_gathers = [_count(bench_attention.looped("reference", n).lower(*step).compile().as_text(),
                         "gather", "slice_sizes={1,16,8,128}") for n in (1, 2, 3)]
  assert page_gathers == [2, 4, 6]

  def dense(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)
  q = jax.numpy.ones((1, 8, 32, 128), jax.numpy.float32)
  kv = jax.numpy.ones((1, 8, 8, 128), jax.numpy.float32)
  dots = [_count(bench_attention.chained_dense(dense, n).lower(q, kv, kv).compile().as_text(),
                 "dot") for n in (1, 2, 3)]
  assert dots[0] > 0 and dots == [dots[0], 2 * dots[0], 3 * dots[0]]


def test_chains_share_the_step_metadata_and_repeat_the_per_call_work(bench_attention):
  """As in the engine's layers: what reads only the metadata is computed once per chain, what
  reads q or the pages once per call.  A sort marks each kind of work."""
  jnp = jax.numpy

  def fn(q, k_pages, v_pages, kv_lens, block_tables, qsl, num_seqs):
    meta = jnp.sort(block_tables, axis=-1)[0, 0] + num_seqs + kv_lens[0] + qsl[0]
    per_call = jnp.sort(q, axis=-1) + jnp.sort(k_pages, axis=-1)[0, 0, 0, 0]
    return per_call + v_pages[0, 0, 0, 0] + meta.astype(q.dtype)

  step = bench_attention.build_step(np.random.default_rng(0), [3, 1], [40, 20], 16,
                                    jax.random.key(0))
  sorts = [_count(bench_attention.chained(fn, n).lower(*step).compile().as_text(), "sort")
           for n in (1, 2, 3)]
  assert sorts == [1 + 2 * 1, 1 + 2 * 2, 1 + 2 * 3]


def test_datasheet_table_knows_the_users_cards(bench_attention):
  table = bench_attention.DATASHEET_HBM_GBPS
  assert table["NVIDIA H100 80GB HBM3"] == 3350.0 and table["NVIDIA H200"] == 4800.0


def test_chart_draws_both_ceilings(bench_attention, tmp_path):
  pytest.importorskip("matplotlib", reason="the chart is optional: the JSON has every number")
  decode = [dict(impl="mosaic", batch=16, page=16, context=c, gbps=g)
            for c, g in ((4096, 2100.0), (16384, 2700.0))]
  prefill = [dict(impl="mosaic", prefix=p, tflops=t) for p, t in ((0, 170.0), (4096, 380.0))]
  res = dict(decode=decode, prefill=prefill, chunk=2048, copy_gbps=2700.0,
             datasheet_gbps=3350.0, device="NVIDIA H100 80GB HBM3")
  path = tmp_path / "chart.png"
  bench_attention.plot(res, str(path))
  assert path.stat().st_size > 0


@pytest.mark.parametrize("script", ["attention_block_kv.py", "attention_splits.py"])
def test_experimental_attention_scripts_import_and_want_a_gpu(script):
  """They share run/bench_attention.py's helpers: an import catches a helper they lost."""
  module = load_module(ROOT / "experimental" / script, script[:-3])
  assert module.main([]) == 2

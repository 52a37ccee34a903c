"""Mosaic GPU ragged paged attention (``pallas_kernels.ragged_paged_attention_mosaic``)
against the float32 reference (``paged_attention_ref``).

CPU: input validation before launch; the XLA-side tile row mapping; lowering of the kernel for
the CUDA platform (the whole Pallas -> Mosaic GPU lowering incl. layout inference runs on the
host); and the kernel under the Mosaic GPU interpreter (simulated SMEM, TMA, barriers, wgmma)
against the reference.  GPU (``@pytest.mark.gpu``): the compiled kernel on many layouts.

Every cache page the requests do not use, and every slot of a used page at or beyond the
request's kv_len, holds NaN: any read of them that reaches the result shows up as NaN.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.paged_attention_ref import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention_mosaic import ragged_paged_attention_mosaic

# The module (its XLA-side helpers), not the function of the same name.
rpa = importlib.import_module("pallas_kernels.ragged_paged_attention_mosaic")

BF16, F16 = jnp.bfloat16, jnp.float16
#: Max |kernel - reference| for unit-normal inputs (the reference rounds once, the kernel
#: feeds P and V to the tensor cores in the input dtype).
ATOL = {jnp.dtype(BF16): 3e-2, jnp.dtype(F16): 1e-2}


def make_inputs(seed, q_lens, kv_lens, *, n, k, d, page, width, dtype=BF16, pad_tokens=3,
                pad_seqs=1):
  """A step of ``len(q_lens)`` requests plus ``pad_seqs`` padding rows (kv_len 0) and
  ``pad_tokens`` padding query rows; pages shuffled; unused pages and dead slots poisoned."""
  rng = np.random.default_rng(seed)
  s_live = len(q_lens)
  s = s_live + pad_seqs
  kv = np.zeros(s, np.int32)
  kv[:s_live] = kv_lens
  qsl = np.zeros(s + 1, np.int32)
  qsl[1:s_live + 1] = np.cumsum(q_lens)
  qsl[s_live + 1:] = qsl[s_live]
  t = int(qsl[-1]) + pad_tokens
  pool = s_live * width + 2
  perm = rng.permutation(pool)
  bt = np.full((s, width), -1, np.int32)
  used = -(-kv // page)
  start = 0
  for i in range(s_live):
    bt[i, :used[i]] = perm[start:start + used[i]]
    start += used[i]
  kp = rng.standard_normal((pool, page, k, d)).astype(np.float32)
  vp = rng.standard_normal((pool, page, k, d)).astype(np.float32)
  dead = np.ones(pool, bool)
  dead[bt[bt >= 0]] = False
  kp[dead] = vp[dead] = np.nan
  for i in range(s_live):
    if kv[i] % page:
      last = bt[i, kv[i] // page]
      kp[last, kv[i] % page:] = vp[last, kv[i] % page:] = np.nan
  q = rng.standard_normal((t, n, d)).astype(np.float32)
  return (jnp.asarray(q, dtype), jnp.asarray(kp, dtype), jnp.asarray(vp, dtype),
          jnp.asarray(kv), jnp.asarray(bt), jnp.asarray(qsl), jnp.int32(s_live))


def max_error(got, args, **kw):
  want = ragged_paged_attention_reference(*args, **kw)
  assert got.shape == want.shape and got.dtype == want.dtype
  assert not bool(jnp.isnan(got).any()), "NaN leaked from poisoned cache slots"
  return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))


# (name, q_lens, kv_lens, n, k, d, page, width, dtype, num_splits, consumers[, block_kv]):
# chunked prefill next to decodes, GQA ratios 1, 3, 4, 8, 16, every page size, both head dims,
# both dtypes, split-KV, one and two compute warpgroups, both KV step sizes (None: the kernel's
# defaults).
LAYOUTS = [
    ("mixed_g4_p16", [37, 1, 5, 1], [90, 33, 5, 300], 8, 2, 64, 16, 20, BF16, 1, 1),
    ("mixed_g4_p16_split4", [37, 1, 5, 1], [90, 33, 5, 300], 8, 2, 64, 16, 20, BF16, 4, 1),
    ("mixed_g4_p16_2wg", [37, 1, 5, 1], [90, 33, 5, 300], 8, 2, 64, 16, 20, BF16, 1, 2),
    ("g1_d128_p32_2wg", [70, 1], [100, 40], 2, 2, 128, 32, 4, BF16, None, 2),
    ("g3_p16_split2", [5, 1, 2], [150, 37, 2], 6, 2, 64, 16, 12, BF16, 2, 1),
    ("g3_p16_split2_2wg", [50, 1, 2], [150, 37, 2], 6, 2, 64, 16, 12, BF16, 2, 2),
    ("g16_p64_f16", [9, 2], [40, 130], 16, 1, 64, 64, 3, F16, None, None),
    ("g8_d128_p128_split3", [1, 1], [300, 129], 8, 1, 128, 128, 3, BF16, 3, 1),
    ("g8_prefill_long", [200, 1], [260, 2000], 32, 4, 128, 16, 128, BF16, None, None),
    ("g8_prefill_long_1wg", [200, 1], [260, 2000], 32, 4, 128, 16, 128, BF16, None, 1),
    ("decode_batch_g8_f16", [1] * 24, list(range(7, 7 + 24 * 41, 41)), 32, 4, 64, 32, 32, F16,
     None, None),
    ("g3_p16_split2_2wg_bkv128", [50, 1, 2], [150, 37, 2], 6, 2, 64, 16, 12, BF16, 2, 2, 128),
    ("mixed_g4_p32_bkv128", [37, 1, 5, 1], [90, 33, 5, 300], 8, 2, 64, 32, 20, BF16, 1, 1, 128),
    ("g8_prefill_long_bkv128", [200, 1], [260, 2000], 32, 4, 128, 16, 128, BF16, None, 2, 128),
]


def _layout_args(layout):
  name, q_lens, kv_lens, n, k, d, page, width, dtype, splits, consumers, *block_kv = layout
  args = make_inputs(len(name), q_lens, kv_lens, n=n, k=k, d=d, page=page, width=width,
                     dtype=dtype)
  return args, dict(num_splits=splits, consumers=consumers, block_kv=(block_kv or [None])[0])


def _layout(name):
  return next(layout for layout in LAYOUTS if layout[0] == name)


# ---------------------------------------------------------------- CPU: validation


def _small(dtype=BF16, d=64, page=16):
  return make_inputs(0, [3, 1], [20, 9], n=8, k=2, d=d, page=page, width=4, dtype=dtype)


@pytest.mark.parametrize("kwargs, match", [
    (dict(d=96), "head dim 96"),
    (dict(page=8), "page size 8"),
    (dict(page=48), "page size 48"),
    (dict(dtype=jnp.float32), "dtype float32"),
])
def test_unsupported_shapes_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ragged_paged_attention_mosaic(*_small(**kwargs))


def test_bad_metadata_raises_before_launch():
  q, kp, vp, kv, bt, qsl, ns = _small()
  with pytest.raises(ValueError, match=r"kv_lens\[0\]=2 is shorter"):
    ragged_paged_attention_mosaic(q, kp, vp, kv.at[0].set(2), bt, qsl, ns)
  with pytest.raises(ValueError, match="block_tables"):
    ragged_paged_attention_mosaic(q, kp, vp, kv, bt.at[0, 0].set(10_000), qsl, ns)
  with pytest.raises(ValueError, match="num_splits=0"):
    ragged_paged_attention_mosaic(q, kp, vp, kv, bt, qsl, ns, num_splits=0)
  with pytest.raises(ValueError, match="consumers=3"):
    ragged_paged_attention_mosaic(q, kp, vp, kv, bt, qsl, ns, consumers=3)
  with pytest.raises(ValueError, match="block_kv=96"):
    ragged_paged_attention_mosaic(q, kp, vp, kv, bt, qsl, ns, block_kv=96)
  with pytest.raises(ValueError, match="block_kv=64 .* page size 128"):
    ragged_paged_attention_mosaic(*_small(page=128), block_kv=64)
  with pytest.raises(ValueError, match="v_pages shape"):
    ragged_paged_attention_mosaic(q, kp, vp[:, :8], kv, bt, qsl, ns)


# ---------------------------------------------------------------- CPU: XLA-side mapping


@pytest.mark.parametrize("group, tile_rows", [(1, 64), (3, 128), (96, 64)])
def test_tile_rows_round_trip(group, tile_rows):
  """Regrouping q into 64-row tiles and gathering the tiles back is the identity on live
  tokens (0 on padding tokens): every query row lands in exactly one tile row."""
  k, d = 2, 4
  qsl = jnp.array([0, 37, 38, 38, 45, 45], jnp.int32)          # a 0-token request, 1 padding
  kv = jnp.array([50, 9, 4, 7, 0], jnp.int32)
  num_seqs, t = jnp.int32(4), 48
  q = jax.random.normal(jax.random.key(group), (t, group * k, d), jnp.float32)
  tiles = rpa.num_tiles(t, group, 5, tile_rows)
  sizes = dict(group=group, tiles=tiles, tile_rows=tile_rows)

  @jax.jit
  def round_trip(q):
    meta, tile_start = rpa._tile_metadata(kv, qsl, num_seqs, **sizes)
    q_tiles = rpa._tile_rows(q, meta, qsl, **sizes)
    back = rpa._gather_rows((q_tiles[None],), tile_start, qsl, num_seqs, q.shape,
                            tile_rows=tile_rows)
    return back, tile_start

  back, tile_start = round_trip(q)
  assert int(tile_start[-1]) <= tiles
  np.testing.assert_array_equal(np.asarray(back[:45]), np.asarray(q[:45]))
  np.testing.assert_array_equal(np.asarray(back[45:]), 0.0)


def test_split_combine_weights_by_lse():
  """Two splits of one row, one of them empty (lse -inf, output 0): the combine returns the
  other split's output exactly; equal lse averages."""
  o = jnp.stack([jnp.full((1, 64, 2), 3.0), jnp.zeros((1, 64, 2))])        # (2, K=1, 64, 2)
  lse = jnp.stack([jnp.zeros((1, 64)), jnp.full((1, 64), -jnp.inf)])
  qsl, ns = jnp.array([0, 1], jnp.int32), jnp.int32(1)
  tile_start = jnp.array([0, 1], jnp.int32)
  out = rpa._gather_rows((o, lse), tile_start, qsl, ns, (1, 1, 2), tile_rows=64)
  np.testing.assert_array_equal(np.asarray(out), 3.0)
  lse = jnp.zeros((2, 1, 64))
  out = rpa._gather_rows((o, lse), tile_start, qsl, ns, (1, 1, 2), tile_rows=64)
  np.testing.assert_allclose(np.asarray(out), 1.5)


def test_default_splits_follow_the_sm_count():
  """Decode at batch 1 over a 32K-token table: splits fill about two CTAs per SM of the device
  (at least 4 KV steps each); a grid that already fills the SMs is not split."""
  one = dict(t=1, n=32, k=8, page=16, block_tables_shape=(1, 2048), consumers=1)
  assert rpa.default_num_splits(**one, num_sms=132) == 17      # 2 tiles x 8 heads = 16 CTAs
  assert rpa.default_num_splits(**one, num_sms=114) == 15      # H100 PCIe
  assert rpa.default_num_splits(t=16, n=32, k=8, page=16, block_tables_shape=(16, 2048),
                                consumers=1, num_sms=132) == 1  # 17 tiles x 8 heads >= 132


# ---------------------------------------------------------------- CPU: lowering, interpreter


@pytest.mark.parametrize("name", ["mixed_g4_p16_split4", "g3_p16_split2_2wg",
                                  "g8_d128_p128_split3", "g8_prefill_long_bkv128"])
def test_lowers_for_cuda(name):
  """The full Pallas -> Mosaic GPU lowering (layout inference, TMA/wgmma shapes) succeeds and
  emits the Mosaic GPU custom call, with the metadata traced as under the engine's jit.  The
  XLA side holds no while loop: on GPU each trip's predicate goes back to the host, once per
  attention layer (the tile metadata once had one, from jnp.searchsorted)."""
  args, kw = _layout_args(_layout(name))

  def attention(*a):
    return ragged_paged_attention_mosaic(*a, sm_scale=0.1, **kw)

  text = jax.jit(attention).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  assert "stablehlo.while" not in text


# jax 0.11.2's Mosaic GPU interpreter has no rule for run_state (the wgmma accumulator scope of
# the P V product); the compiled kernel is covered there by the GPU tests below.
@pytest.mark.skipif(jax.__version_info__ < (0, 12),
                    reason="jax < 0.12: the Mosaic GPU interpreter cannot run pl.run_state")
@pytest.mark.parametrize("name", ["g3_p16_split2", "g3_p16_split2_2wg", "g16_p64_f16",
                                  "g8_d128_p128_split3", "g3_p16_split2_2wg_bkv128",
                                  "mixed_g4_p32_bkv128"])
def test_interpreter_matches_reference(name):
  args, kw = _layout_args(_layout(name))
  got = ragged_paged_attention_mosaic(*args, **kw, interpret=True)
  assert max_error(got, args) < ATOL[jnp.dtype(args[0].dtype)]


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l[0])
def test_gpu_matches_reference(layout):
  args, kw = _layout_args(layout)
  got = ragged_paged_attention_mosaic(*args, **kw)
  err = max_error(got, args)
  print(f"{layout[0]}: max|mosaic - reference| = {err:.3g}")        # shown with pytest -s
  assert err < ATOL[jnp.dtype(args[0].dtype)]


@pytest.mark.gpu
def test_gpu_under_jit_with_traced_metadata_and_scale():
  args, _ = _layout_args(_layout("mixed_g4_p16"))
  fn = jax.jit(lambda *a: ragged_paged_attention_mosaic(*a, sm_scale=0.3))
  got = fn(*args)
  assert max_error(got, args, sm_scale=0.3) < ATOL[jnp.dtype(BF16)]

"""Pallas residual add + RMSNorm (``pallas_kernels.add_rms_norm``) against its jnp reference.

CPU: the kernel under the Pallas interpreter (``interpret=True``), validation before launch, and
the reference against ``weave_jax.comm.base.add_norm``.  GPU (``@pytest.mark.gpu``): the
compiled Triton kernel.  Inputs are fresh random normals; outputs are checked by rel-L2 (< 1e-2
for bf16, < 1e-5 for f32), ``new_residual`` bitwise, and NaN never passes.  "Poisoned" runs
alias NaN-filled buffers to the outputs, so any element the kernel fails to write shows up.
"""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import add_rms_norm, add_rms_norm_reference
from pallas_kernels.add_rms_norm import _call
from weave_jax.comm.base import add_norm

EPS = 1e-6
F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {jnp.dtype(F32): 1e-5, jnp.dtype(BF16): 1e-2}


def _inputs(seed, tokens, hidden, red_dtype, dtype):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  reduced = jax.random.normal(k1, (tokens, hidden), F32).astype(red_dtype)
  residual = (2.0 * jax.random.normal(k2, (tokens, hidden), F32)).astype(dtype)
  weight = (1.0 + 0.1 * jax.random.normal(k3, (hidden,), F32)).astype(dtype)
  return reduced, residual, weight


def _check(got, want, dtype):
  normed, new_residual = got
  want_normed, want_residual = want
  for out in got:
    assert out.shape == want_normed.shape and out.dtype == jnp.dtype(dtype)
  n = np.asarray(normed, np.float32)
  assert np.isfinite(n).all(), "NaN/Inf in normed (unwritten or poisoned elements)"
  w = np.asarray(want_normed, np.float32)
  err = np.linalg.norm(n - w) / np.linalg.norm(w)
  assert err < TOL[jnp.dtype(dtype)], f"normed rel-L2 err {err:.3g}"
  # The add and the rounding to d are elementwise IEEE ops: bitwise equal.
  np.testing.assert_array_equal(np.asarray(new_residual, np.float32),
                                np.asarray(want_residual, np.float32))


# (tokens, hidden, reduced dtype, d, block_rows).  None = default block (4 rows for H=896).
CPU_CASES = [
    (37, 896, F32, BF16, None),     # T not a multiple of the block; H not a power of 2
    (13, 384, BF16, BF16, 4),       # bf16 reduce (rs_ag in the activation dtype)
    (64, 1024, F32, F32, 8),        # exact multiple, f32 throughout
    (3, 100, F32, F32, None),       # H not a multiple of 128
    (5, 5120, F32, BF16, 1),        # one row per program, Hp = 8192
]


@pytest.mark.parametrize("tokens, hidden, red_dtype, dtype, block_rows", CPU_CASES)
def test_interpret_matches_reference(tokens, hidden, red_dtype, dtype, block_rows):
  args = _inputs(tokens * 7 + hidden, tokens, hidden, red_dtype, dtype)
  got = add_rms_norm(*args, eps=EPS, block_rows=block_rows, interpret=True)
  _check(got, add_rms_norm_reference(*args, eps=EPS), dtype)


@pytest.mark.parametrize("tokens, hidden, block_rows", [(37, 896, None), (6, 200, 4)])
def test_interpret_writes_every_element(tokens, hidden, block_rows):
  args = _inputs(tokens + 1, tokens, hidden, F32, BF16)
  poison = (jnp.full((tokens, hidden), jnp.nan, BF16),) * 2
  got = _call(*args, poison, eps=EPS, block_rows=block_rows, interpret=True)
  _check(got, add_rms_norm_reference(*args, eps=EPS), BF16)


def test_interpret_under_jit():
  args = _inputs(3, 9, 256, F32, BF16)
  fn = jax.jit(lambda r, s, w: add_rms_norm(r, s, w, eps=EPS, interpret=True))
  _check(fn(*args), add_rms_norm_reference(*args, eps=EPS), BF16)


@pytest.mark.parametrize("red_dtype, dtype", [(F32, BF16), (BF16, BF16), (F32, F32)])
def test_reference_is_comm_add_norm(red_dtype, dtype):
  """The reference is the rs_ag math: ``add_norm(reduced.astype(f32), ...)``, bitwise."""
  reduced, residual, weight = _inputs(11, 24, 640, red_dtype, dtype)
  want = add_norm(reduced.astype(F32), residual, weight, EPS)
  got = add_rms_norm_reference(reduced, residual, weight, eps=EPS)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def _z(*shape, dtype=BF16):
  return jnp.zeros(shape, dtype)


@pytest.mark.parametrize("args, kw, exc, msg", [
    ((_z(2, 4, 128), _z(2, 4, 128), _z(128)), {}, ValueError,
     r"add_rms_norm: expected reduced \(T, H\).*\(2, 4, 128\)"),
    ((_z(8, 128), _z(8, 128), _z(1, 128)), {}, ValueError, r"add_rms_norm: expected.*\(1, 128\)"),
    ((_z(8, 128), _z(4, 128), _z(128)), {}, ValueError,
     r"add_rms_norm: residual shape \(4, 128\) != reduced shape \(8, 128\)"),
    ((_z(8, 128), _z(8, 128), _z(256)), {}, ValueError,
     r"add_rms_norm: weight shape \(256,\) != \(128,\)"),
    ((_z(0, 128), _z(0, 128), _z(128)), {}, ValueError, r"add_rms_norm: tokens=0 must be >= 1"),
    ((_z(2, 32768), _z(2, 32768), _z(32768)), {}, ValueError,
     r"add_rms_norm: hidden=32768 outside 1\.\.16384"),
    ((_z(8, 128, dtype=jnp.float16), _z(8, 128), _z(128)), {}, TypeError,
     r"add_rms_norm: reduced dtype float16 not float32 or bfloat16"),
    ((_z(8, 128), _z(8, 128, dtype=jnp.int32), _z(128, dtype=jnp.int32)), {}, TypeError,
     r"add_rms_norm: residual dtype int32"),
    ((_z(8, 128), _z(8, 128), _z(128, dtype=F32)), {}, TypeError,
     r"add_rms_norm: weight dtype float32 != residual dtype bfloat16"),
    ((_z(8, 128), _z(8, 128), _z(128)), {"eps": -1e-6}, ValueError,
     r"add_rms_norm: eps=-1e-06 must be finite and >= 0"),
    ((_z(8, 128), _z(8, 128), _z(128)), {"eps": float("nan")}, ValueError,
     r"add_rms_norm: eps=nan"),
    ((_z(8, 128), _z(8, 128), _z(128)), {"eps": jnp.float32(1e-6)}, TypeError,
     r"add_rms_norm: eps must be a Python float"),
    ((_z(8, 128), _z(8, 128), _z(128)), {"block_rows": 3}, ValueError,
     r"add_rms_norm: block_rows=3 must be a power of 2"),
    ((_z(8, 128), _z(8, 128), _z(128)), {"block_rows": 0}, ValueError,
     r"add_rms_norm: block_rows=0 must be a power of 2"),
    ((_z(8, 5000), _z(8, 5000), _z(5000)), {"block_rows": 4}, ValueError,
     r"add_rms_norm: block_rows=4 \* next_power_of_2\(H\)=8192 exceeds 16384"),
])
def test_bad_inputs_raise_before_launch(args, kw, exc, msg):
  kw = {"eps": EPS, **kw}
  with pytest.raises(exc, match=msg):
    add_rms_norm(*args, **kw, interpret=True)


def test_traced_eps_is_rejected():
  args = (_z(8, 128), _z(8, 128), _z(128))
  with pytest.raises(TypeError, match="add_rms_norm: eps must be a Python float"):
    jax.jit(lambda e: add_rms_norm(*args, eps=e, interpret=True))(1e-6)


# --- GPU: the compiled Triton kernel ------------------------------------------------------------
GPU_CASES = [
    (1, 896, F32, BF16, None),
    (37, 896, F32, BF16, None),
    (2051, 4096, F32, BF16, None),
    (2051, 4096, BF16, BF16, None),
    (129, 5120, F32, BF16, None),
    (129, 3584, F32, BF16, 2),
    (67, 8192, F32, BF16, None),
    (33, 16384, F32, BF16, None),
    (300, 4096, F32, F32, None),
    (301, 1536, F32, F32, 8),
]


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, hidden, red_dtype, dtype, block_rows", GPU_CASES)
def test_gpu_matches_reference(tokens, hidden, red_dtype, dtype, block_rows):
  gpu = jax.devices("gpu")[0]
  with jax.default_device(gpu):
    args = _inputs(tokens * 7 + hidden, tokens, hidden, red_dtype, dtype)
    want = jax.jit(add_rms_norm_reference, static_argnames="eps")(*args, eps=EPS)
    poison = (jnp.full((tokens, hidden), jnp.nan, dtype),) * 2
    got = _call(*args, poison, eps=EPS, block_rows=block_rows, interpret=False)
    assert got[0].devices() == {gpu}
    _check(got, want, dtype)
    # The public path (no aliased poison) computes the same bits.
    plain = add_rms_norm(*args, eps=EPS, block_rows=block_rows)
    for p, g in zip(plain, got):
      np.testing.assert_array_equal(np.asarray(p, np.float32), np.asarray(g, np.float32))

"""The decode-sized GEMM kernel of ``experimental/skinny_gemm.py`` and its benchmark.

CPU: the kernel run in Triton's interpreter (a subprocess with TRITON_INTERPRET=1, float16)
against float32 jnp, the input checks, the configs (compiled for sm_90 with Triton's bundled
ptxas: tl.dot shape rules and shared memory the interpreter does not check), and
``run/bench_decode_gemm.py --dry-run``.  GPU: the compiled kernel against float32 at
Llama-3.1-8B's decode shapes.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from conftest import rel_err, run_interpreter_cases  # noqa: E402
from experimental import skinny_gemm as sg  # noqa: E402

# Llama-3.1-8B's decode GEMMs at TP = 1: (name, K, N, w stored (N, K), float32 out)
LLAMA_8B = [("qkv", 4096, 6144, False, False), ("o", 4096, 4096, False, False),
            ("gate_up", 4096, 28672, False, False), ("down", 14336, 4096, False, False),
            ("lm_head", 4096, 128256, True, True)]


def random_inputs(seed, m, k, n, transpose_w, dtype):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  w = jnp.asarray(rng.standard_normal((n, k) if transpose_w else (k, n)) * k ** -0.5, dtype)
  return x, w


# ---------------------------------------------------------------------------------------------
# Input checks and configs (no launch)
# ---------------------------------------------------------------------------------------------

def _raise_before_launch(*a, **kw):
  raise AssertionError("the kernel was launched")


@pytest.mark.parametrize("x_shape,w_shape,kw,err,match", [
    ((4, 64, 1), (64, 32), {}, ValueError, "x must be 2-D"),
    ((4, 64), (64,), {}, ValueError, "w must be 2-D"),
    ((4, 64), (48, 32), {}, ValueError, r"w \(K, N\) = \(48, 32\)"),
    ((4, 64), (32, 48), {"transpose_w": True}, ValueError, r"w \(N, K\) = \(32, 48\)"),
    ((4, 64), (64, 40), {}, ValueError, "N=40; N must be a multiple of 16"),
    ((4, 64), (8, 64), {"transpose_w": True}, ValueError, "N=8"),
    ((0, 64), (64, 32), {}, ValueError, "M=0"),
    ((257, 64), (64, 32), {}, ValueError, "M=257"),
    ((4, 64), (64, 32), {"out_dtype": jnp.int32}, TypeError, "out_dtype int32"),
    ((4, 64), (64, 32), {"config": sg.Config(16, 24, 32)}, ValueError, "block_n=24"),
    ((4, 64), (64, 32), {"config": sg.Config(8, 32, 32)}, ValueError, "block_m=8"),
    ((4, 64), (64, 32), {"config": sg.Config(16, 32, 32, num_warps=3)}, ValueError,
     "num_warps=3"),
])
def test_bad_input_raises_before_launch(x_shape, w_shape, kw, err, match):
  x = jnp.zeros(x_shape, jnp.bfloat16)
  w = jnp.zeros(w_shape, jnp.bfloat16)
  with pytest.raises(err, match=match):
    sg.skinny_gemm(x, w, launch=_raise_before_launch, **kw)


@pytest.mark.parametrize("x_dtype,w_dtype,match", [
    (jnp.float32, jnp.float32, "x dtype float32"),
    (jnp.bfloat16, jnp.float16, "w dtype float16 differs"),
])
def test_bad_dtype_raises(x_dtype, w_dtype, match):
  with pytest.raises(TypeError, match=match):
    sg.skinny_gemm(jnp.zeros((4, 64), x_dtype), jnp.zeros((64, 32), w_dtype),
                   launch=_raise_before_launch)


@pytest.mark.parametrize("m", [1, 16, 64, 256])
@pytest.mark.parametrize("name,k,n,_t,_f", LLAMA_8B)
def test_configs_fill_the_device(m, name, k, n, _t, _f):
  """Every config is valid and fits shared memory; at M <= 16 the heuristic pick gives every
  one of 132 SMs at least one program (the weight stream needs them all)."""
  configs = sg.configs_for(m, k, n)
  assert configs and len(set(configs)) == len(configs)
  for cfg in configs:
    cfg.check()
    assert cfg.smem_bytes() <= sg.SMEM_BUDGET and cfg.block_m >= min(16, m)
  first = configs[0]
  programs = -(-m // first.block_m) * -(-n // first.block_n) * first.split_k
  if m <= 16:
    assert first.block_m == 16 and programs >= 132, (first, programs)


def _compile_for_sm90(cfg, m, k, n, transpose_w, out):
  """The kernel compiled for sm_90 as jax_triton specializes it (arrays 16-byte aligned, M a
  runtime scalar unless 1)."""
  import triton
  from triton.backends.compiler import GPUTarget
  from triton.compiler import ASTSource
  k_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
  splits = triton.cdiv(k, k_split)
  signature = {"x_ptr": "*bf16", "w_ptr": "*bf16", "m": "i32",
               "y_ptr": "*" + (out if splits == 1 else "fp32")}
  consts = dict(K=k, N=n, K_SPLIT=k_split, W_NK=transpose_w, BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k_split * splits == k,
                EVEN_N=n % cfg.block_n == 0)
  if m == 1:
    consts["m"] = 1
  signature.update({name: "constexpr" for name in consts})
  attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 3)}
  src = ASTSource(fn=sg._skinny_gemm_kernel, signature=signature, constexprs=consts, attrs=attrs)
  return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


@pytest.mark.parametrize("m,k,n,transpose_w,out", [
    (16, 4096, 28672, False, "bf16"), (256, 14336, 4096, False, "bf16"),
    (1, 4096, 128256, True, "fp32")], ids=["m16-gate_up", "m256-down", "m1-lm_head"])
def test_configs_compile_for_sm90(m, k, n, transpose_w, out):
  for cfg in sg.configs_for(m, k, n):
    kernel = _compile_for_sm90(cfg, m, k, n, transpose_w, out)
    assert kernel.asm["cubin"] and kernel.metadata.shared <= 227 * 1024, cfg


# ---------------------------------------------------------------------------------------------
# The kernel in Triton's interpreter (subprocess: TRITON_INTERPRET must be set before triton
# decorates the kernel, and must not leak into GPU tests of the same process)
# ---------------------------------------------------------------------------------------------

# (M, K, N, transpose_w, float32 out, config or None for the heuristic pick)
INTERPRETER_CASES = [
    (1, 64, 32, False, False, None),
    (5, 100, 48, False, False, sg.Config(16, 16, 16, split_k=2)),           # K tail, split
    (16, 256, 64, True, True, None),                                         # (N, K) w
    (16, 96, 80, False, False, sg.Config(16, 32, 32, split_k=4)),            # uneven splits
    (64, 128, 96, False, False, sg.Config(64, 64, 32, split_k=2, num_stages=2)),  # N tail
    (40, 64, 32, True, False, sg.Config(16, 32, 64)),                        # 3 row blocks
    (1, 512, 64, True, True, sg.Config(16, 64, 64, split_k=4)),              # lm_head-like
    (256, 64, 32, False, False, sg.Config(128, 32, 32)),                     # M = 256
]


def _interpreter_main() -> int:
  failures = 0
  for i, (m, k, n, transpose_w, f32, cfg) in enumerate(INTERPRETER_CASES):
    x, w = random_inputs(i, m, k, n, transpose_w, jnp.float16)
    out = jnp.float32 if f32 else None
    y = sg.skinny_gemm(x, w, config=cfg, transpose_w=transpose_w, out_dtype=out,
                       launch=sg.interpreter_launch)
    want = sg.reference(x, w, transpose_w=transpose_w, out_dtype=jnp.float32)
    err = rel_err(np.asarray(y, np.float32), want)
    ok = (y.shape == (m, n) and y.dtype == (out or x.dtype) and not np.isnan(y).any()
          and err < (1e-5 if f32 else 2e-3))
    failures += not ok
    print(f"case {i} M{m} K{k} N{n} {'nk' if transpose_w else 'kn'} {cfg and cfg.name}: "
          f"rel err {err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
  return 1 if failures else 0


def test_kernel_in_interpreter():
  run_interpreter_cases(__file__, len(INTERPRETER_CASES), timeout=300)


@pytest.mark.timeout(30)          # ~9 s on 2 cores: three short processes
def test_bench_dry_run(tmp_path):
  """The benchmark's CPU dry run: XLA and the kernel (interpreter) on every GEMM, a variant
  whose XLA flag does not exist reported as failed without stopping the run."""
  out = tmp_path / "res.json"
  proc = subprocess.run(
      [sys.executable, "run/bench_decode_gemm.py", "--dry-run", "--ms", "1",
       "--variants", "xla,triton", "--variant-flags", "bogus=--xla_gpu_no_such_flag=1",
       "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.loads(out.read_text())
  timed = {(r["gemm"], r["variant"]) for r in res["rows"] if "us" in r}
  gemms = ["qkv", "o", "gate_up", "down", "lm_head"]
  assert timed == {(g, v) for g in gemms for v in ("xla", "triton")}, res["rows"]
  assert not [r for r in res["rows"] if "WRONG" in r.get("status", "")]
  assert "unknown XLA flag" in res["failures"]["bogus"]
  assert res["step_ms"]["1"]["xla"] > 0 and res["step_ms"]["1"]["bogus"] is None
  assert "Decode-step GEMM time" in proc.stdout and "variant bogus FAILED" in proc.stdout


# ---------------------------------------------------------------------------------------------
# GPU: the compiled kernel against float32 at Llama-3.1-8B's decode shapes
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64, 256])
@pytest.mark.parametrize("name,k,n,transpose_w,f32", LLAMA_8B)
def test_gpu_matches_float32_at_llama_shapes(m, name, k, n, transpose_w, f32):
  """Tolerance: a bfloat16 result is the float32 product rounded once (relative error <=
  2^-9 per element, ~1e-3 in L2 over random data): rel L2 < 4e-3 and no element off by more
  than 2^-7 of the largest; a float32 result differs only by summation order: rel L2 < 1e-4.
  Every config of ``configs_for`` at M = 16 and 256, the heuristic pick elsewhere."""
  kx, kw = jax.random.split(jax.random.key(m))
  x = jax.random.normal(kx, (m, k), jnp.bfloat16)
  w = (jax.random.normal(kw, (n, k) if transpose_w else (k, n)) * k ** -0.5).astype(jnp.bfloat16)
  out = jnp.float32 if f32 else None
  want = np.asarray(jax.jit(lambda x, w: jnp.dot(
      x.astype(jnp.float32), (w.T if transpose_w else w).astype(jnp.float32),
      precision=jax.lax.Precision.HIGHEST))(x, w))
  configs = sg.configs_for(m, k, n) if m in (16, 256) else [None]
  for cfg in configs:
    y = jax.jit(lambda x, w: sg.skinny_gemm(x, w, config=cfg, transpose_w=transpose_w,
                                            out_dtype=out))(x, w)
    got = np.asarray(y, np.float32)
    assert y.shape == (m, n) and y.dtype == (out or jnp.bfloat16)
    err = rel_err(got, want)
    if f32:
      assert err < 1e-4, (cfg, err)
    else:
      assert err < 4e-3, (cfg, err)
      assert np.abs(got - want).max() <= 2 ** -7 * np.abs(want).max(), cfg


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
  sys.exit(_interpreter_main())

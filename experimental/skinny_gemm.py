"""Decode-sized ("skinny") GEMM y = x @ w as a Triton kernel, called through jax_triton.

x (M, K) with few rows (M = 1..256 decode tokens), w (K, N) as the model stores its dense
kernels ((in, out), as flax nnx.Linear; the lm_head's (N, K) vocab rows with ``transpose_w``),
y (M, N) in x.dtype (or ``out_dtype``), float32 accumulation.  At these M the GEMM streams its
weights once and does ~M FLOPs per weight byte, so it is bound by HBM reads; the kernel is laid
out for that:

* Each program owns a BLOCK_N slice of output columns and one of SPLIT_K contiguous slices of
  K: it reads its (K/SPLIT_K, BLOCK_N) block of w exactly once, as BLOCK_K x BLOCK_N tiles of
  rows contiguous in memory (BLOCK_N * 2 bytes per row: 128-512 bytes, full sectors), pipelined
  over ``num_stages`` buffers.  x is tiny and stays in L2.
* SPLIT_K multiplies the programs so that narrow outputs (N = 4096: 32 slices of 128 columns)
  still fill 132 SMs several times over.  Partial sums go to a float32 (SPLIT_K, M, N) buffer
  that one XLA reduction sums in a fixed order (deterministic, unlike float32 atomics).  The
  partials add 2 * SPLIT_K * M / K of the weight bytes in writes and as much in reads (mostly
  in L2): in all 0.4% at M = 1, K = 4096, SPLIT_K = 4, 6% at M = 16; ``configs_for`` caps it.
  (A hand-over in the kernel, the last program of a column slice summing the others, would
  save the second launch but needs a counter, fences and a zeroed buffer: not before the
  measurement shows the launch matters.)
* Row blocks are the fastest grid axis, so for M > BLOCK_M the programs sharing a w tile run
  together and all but the first read it from L2.
* M = 1..16 uses tl.dot with BLOCK_M = 16 (its minimum), rows beyond M masked to zero.  The 16x
  tensor-core overwork costs nothing that shows: M = 16 at K 4096, N 28672 is 3.8 GFLOP, ~6 us
  of mma.sync against ~80 us of HBM reads, and the MMA runs from shared memory beside the loads.
  A CUDA-core FMA path for M = 1..4 would instead widen every w element to float32 in registers
  (BLOCK_K * BLOCK_N / threads values per thread per tile), the very path the loads need.

Configs (tile sizes, warps, stages, SPLIT_K) come from ``configs_for(m, k, n)``: the first is
the heuristic pick, the rest are what ``run/bench_decode_gemm.py`` also tries.  Not measured
yet: nothing in the library selects this kernel.
"""
from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

_OP = "skinny_gemm"
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
OUT_DTYPES = (*DTYPES, jnp.dtype(jnp.float32))
MAX_M = 256
#: Shared memory a config may plan for its pipeline buffers (H100: 227 KiB per block; the rest
#: is left to Triton's layout conversions and the epilogue).
SMEM_BUDGET = 192 * 1024


@dataclasses.dataclass(frozen=True)
class Config:
  """Static launch parameters (Python ints: they key the compiled kernels)."""
  block_m: int
  block_n: int
  block_k: int
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 4

  @property
  def name(self) -> str:
    return (f"m{self.block_m}n{self.block_n}k{self.block_k}s{self.split_k}"
            f"w{self.num_warps}p{self.num_stages}")

  def smem_bytes(self, itemsize: int = 2) -> int:
    """Shared memory of the pipeline buffers (x and w tiles, ``num_stages`` deep)."""
    return self.num_stages * (self.block_m + self.block_n) * self.block_k * itemsize

  def check(self) -> None:
    for field in ("block_m", "block_n", "block_k", "split_k"):
      v = getattr(self, field)
      if v < 1 or v & (v - 1):
        raise ValueError(f"{_OP}: config.{field}={v} must be a power of two")
    for field in ("block_m", "block_n", "block_k"):
      if getattr(self, field) < 16:
        raise ValueError(f"{_OP}: config.{field}={getattr(self, field)} must be >= 16 (tl.dot)")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"{_OP}: config.num_warps={self.num_warps} must be 1, 2, 4, 8 or 16")
    if self.num_stages < 1:
      raise ValueError(f"{_OP}: config.num_stages={self.num_stages} must be >= 1")


def _block_m(m: int) -> int:
  return max(16, min(128, triton.next_power_of_2(m)))


def _split_k(m: int, k: int, n: int, block_m: int, block_n: int, block_k: int,
             target: int) -> int:
  """Smallest power-of-two K split giving ``target`` programs, keeping >= 4 K tiles per
  program (something for the pipeline to overlap) and the float32 partials (written and read
  back: 8 * split * M bytes per column) within a quarter of the weights (2 * K per column)."""
  programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
  split, tiles = 1, triton.cdiv(k, block_k)
  while (programs * split < target and tiles // (2 * split) >= 4
         and 8 * (2 * split) * m <= k // 2):
    split *= 2
  return split


# (block_m or 0 for the M-derived one, block_n, block_k, num_warps, num_stages, waves aimed at;
# 0 waves: never split, offered only where the grid fills the SMs without)
_TILES_SMALL_M = ((16, 128, 128, 4, 4, 4), (16, 64, 256, 4, 4, 4), (16, 256, 64, 8, 4, 2),
                  (16, 128, 64, 4, 6, 2), (16, 64, 128, 4, 4, 0))
_TILES_LARGE_M = ((0, 128, 64, 4, 4, 2), (0, 64, 64, 4, 4, 2), (0, 128, 64, 8, 3, 2),
                  (64, 128, 64, 4, 4, 2))


def configs_for(m: int, k: int, n: int, *, num_sms: int = 132) -> list[Config]:
  """Configs worth timing for x (m, k) @ w (k, n), the heuristic pick first.

  M <= 16: one 16-row block, tiles 64-256 columns wide, K split until the grid holds about 4
  waves of ``num_sms`` programs (2 for the next two), and for wide N (>= one program per SM
  without it) no split at all: no partials to sum.  Larger M: 64-128-row blocks with
  MMA-friendly tiles, K split only while the grid is short of 2 waves and the partials stay
  small (at M = 256, K = 4096 they would cost as much as the weights: no split).
  """
  bm = _block_m(m)
  out = []
  for block_m, block_n, block_k, warps, stages, waves in (
      _TILES_SMALL_M if bm == 16 else _TILES_LARGE_M):
    block_m = block_m or bm
    block_n = min(block_n, max(16, triton.next_power_of_2(n)))
    if not waves and triton.cdiv(m, block_m) * triton.cdiv(n, block_n) < num_sms:
      continue
    split = _split_k(m, k, n, block_m, block_n, block_k, waves * num_sms)
    cfg = Config(block_m, block_n, block_k, split, warps, stages)
    if cfg.smem_bytes() <= SMEM_BUDGET and cfg not in out:
      out.append(cfg)
  return out


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, m, y_ptr, K: tl.constexpr, N: tl.constexpr,
                        K_SPLIT: tl.constexpr, W_NK: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                        EVEN_N: tl.constexpr):
  """Grid (row blocks, column blocks, SPLIT_K).  x (m, K); w (K, N), or (N, K) when W_NK;
  y (m, N) in its dtype when SPLIT_K == 1, else (SPLIT_K, m, N) float32 partial sums.
  ``m`` is a runtime scalar: one binary serves every M of a row-block size."""
  pid_m = tl.program_id(0)
  pid_n = tl.program_id(1)
  pid_k = tl.program_id(2)
  rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                   # (BLOCK_M,)
  cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                   # (BLOCK_N,)
  ks = pid_k * K_SPLIT + tl.arange(0, BLOCK_K)                     # (BLOCK_K,) first tile
  row_ok = rows < m
  x_ptrs = x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]
  if W_NK:
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * K + ks[:, None]  # (BLOCK_K, BLOCK_N) view
    w_step = BLOCK_K
  else:
    w_ptrs = w_ptr + ks[:, None].to(tl.int64) * N + cols[None, :]
    w_step = BLOCK_K * N
  acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
  for k0 in range(0, K_SPLIT, BLOCK_K):
    k_ok = ks + k0 < K
    x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    if EVEN_K and EVEN_N:
      w = tl.load(w_ptrs)
    else:
      w = tl.load(w_ptrs, mask=k_ok[:, None] & (cols[None, :] < N), other=0.0)
    acc = tl.dot(x, w, acc)
    x_ptrs += BLOCK_K
    w_ptrs += w_step
  y_ptrs = y_ptr + (pid_k * m + rows[:, None]).to(tl.int64) * N + cols[None, :]
  tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < N))


# --------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------

def _jax_triton_launch(kernel, inputs, out_shapes, *, grid, num_warps, num_stages, **constexprs):
  """Launch through jax_triton (imported here: CPU users never need it)."""
  try:
    import jax_triton
  except ImportError as err:
    raise ImportError(f"{_OP}: jax-triton is not importable ({err}); install it with "
                      "`pip install weave_jax[triton]` (jax-triton 0.3.1 for triton 3.6)") from err
  return jax_triton.triton_call(*inputs, kernel=kernel, out_shape=out_shapes, grid=grid,
                                num_warps=num_warps, num_stages=num_stages, **constexprs)


def interpreter_launch(kernel, inputs, out_shapes, *, grid, num_warps, num_stages, **constexprs):
  """jax_triton.triton_call's contract run in Triton's interpreter on torch CPU tensors (the
  process must set TRITON_INTERPRET=1 before importing this module).  Outputs start as NaN, so
  an element no program writes shows.  Float16 only: Triton 3.6's interpreter gets bfloat16
  tl.dot wrong."""
  import numpy as np
  import torch
  del num_warps, num_stages                      # no meaning in the interpreter
  ins = [x if isinstance(x, int) else torch.from_numpy(np.array(x)) for x in inputs]
  outs = [torch.full(sd.shape, float("nan"), dtype=getattr(torch, jnp.dtype(sd.dtype).name))
          for sd in out_shapes]
  kernel[grid](*ins, *outs, **constexprs)
  return [jnp.asarray(o.numpy()) for o in outs]


def check_inputs(x, w, *, transpose_w: bool = False, out_dtype=None) -> tuple[int, int, int]:
  """(M, K, N) of a valid call; TypeError/ValueError naming the bad argument otherwise."""
  if x.ndim != 2:
    raise ValueError(f"{_OP}: x must be 2-D (M, K), got shape {x.shape}")
  if w.ndim != 2:
    raise ValueError(f"{_OP}: w must be 2-D, got shape {w.shape}")
  if jnp.dtype(x.dtype) not in DTYPES:
    raise TypeError(f"{_OP}: x dtype {x.dtype} not supported (bfloat16 or float16)")
  if w.dtype != x.dtype:
    raise TypeError(f"{_OP}: w dtype {w.dtype} differs from x dtype {x.dtype}")
  if out_dtype is not None and jnp.dtype(out_dtype) not in OUT_DTYPES:
    raise TypeError(f"{_OP}: out_dtype {jnp.dtype(out_dtype)} not supported "
                    "(bfloat16, float16, float32)")
  m, k = x.shape
  n, wk = w.shape if transpose_w else w.shape[::-1]
  layout = "(N, K)" if transpose_w else "(K, N)"
  if wk != k:
    raise ValueError(f"{_OP}: w {layout} = {w.shape} does not match x (M, K) = {x.shape}")
  if not 1 <= m <= MAX_M:
    raise ValueError(f"{_OP}: x has M={m} rows; supported 1..{MAX_M}")
  if k < 1:
    raise ValueError(f"{_OP}: K={k} must be >= 1 (x shape {x.shape})")
  if n < 16 or n % 16:
    raise ValueError(f"{_OP}: w {layout} = {w.shape} has N={n}; N must be a multiple of 16")
  return m, k, n


def skinny_gemm(x: jax.Array, w: jax.Array, *, config: Config | None = None,
                transpose_w: bool = False, out_dtype=None, launch=None) -> jax.Array:
  """y = x @ w (or x @ w.T with ``transpose_w``) with float32 accumulation.

  Args:
    x: (M, K) bfloat16/float16, 1 <= M <= 256.
    w: (K, N) in x.dtype, N a multiple of 16; (N, K) with ``transpose_w``.
    config: launch parameters (default: ``configs_for(M, K, N)[0]``).
    transpose_w: w is (N, K) row-major, e.g. the lm_head's (vocab, hidden) table.
    out_dtype: dtype of y (default x.dtype; float32 for logits).
    launch: kernel launcher (default ``jax_triton.triton_call``; tests pass
      ``interpreter_launch``).
  Returns:
    y (M, N) in ``out_dtype``.
  """
  m, k, n = check_inputs(x, w, transpose_w=transpose_w, out_dtype=out_dtype)
  if config is None:
    config = configs_for(m, k, n)[0]
  config.check()
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  k_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
  splits = triton.cdiv(k, k_split)          # a K too short for split_k runs fewer splits
  if splits != config.split_k:
    warnings.warn(f"{_OP}: K={k} fills only {splits} of config.split_k={config.split_k} "
                  f"splits of {k_split}; launching {splits}", stacklevel=2)
  part = out_dtype if splits == 1 else jnp.dtype(jnp.float32)
  grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), splits)
  (y,) = (launch or _jax_triton_launch)(
      _skinny_gemm_kernel, [x, w, m], [jax.ShapeDtypeStruct((splits, m, n), part)], grid=grid,
      num_warps=config.num_warps, num_stages=config.num_stages, K=k, N=n, K_SPLIT=k_split,
      W_NK=bool(transpose_w), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
      BLOCK_K=config.block_k, EVEN_K=k_split * splits == k, EVEN_N=n % config.block_n == 0)
  return y[0] if splits == 1 else jnp.sum(y, axis=0).astype(out_dtype)


def reference(x: jax.Array, w: jax.Array, *, transpose_w: bool = False,
              out_dtype=None) -> jax.Array:
  """The float32 jnp product (M, N) the kernel is compared with, in ``out_dtype`` (HIGHEST
  precision: a GPU's default float32 matmul may round its inputs to TF32)."""
  w32 = w.astype(jnp.float32)
  y = jnp.dot(x.astype(jnp.float32), w32.T if transpose_w else w32,
              precision=jax.lax.Precision.HIGHEST)
  return y.astype(out_dtype or x.dtype)

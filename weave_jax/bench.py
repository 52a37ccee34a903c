"""Benchmark harness: timing (warm-up + median), model FLOPs, and the device's matmul ceiling."""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp

from weave_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Timing:
  median_ms: float
  min_ms: float
  spread: float          # (p90 - p10) / median: how noisy the samples were
  samples: int


def _timed_call(fn: Callable[[], object]) -> float:
  """ms of one call, blocked until its outputs are ready."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return (time.perf_counter() - t0) * 1e3


def time_fn(fn: Callable[[], object], *, warmup: int = 3, iters: int = 20) -> Timing:
  """Median wall time of ``fn()`` (each call blocked until its outputs are ready)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  return _summarize([_timed_call(fn) for _ in range(iters)])


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 3,
                     iters: int = 20) -> dict[str, Timing]:
  """``time_fn`` for several functions whose calls alternate (round-robin, ``iters`` rounds),
  so that drift during the run (clocks, temperature) affects every one of them alike and their
  ratios stay comparable."""
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  samples: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(iters):
    for name, fn in fns.items():
      samples[name].append(_timed_call(fn))
  return {name: _summarize(times) for name, times in samples.items()}


def _summarize(times: list[float]) -> Timing:
  times = sorted(times)
  med = statistics.median(times)
  p10, p90 = times[len(times) // 10], times[(9 * len(times)) // 10 - (1 if len(times) >= 10 else 0)]
  if med <= 0:
    raise RuntimeError("time_fn: non-positive median time; refusing to report it")
  return Timing(med, times[0], (p90 - p10) / med, len(times))


def layer_flops_per_rank(cfg: ModelConfig, tokens: int, tp: int) -> float:
  """Model FLOPs of one decoder layer on one rank for a causal prefill of ``tokens`` tokens.

  GEMMs count 2*M*N*K; attention counts QK^T and PV over the causal half (2*T^2*D per head).
  """
  h, d, t = cfg.hidden_size, cfg.head_dim, tokens
  n, k = cfg.num_heads // tp, cfg.num_kv_heads // tp
  qkv = 2 * t * h * (n + 2 * k) * d
  o = 2 * t * n * d * h
  f = cfg.intermediate_size
  if cfg.is_moe:
    mlp = 2 * t * cfg.experts_per_token * 3 * h * f / tp
  else:
    mlp = 2 * t * 3 * h * f / tp
  attn = 2 * t * t * d * n   # causal: half of 4*T^2*D
  return float(qkv + o + mlp + attn)


def matmul_tflops(n: int = 8192, dtype=jnp.bfloat16, iters: int = 50) -> float:
  """Measured bf16 matmul rate of one device (TFLOP/s), on random data (never zeros).

  The long warm-up matters: a reading taken while the GPU was still clocking up came out at
  552 TFLOP/s on an H200 where a warm one gave 709 (2xH200, 2026-11-21)."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  t = time_fn(lambda: f(a, b), warmup=30, iters=iters)
  return 2 * n ** 3 / (t.median_ms * 1e-3) / 1e12


def stream_gbps(nbytes: int = 4 << 30, iters: int = 20) -> dict[str, float]:
  """Read + write GB/s of one device: a device-to-device copy and an elementwise negation of
  ``nbytes`` (bf16).  The buffer is large (4 GiB) because each timed call carries the host's
  dispatch and sync (~0.1-0.2 ms): at 512 MiB that hid 20-30% of an H100's rate."""
  x = jnp.ones((nbytes // 2,), jnp.bfloat16)
  out = {}
  for name, fn in (("copy", jax.jit(lambda a: jnp.copy(a))), ("neg", jax.jit(lambda a: -a))):
    t = time_fn(lambda: fn(x), warmup=10, iters=iters)
    out[name] = 2 * x.nbytes / (t.median_ms * 1e-3) / 1e9
  return out


def progress(msg: str) -> None:
  """One line of progress on stderr (the table goes to stdout)."""
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_json(res: dict, path: str, note: str = "") -> None:
  """Write a benchmark's results as indented JSON to ``path`` (its folder created if missing)
  and say so on stderr, followed by ``note``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(res, f, indent=1)
  progress(f"results written to {os.path.normpath(path)}{note}")

"""Where to split a batch into halves A and B.

Wave-aware default: a GEMM over M tokens runs ceil(M / tile_m) * ceil(N / tile_n) output tiles on
``sms`` multiprocessors in ceil(tiles / sms) waves; a split whose halves each end on a nearly
full wave wastes the least.  We score candidate offsets by the waves of every GEMM of a layer,
weighted by its K (work per tile), and take the best offset closest to the middle.

Tuned offsets (``run/tune_split.py``) override the heuristic; they live in the device's tuning
table (``weave_jax.tuned``), keyed by model dims, TP, backend and token bucket.
"""
from __future__ import annotations

import math
import sys

from weave_jax import tuned
from weave_jax.config import ModelConfig

TILE_M = 128          # row tile of the large Hopper GEMM kernels (cuBLAS / XLA Triton: 128)
TILE_N = 256


def layer_gemms(cfg: ModelConfig, tp: int) -> list[tuple[int, int]]:
  """(N, K) of each per-rank GEMM of one layer, M being the token count."""
  h, d = cfg.hidden_size, cfg.head_dim
  qkv_n = (cfg.num_heads + 2 * cfg.num_kv_heads) * d // tp
  f = cfg.intermediate_size if not cfg.is_moe else cfg.intermediate_size * cfg.experts_per_token
  ffn_n = f // tp if not cfg.is_moe else f
  return [(qkv_n, h), (h, cfg.num_heads * d // tp), (2 * ffn_n, h), (h, ffn_n)]


def wave_cost(m: int, gemms, sms: int) -> float:
  """Sum over GEMMs of K x waves for M = m tokens (proportional to time when compute-bound)."""
  cost = 0.0
  for n, k in gemms:
    tiles = math.ceil(m / TILE_M) * math.ceil(n / TILE_N)
    cost += k * math.ceil(tiles / sms)
  return cost


def split_step(n_tokens: int, tp: int, align: int = 64) -> int:
  """Granularity of split offsets: a multiple of tp, and of ``align`` (a GEMM tile row count)
  once the batch holds at least 4 such tiles."""
  return math.lcm(align if n_tokens >= 4 * align else 1, tp)


def wave_aware_split(n_tokens: int, cfg: ModelConfig, tp: int, sms: int | None,
                     align: int = 64) -> int:
  """Offset of half B (a multiple of ``align`` and of tp) for a batch of ``n_tokens`` tokens."""
  step = split_step(n_tokens, tp, align)
  middle = n_tokens / 2
  candidates = range(step, n_tokens - step + 1, step)
  if not candidates:
    raise ValueError(f"split: {n_tokens} tokens are too few to split into two halves of >= {step}")
  if not sms:
    return min(candidates, key=lambda s: abs(s - middle))
  gemms = layer_gemms(cfg, tp)
  # Only offsets within 1/4 of the middle: unequal halves hide less communication.
  near = [s for s in candidates if abs(s - middle) <= n_tokens / 4] or list(candidates)
  return min(near, key=lambda s: (wave_cost(s, gemms, sms) + wave_cost(n_tokens - s, gemms, sms),
                                  abs(s - middle)))


def model_key(cfg: ModelConfig, tp: int, backend: str) -> str:
  """Key of a model's entry in a device's tuning table (``weave_jax.tuned``)."""
  return (f"H{cfg.hidden_size}|F{cfg.intermediate_size}|E{cfg.num_experts}"
          f"|heads{cfg.num_heads}/{cfg.num_kv_heads}|tp{tp}|{backend}")


def _entry(device_kind: str, cfg: ModelConfig, tp: int, backend: str, directory) -> dict:
  return tuned.model_entry(device_kind, model_key(cfg, tp, backend), directory)


def tuned_fraction(device_kind: str, cfg: ModelConfig, tp: int, backend: str, n_tokens: int,
                   directory: str | None = None) -> float | None:
  """The tuned split, as a fraction of the batch, for this bucket (None if not tuned)."""
  entry = _entry(device_kind, cfg, tp, backend, directory)
  return entry.get("splits", {}).get(str(tuned.bucket(n_tokens)))


def choose_split(n_tokens: int, cfg: ModelConfig, tp: int, device_kind: str = "",
                 sms: int | None = None, backend: str = "", directory: str | None = None) -> int:
  """Tuned offset when the device's table has one for this model/TP/backend/bucket, else
  wave-aware."""
  frac = tuned_fraction(device_kind, cfg, tp, backend, n_tokens, directory)
  if frac is not None:
    step = split_step(n_tokens, tp)
    s = round(n_tokens * frac / step) * step
    return min(max(s, step), max(step, n_tokens - step))
  return wave_aware_split(n_tokens, cfg, tp, sms)


def tuned_weave(device_kind: str, cfg: ModelConfig, tp: int, backend: str, n_tokens: int,
                directory: str | None = None) -> bool | None:
  """Whether the woven forward beat the unsplit one in this token bucket when tuned (the
  entry's ``weave``: bucket -> bool), or None when this bucket was not measured."""
  entry = _entry(device_kind, cfg, tp, backend, directory)
  return entry.get("weave", {}).get(str(tuned.bucket(n_tokens)))


def tuned_backend(device_kind: str, cfg: ModelConfig, tp: int, backend: str, n_tokens: int,
                  directory: str | None = None) -> str | None:
  """The backend measured fastest for this token bucket when it is not ``backend`` itself (the
  entry's ``backend_by_bucket``: bucket -> backend name), else None."""
  entry = _entry(device_kind, cfg, tp, backend, directory)
  chosen = entry.get("backend_by_bucket", {}).get(str(tuned.bucket(n_tokens)))
  return chosen if chosen and chosen != backend else None


def weave_threshold(device_kind: str, cfg: ModelConfig, tp: int, backend: str,
                    directory: str | None = None, sms: int | None = None) -> int:
  """Smallest token count that is woven: the model's tuned ``min_tokens``, else the device's
  dense / MoE threshold (``weave_jax.tuned.kernel_params``).

  A tuned ``"min_tokens": null`` means the woven layer was slower than the unsplit one at every
  measured size: never weave (returns ``sys.maxsize``)."""
  entry = _entry(device_kind, cfg, tp, backend, directory)
  if "min_tokens" in entry:
    return sys.maxsize if entry["min_tokens"] is None else int(entry["min_tokens"])
  params = tuned.kernel_params(device_kind, tp, 0, sms=sms, directory=directory)
  return params.weave_min_tokens_moe if cfg.is_moe else params.weave_min_tokens_dense

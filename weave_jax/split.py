"""Where to split a batch into halves A and B.

Wave-aware default: a GEMM over M tokens runs ceil(M / tile_m) * ceil(N / tile_n) output tiles on
``sms`` multiprocessors in ceil(tiles / sms) waves; a split whose halves each end on a nearly
full wave wastes the least.  We score candidate offsets by the waves of every GEMM of a layer,
weighted by its K (work per tile), and take the best offset closest to the middle.

Tuned offsets (``run/tune_split.py``) override the heuristic; they live in
``weave_jax/tuning/splits.json`` keyed by device kind, model dims, TP and token bucket.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys

from weave_jax.config import ModelConfig

TILE_M = 128          # row tile of the large Hopper GEMM kernels (cuBLAS / XLA Triton: 128)
TILE_N = 256
TUNING_FILE = os.path.join(os.path.dirname(__file__), "tuning", "splits.json")


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


def tuning_key(device_kind: str, cfg: ModelConfig, tp: int, backend: str) -> str:
  return (f"{device_kind}|H{cfg.hidden_size}|F{cfg.intermediate_size}|E{cfg.num_experts}"
          f"|heads{cfg.num_heads}/{cfg.num_kv_heads}|tp{tp}|{backend}")


def bucket(n_tokens: int) -> int:
  """Token bucket: the next power of two (tuned offsets are stored per bucket)."""
  return 1 << max(0, (n_tokens - 1).bit_length())


def _load_table(path: str) -> dict:
  """The tuning table (re-read when the file changes, so a fresh tune takes effect)."""
  if not os.path.exists(path):
    return {}
  return _read_table(path, os.path.getmtime(path))


@functools.cache
def _read_table(path: str, mtime: float) -> dict:
  del mtime  # part of the cache key only
  with open(path) as f:
    return json.load(f)


def save_entry(key: str, entry: dict, path: str = TUNING_FILE) -> None:
  """Merge one tuned entry into the table (atomic replace)."""
  table = dict(_load_table(path))
  table[key] = entry
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(table, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def tuned_fraction(device_kind: str, cfg: ModelConfig, tp: int, backend: str, n_tokens: int,
                   path: str = TUNING_FILE) -> float | None:
  """The tuned split, as a fraction of the batch, for this bucket (None if not tuned)."""
  entry = _load_table(path).get(tuning_key(device_kind, cfg, tp, backend), {})
  return entry.get("splits", {}).get(str(bucket(n_tokens)))


def choose_split(n_tokens: int, cfg: ModelConfig, tp: int, device_kind: str = "",
                 sms: int | None = None, backend: str = "", path: str = TUNING_FILE) -> int:
  """Tuned offset when the cache has one for this device/model/TP/backend/bucket, else
  wave-aware."""
  frac = tuned_fraction(device_kind, cfg, tp, backend, n_tokens, path)
  if frac is not None:
    step = split_step(n_tokens, tp)
    s = round(n_tokens * frac / step) * step
    return min(max(s, step), max(step, n_tokens - step))
  return wave_aware_split(n_tokens, cfg, tp, sms)


def tuned_weave(device_kind: str, cfg: ModelConfig, tp: int, backend: str, n_tokens: int,
                path: str = TUNING_FILE) -> bool | None:
  """Whether the woven forward beat the unsplit one in this token bucket when tuned (the
  entry's ``weave``: bucket -> bool), or None when this bucket was not measured."""
  entry = _load_table(path).get(tuning_key(device_kind, cfg, tp, backend), {})
  return entry.get("weave", {}).get(str(bucket(n_tokens)))


def tuned_backend(device_kind: str, cfg: ModelConfig, tp: int, backend: str, n_tokens: int,
                  path: str = TUNING_FILE) -> str | None:
  """The backend measured fastest for this token bucket when it is not ``backend`` itself (the
  entry's ``backend_by_bucket``: bucket -> backend name), else None.  E.g. XLA's psum for
  decode-sized batches, where the fused kernel's model was slower (BENCHMARKS.md)."""
  entry = _load_table(path).get(tuning_key(device_kind, cfg, tp, backend), {})
  chosen = entry.get("backend_by_bucket", {}).get(str(bucket(n_tokens)))
  return chosen if chosen and chosen != backend else None


def weave_threshold(device_kind: str, cfg: ModelConfig, tp: int, backend: str, default: int,
                    path: str = TUNING_FILE) -> int:
  """Smallest token count that is woven (tuned per model and backend; ``default`` otherwise).

  A tuned ``"min_tokens": null`` means the woven layer was slower than the unsplit one at every
  measured size: never weave (returns ``sys.maxsize``)."""
  entry = _load_table(path).get(tuning_key(device_kind, cfg, tp, backend), {})
  if "min_tokens" not in entry:
    return default
  return sys.maxsize if entry["min_tokens"] is None else int(entry["min_tokens"])

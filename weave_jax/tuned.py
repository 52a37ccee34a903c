"""Tuned numbers, per device: one JSON table per device kind in ``weave_jax/tuning/``.

A table (``<device kind, non-alphanumerics as _>.json``, e.g. ``NVIDIA_H200.json``)::

    {"device_kind": "NVIDIA H200",
     "kernel": {"<tp>": {"ctas": 128, "weave_ctas": 32, "ce_ctas": 132,
                         "one_shot_max_bytes": ..., "woven_copy_engine_min_bytes": ...,
                         "ce_two_chunks_min_slice_bytes": ...,
                         "weave_min_tokens": {"dense": 1024, "moe": 2048},
                         "buckets": {"<token bucket>": {<any field above>: value}},
                         "note": "how and when it was measured"}},
     "models": {"<model key (weave_jax.split.model_key)>": {
                    "splits": {"<bucket>": fraction}, "weave": {"<bucket>": bool},
                    "min_tokens": int | null, "backend_by_bucket": {"<bucket>": name}}}}

Token buckets are powers of two (``bucket``).  A (device, TP) pair without a ``kernel`` entry
takes ``FALLBACK``, with one warning per pair.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import warnings

DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuning")


@dataclasses.dataclass(frozen=True)
class KernelParams:
  """The tuned numbers of the fused backends for one (device, TP, token bucket)."""
  ctas: int                            # blocks of unsplit calls' kernels
  weave_ctas: int                      # blocks of woven calls' kernels
  ce_ctas: int                         # blocks of the copy-engine algorithm's reduce kernel
  one_shot_max_bytes: int              # "auto" runs one_shot up to this message size
  woven_copy_engine_min_bytes: int     # "auto" runs woven calls on the copy engines from here
  ce_two_chunks_min_slice_bytes: int   # "auto" pipelines copy-engine calls in 2 chunks from here
  weave_min_tokens_dense: int          # smaller batches run unsplit (dense models)
  weave_min_tokens_moe: int            # same, mixture-of-experts models


#: The model for a device without a table entry: the values measured on 2 x H200 (TP=2,
#: JAX 0.11.2, 2026-11-22..30); woven calls get fewer blocks to leave the SMs to the overlapped
#: GEMMs.  ``ce_ctas`` is filled in per call: one block per SM of the device (132 when unknown).
FALLBACK = dict(ctas=128, weave_ctas=32, ce_ctas=None, one_shot_max_bytes=256 << 10,
                woven_copy_engine_min_bytes=8 << 20, ce_two_chunks_min_slice_bytes=32 << 20,
                weave_min_tokens_dense=1024, weave_min_tokens_moe=2048)
_FIELDS = tuple(f.name for f in dataclasses.fields(KernelParams))
_warned: set[tuple[str, int]] = set()


def bucket(n_tokens: int) -> int:
  """Token bucket: the next power of two."""
  return 1 << max(0, (int(n_tokens) - 1).bit_length())


def file_name(device_kind: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", device_kind).strip("_") + ".json"


def table_path(device_kind: str, directory: str | None = None) -> str:
  return os.path.join(directory or DIR, file_name(device_kind))


def load(device_kind: str, directory: str | None = None) -> dict:
  """The device's table ({} when it has none); re-read when the file changes."""
  path = table_path(device_kind, directory)
  if not os.path.exists(path):
    return {}
  table = _read(path, os.path.getmtime(path))
  if table.get("device_kind") != device_kind:
    raise ValueError(f"tuning table {path}: device_kind {table.get('device_kind')!r} != "
                     f"{device_kind!r}")
  return table


@functools.cache
def _read(path: str, mtime: float) -> dict:
  del mtime  # part of the cache key only
  with open(path) as f:
    table = json.load(f)
  _check(path, table)
  return table


def _check(path: str, table: dict) -> None:
  """Raises ValueError for a malformed table (a typo must not silently fall back)."""
  if not isinstance(table, dict) or not isinstance(table.get("device_kind"), str):
    raise ValueError(f"tuning table {path}: needs a string 'device_kind'")
  extra = set(table) - {"device_kind", "kernel", "models", "note"}
  if extra:
    raise ValueError(f"tuning table {path}: unknown keys {sorted(extra)}")
  for tp, entry in table.get("kernel", {}).items():
    if not tp.isdigit():
      raise ValueError(f"tuning table {path}: kernel key {tp!r} must be a TP size")
    layers = [entry] + list(entry.get("buckets", {}).values())
    for b in entry.get("buckets", {}):
      if not b.isdigit() or bucket(int(b)) != int(b):
        raise ValueError(f"tuning table {path}: tp {tp} bucket {b!r} is not a power of two")
    for layer in layers:
      for key, value in layer.items():
        if key in ("note", "buckets"):
          continue
        if key == "weave_min_tokens":
          if set(value) - {"dense", "moe"}:
            raise ValueError(f"tuning table {path}: tp {tp} weave_min_tokens keys must be "
                             "'dense' / 'moe'")
          continue
        if key not in _FIELDS:
          raise ValueError(f"tuning table {path}: tp {tp} unknown field {key!r}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
          raise ValueError(f"tuning table {path}: tp {tp} {key}={value!r} must be a positive int")


def _flatten(layer: dict) -> dict:
  out = {k: v for k, v in layer.items() if k in _FIELDS}
  for kind, n in layer.get("weave_min_tokens", {}).items():
    out[f"weave_min_tokens_{kind}"] = n
  return out


def kernel_params(device_kind: str, tp: int, n_tokens: int, *, sms: int | None = None,
                  directory: str | None = None) -> KernelParams:
  """The tuned numbers for (device, TP, bucket of ``n_tokens``): the bucket's entry over the
  TP's entry over ``FALLBACK`` (which a pair without a TP entry takes, warning once)."""
  entry = load(device_kind, directory).get("kernel", {}).get(str(tp))
  values = dict(FALLBACK, ce_ctas=sms or 132)
  if entry is None:
    if device_kind != "cpu" and (device_kind, tp) not in _warned:   # nothing to tune on a CPU
      _warned.add((device_kind, tp))
      warnings.warn(f"weave_jax.tuned: no tuned entry for {device_kind!r} at TP={tp}; using the "
                    "fallback model (weave_jax.tuned.FALLBACK: the 2 x H200 values, copy-engine "
                    "grid = SM count).  Measure and add one to weave_jax/tuning/"
                    f"{file_name(device_kind)}", RuntimeWarning, stacklevel=2)
  else:
    values.update(_flatten(entry))
    values.update(_flatten(entry.get("buckets", {}).get(str(bucket(n_tokens)), {})))
  return KernelParams(**values)


def model_entry(device_kind: str, key: str, directory: str | None = None) -> dict:
  """The tuned entry of one model/TP/backend (``weave_jax.split.model_key``), or {}."""
  return load(device_kind, directory).get("models", {}).get(key, {})


def save_model_entry(device_kind: str, key: str, entry: dict, directory: str | None = None) -> str:
  """Merges one model entry into the device's table (atomic replace).  Returns the path."""
  path = table_path(device_kind, directory)
  table = dict(load(device_kind, directory)) or {"device_kind": device_kind}
  table["models"] = dict(table.get("models", {}), **{key: entry})
  _check(path, table)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(table, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
  return path

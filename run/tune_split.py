#!/usr/bin/env python3
"""Tune the weave split offset and threshold on this device; cache them for the model to load.

For each token bucket (powers of two) it times the woven forward at candidate split offsets
(the wave-aware choice and fractions around the middle) and the unsplit forward, then stores
in the device's tuning table (``weave_jax/tuning/<device kind>.json``, ``weave_jax.tuned``),
keyed by model dims, TP and backend:
  - ``splits``: bucket -> best split fraction;
  - ``weave``: bucket -> whether the best woven forward beat the unsplit one (the engine's
    per-bucket choice, which takes precedence over the threshold for measured buckets);
  - ``min_tokens``: the smallest bucket from which woven beats unsplit at every larger bucket
    (null when it never does), used for buckets that were not measured.
TokenWeave brute-forces this offline for about a day per model; this takes minutes.

    python run/tune_split.py --preset llama-3.3-70b --layers 2 --backend rs_ag
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import numpy as np  # noqa: E402

from weave_jax import Engine, RunConfig, init_random, make_mesh, preset  # noqa: E402
from weave_jax import split as split_mod  # noqa: E402
from weave_jax import tuned  # noqa: E402
from weave_jax.bench import progress, time_fn  # noqa: E402

FRACTIONS = (0.375, 0.4375, 0.5, 0.5625, 0.625)


def candidates(n: int, cfg, tp: int, sms) -> list[int]:
  step = split_mod.split_step(n, tp)
  wave = split_mod.wave_aware_split(n, cfg, tp, sms)
  offs = {wave} | {round(n * f / step) * step for f in FRACTIONS}
  return sorted(s for s in offs if 0 < s < n)


def tune(args) -> dict:
  cfg = preset(args.preset, num_layers=args.layers)
  mesh = make_mesh(args.tp)
  tp = mesh.devices.size
  model = init_random(cfg, mesh)
  dev = mesh.devices.flat[0]
  sms = getattr(dev, "core_count", None)
  rng = np.random.default_rng(0)
  splits, wins = {}, {}
  for n in args.tokens:
    tokens = rng.integers(0, cfg.vocab_size, n)
    base = Engine(model, mesh, RunConfig(backend=args.backend, logits="last", backend_by_size=False))
    _, exe, a = base.prepare(tokens)
    unsplit = time_fn(lambda: exe(*a), iters=args.iters).median_ms
    best = None
    for s in candidates(n, cfg, tp, sms):
      eng = Engine(model, mesh, RunConfig(backend=args.backend, weave=True, weave_min_tokens=1,
                                          split=s, logits="last"))
      _, exe, a = eng.prepare(tokens)
      ms = time_fn(lambda: exe(*a), iters=args.iters).median_ms
      progress(f"{n:6d} tokens split {s:6d} ({s / n:.3f}): {ms:8.3f} ms   unsplit {unsplit:8.3f} ms")
      if best is None or ms < best[1]:
        best = (s, ms)
    splits[str(tuned.bucket(n))] = round(best[0] / n, 4)
    wins[n] = best[1] < unsplit
    progress(f"{n:6d} tokens: best split {best[0]} ({best[1]:.3f} ms) vs unsplit {unsplit:.3f} ms")
  # Weave from the smallest size after which it always wins (None: it never wins).
  min_tokens = None
  for n in sorted(args.tokens, reverse=True):
    if not wins[n]:
      break
    min_tokens = n
  key = split_mod.model_key(cfg, tp, args.backend)
  entry = {"splits": splits, "min_tokens": min_tokens, "layers": args.layers,
           "preset": args.preset,
           "weave": {str(tuned.bucket(n)): bool(w) for n, w in wins.items()}}
  path = tuned.save_model_entry(getattr(dev, "device_kind", dev.platform), key, entry, args.out)
  progress(f"saved {key} -> {entry} in {path}")
  return entry


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="llama-3.3-70b")
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--backend", default="rs_ag")
  p.add_argument("--tp", type=int, default=None)
  p.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--out", default=None,
                 help="directory of the tuning tables (default: weave_jax/tuning/)")
  tune(p.parse_args())


if __name__ == "__main__":
  main()

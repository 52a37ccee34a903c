"""Split-KV sweep and per-call device profile of the paged attention kernels (one GPU).

    python experimental/attention_splits.py                       # 16x4K, 1x16K, 64x4K
    python experimental/attention_splits.py --cases 16x16384 1x4096 --splits 1 2 4 8

Per decode case (Llama-3.1-8B heads, page 16, one new token per request): the Mosaic kernel at
each ``--splits`` count and at its default choice (marked *), the Triton kernel, and the jnp
reference where it is small.  Times as in run/bench_attention.py (8 chained calls per jitted
call, kept apart by optimization barriers on q and the pages, the step metadata shared);
fractions against the copy rate measured in the run.  With ``--profile`` (default on), the
device time of one call per kernel from a profiler trace, by XLA op: what the kernel costs
against the XLA ops around it.
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.paged_attention_ref import ragged_paged_attention_reference  # noqa: E402
from run.bench_attention import HEAD_DIM, KV_HEADS, Q_HEADS, build_step, chained  # noqa: E402
from weave_jax import trace  # noqa: E402
from weave_jax.bench import stream_gbps, time_fn  # noqa: E402

INNER = 8
PAGE = 16


def profile(fn, step) -> str:
  with tempfile.TemporaryDirectory() as d:
    path = trace.capture(jax.jit(fn), *step, logdir=d, steps=3)
    ops = trace.device_ops(trace.load_events(path))
  per_op = collections.defaultdict(float)
  for op in ops:
    per_op[op.name[:60]] += (op.end - op.start) / 3
  top = sorted(per_op.items(), key=lambda kv: -kv[1])[:6]
  return (f"device {sum(per_op.values()):.1f} us/call over {len(per_op)} ops: "
          + "; ".join(f"{k} {v:.1f}" for k, v in top))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cases", nargs="+", default=["16x4096", "1x16384", "64x4096"],
                 help="BATCHxCONTEXT decode cases")
  p.add_argument("--splits", type=int, nargs="+", default=[1, 4, 16])
  p.add_argument("--no-profile", action="store_true")
  args = p.parse_args(argv)
  if jax.default_backend() != "gpu":
    print("attention_splits: needs a GPU")
    return 2
  from pallas_kernels.ragged_paged_attention_mosaic import (default_num_splits,
                                                            ragged_paged_attention_mosaic)
  from pallas_kernels.ragged_paged_attention_triton import ragged_paged_attention_triton
  copy = max(stream_gbps().values())
  print(f"{jax.devices()[0].device_kind}: copy {copy:.0f} GB/s (read + write)", flush=True)
  rng, key = np.random.default_rng(0), jax.random.key(0)
  for case in args.cases:
    batch, ctx = (int(v) for v in case.split("x"))
    step = build_step(rng, [1] * batch, [ctx] * batch, PAGE, key)
    nbytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * 2
    default = default_num_splits(batch, Q_HEADS, KV_HEADS, PAGE, step[4].shape, 1)
    impls = {f"mosaic s={s}{'*' if s == default else ''}":
             functools.partial(ragged_paged_attention_mosaic, num_splits=s)
             for s in sorted(set(args.splits) | {default})}
    impls["triton"] = ragged_paged_attention_triton
    if batch * ctx <= 16384:
      impls["reference"] = ragged_paged_attention_reference
    cells = []
    for name, fn in impls.items():
      run = chained(fn, INNER)
      us = time_fn(lambda: run(*step), warmup=2, iters=15).median_ms / INNER * 1e3
      cells.append(f"{name} {us:.1f} us ({nbytes / us / 1e3 / copy:.0%})")
    print(f"{batch} x {ctx} ({nbytes / 2**20:.0f} MiB): " + " | ".join(cells), flush=True)
    if not args.no_profile:
      for name in (f"mosaic s={default}*", "triton"):
        print(f"  {name}: {profile(impls[name], step)}", flush=True)
    del step
  return 0


if __name__ == "__main__":
  sys.exit(main())

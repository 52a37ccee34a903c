"""The Mosaic paged attention kernel at 64 against 128 cache slots per pipeline step
(``block_kv``), and where a chained decode call's wall time goes (one GPU).

    python experimental/attention_block_kv.py

Cases (Llama-3.1-8B heads, page 16): one 2K-token prefill chunk over prefixes 0 / 4K / 16K
(two compute warpgroups), 64 decodes at 2K beside a 1984-token chunk, and 16 and 64 decodes at
4K (one warpgroup).  Times as in run/bench_attention.py (8 chained calls per jitted call); both
step sizes' outputs are compared with each other.  Last, a profiler trace of the 16 x 4K decode
chain: the device span and busy time per attention call against the wall time above, which
also carries the jitted call's dispatch and the host's wait.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from run.bench_attention import (HEAD_DIM, KV_HEADS, build_step, causal_flops,  # noqa: E402
                                 chained)
from weave_jax import trace  # noqa: E402
from weave_jax.bench import stream_gbps, time_fn  # noqa: E402

INNER = 8
PAGE = 16
CHUNK = 2048
CASES = [  # (name, q_lens, kv_lens)
    ("prefill p0", [CHUNK], [CHUNK]),
    ("prefill p4k", [CHUNK], [CHUNK + 4096]),
    ("prefill p16k", [CHUNK], [CHUNK + 16384]),
    ("mixed 64x2k+1984", [1] * 64 + [1984], [2048] * 64 + [1984]),
    ("decode 16x4k", [1] * 16, [4096] * 16),
    ("decode 64x4k", [1] * 64, [4096] * 64),
]


def cell(name: str, kv_lens, us: float, copy: float) -> str:
  if name.startswith("prefill"):
    return f"{causal_flops(CHUNK, kv_lens[0] - CHUNK) / us / 1e6:.0f} TFLOP/s"
  if name.startswith("decode"):
    return f"{2 * sum(kv_lens) * KV_HEADS * HEAD_DIM * 2 / us / 1e3 / copy:.0%} of copy"
  return ""


def decode_timeline(mosaic, rng, key) -> None:
  step = build_step(rng, [1] * 16, [4096] * 16, PAGE, key)
  run = chained(mosaic, INNER)
  with tempfile.TemporaryDirectory() as d:
    events = trace.load_events(trace.capture(run, *step, logdir=d, steps=3, hlo_table=False))
  for i, mine in trace.step_ops(trace.device_ops(events), trace.step_windows(events)):
    if not mine:
      continue
    span = max(o.end for o in mine) - min(o.start for o in mine)
    busy = trace.measure(trace.union([(o.start, o.end) for o in mine]))
    kernel = sum(o.end - o.start for o in mine if "mosaic" in o.name)
    print(f"trace 16x4k, jitted call {i}: {len(mine)} ops; per attention call: span "
          f"{span / INNER:.1f} us, busy {busy / INNER:.1f} us, Mosaic kernel "
          f"{kernel / INNER:.1f} us", flush=True)


def main(argv=None) -> int:
  argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
  if jax.default_backend() != "gpu":
    print("attention_block_kv: needs a GPU")
    return 2
  from pallas_kernels.ragged_paged_attention_mosaic import ragged_paged_attention_mosaic
  copy = max(stream_gbps().values())
  print(f"{jax.devices()[0].device_kind}: copy {copy:.0f} GB/s (read + write)", flush=True)
  rng, key = np.random.default_rng(0), jax.random.key(0)
  for name, q_lens, kv_lens in CASES:
    step = build_step(rng, q_lens, kv_lens, PAGE, key)
    outs, cells = {}, []
    for block_kv in (64, 128):
      fn = functools.partial(ragged_paged_attention_mosaic, block_kv=block_kv)
      outs[block_kv] = jax.jit(fn)(*step)
      run = chained(fn, INNER)
      us = time_fn(lambda: run(*step), warmup=2, iters=15).median_ms / INNER * 1e3
      cells.append(f"block_kv={block_kv} {us:.1f} us {cell(name, kv_lens, us, copy)}")
    diff = jnp.max(jnp.abs(outs[64].astype(jnp.float32) - outs[128].astype(jnp.float32)))
    print(f"{name}: " + " | ".join(cells) + f" | max|diff| {float(diff):.3g}", flush=True)
    del step, outs
  decode_timeline(ragged_paged_attention_mosaic, rng, key)
  return 0


if __name__ == "__main__":
  sys.exit(main())

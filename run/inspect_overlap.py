#!/usr/bin/env python3
"""Static + dynamic overlap check for the woven schedule on this machine.

For each variant: compile at --tokens, print which collectives have compute scheduled between
their start and done (compiled HLO), optionally dump the HLO and capture a profiler trace.

    python run/inspect_overlap.py --preset llama-3.3-70b --layers 2 --tokens 4096 \
        --variants baseline rs_ag+weave --hlo-dir out/ --trace-dir out/traces
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax  # noqa: E402
import numpy as np  # noqa: E402

from weave_jax import hlo_order, init_random, make_mesh, preset  # noqa: E402
from run_common import engine_for, variant_arg  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--preset", default="llama-3.3-70b")
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--variants", nargs="+", default=["baseline", "rs_ag+weave"], type=variant_arg)
  p.add_argument("--hlo-dir", default=None)
  p.add_argument("--trace-dir", default=None)
  args = p.parse_args()
  cfg = preset(args.preset, num_layers=args.layers)
  mesh = make_mesh()
  model = init_random(cfg, mesh)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, args.tokens)
  for v in args.variants:
    eng = engine_for(model, mesh, v)
    plan, exe, ex_args = eng.prepare(tokens)
    text = exe.as_text()
    print(f"{v:12s} split={plan.split}: {hlo_order.summary(text)}", flush=True)
    if args.hlo_dir:
      os.makedirs(args.hlo_dir, exist_ok=True)
      with open(os.path.join(args.hlo_dir, f"{v.replace('+', '_')}_{args.tokens}.hlo.txt"), "w") as f:
        f.write(text)
    if args.trace_dir:
      for _ in range(3):
        jax.block_until_ready(exe(*ex_args))
      d = os.path.join(args.trace_dir, v.replace("+", "_"))
      with jax.profiler.trace(d, create_perfetto_trace=True):
        for i in range(2):
          with jax.profiler.StepTraceAnnotation("step", step_num=i):
            jax.block_until_ready(exe(*ex_args))
      print(f"  trace in {d}", flush=True)


if __name__ == "__main__":
  main()

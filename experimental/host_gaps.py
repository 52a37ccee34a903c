"""Where the host time of a chain of small fused calls goes (diagnostic, >= 2 GPUs).

    python experimental/host_gaps.py [--tokens 8] [--calls 256] [--top 12]

At <= 256 KiB a fused call keeps the GPU busy ~10 µs, but a chain of them in one jit took 20-27
µs per call in wall time (2 x H200, 2026-12-01) until the benchmark was found to reshard its
inputs at every execution (BENCHMARKS.md); inputs here are placed as the program takes them. For
each chain (fused "auto" through the plain target and through its default, the command-buffer
target; XLA psum + norm; and trivial XLA kernels, for XLA's own per-op cost) this prints the
wall time per call in the chain, the time of one call alone, the slope between them (per call,
without the execution's fixed cost) and the handler's invocation counts (a replayed CUDA graph
runs the handler fewer times than calls); then it profiles one run of each non-graph chain and
prints, per host thread, the events that took the most time per call (XLA thunks, CUDA driver
calls). Profiling slows everything and changes command-buffer behaviour, so the graph chain is
timed but not profiled.
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import statistics
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "run"))

from bench_allreduce_norm import chain, placed_inputs  # noqa: E402  (jax imported lazily)

EPS = 1e-6


def host_table(logdir, calls, top):
  """Lines: per host thread, the `top` event names by total time, per call of the chain."""
  from weave_jax import trace as tr

  events = tr.load_events(tr.find_trace(logdir))
  procs, threads = tr._names(events)
  windows = tr.step_windows(events)
  if not windows:
    return ["  (no step window in the trace)"]
  _, start, end = windows[0]
  per = collections.defaultdict(list)  # (thread, name) -> durations
  for e in events:
    if e.get("ph") != "X" or "/device:" in procs.get(e.get("pid"), ""):
      continue
    if start <= float(e["ts"]) <= end and e.get("name") != "step":
      per[(threads.get((e["pid"], e.get("tid")), "?"), e["name"])].append(float(e["dur"]))
  by_thread = collections.defaultdict(list)
  for (thread, name), durs in per.items():
    by_thread[thread].append((sum(durs) / calls, len(durs) / calls, statistics.median(durs), name))
  lines = [f"  step window {end - start:.0f} us = {(end - start) / calls:.1f} us per call"]
  for thread, rows in sorted(by_thread.items(), key=lambda kv: -sum(r[0] for r in kv[1])):
    lines.append(f"  thread {thread!r}: {sum(r[0] for r in rows):.1f} us of events per call")
    for total, count, med, name in sorted(rows, reverse=True)[:top]:
      lines.append(f"    {total:7.2f} us/call  {count:5.2f}x  median {med:6.2f} us  {name[:90]}")
  return lines


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", type=int, default=8, help="tokens per call (8 = 128 KiB at H=8192)")
  ap.add_argument("--hidden", type=int, default=8192)
  ap.add_argument("--calls", type=int, default=256, help="chained calls per jit")
  ap.add_argument("--reps", type=int, default=9)
  ap.add_argument("--top", type=int, default=12)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from weave_jax import Workspace
  from weave_jax.bench import time_fn
  from weave_jax.comm.base import AXIS
  from weave_jax.comm.xla import Psum
  from weave_jax.fused import ops

  gpus = jax.devices("gpu")[:2]
  mesh = jax.sharding.Mesh(np.array(gpus), (AXIS,))
  ws = Workspace(mesh, max_tokens=max(args.tokens, 64), hidden=args.hidden,
                 dtype=jnp.bfloat16, axis_name=AXIS).open()
  n = args.calls

  def trivial(p, r, w):  # one small XLA kernel per call: the barrier stops XLA fusing them
    return jax.lax.optimization_barrier(p * w + 1), r

  fused_call = lambda p, r, w, **kw: ops.fused_reduce_add_norm(p, r, w, eps=EPS, workspace=ws,
                                                               **kw)
  steps = {
      "fused_auto_plain": lambda p, r, w: fused_call(p, r, w, cmd_buffer=False),
      "fused_auto": fused_call,  # CUDA graphs
      "xla_psum_norm": lambda p, r, w: Psum().reduce_add_norm(p, r, w, eps=EPS),
      "xla_trivial_kernel": trivial,
  }
  sharded = {"xla_psum_norm": False}
  partial, residual, weight = placed_inputs(mesh, args.tokens, args.hidden, seed=0)
  rank0 = ws.ordinals[0]

  def wall_ms(f, a):
    """Median ms of one execution after two warm-ups."""
    return time_fn(lambda: f(*a), warmup=2, iters=args.reps).median_ms

  try:
    for name, step in steps.items():
      a = (partial, residual[sharded.get(name, True)], weight)
      f = chain(mesh, step, sharded.get(name, True), n)
      before = ws.handler_calls()[rank0]
      ms_n = wall_ms(f, a)
      after = ws.handler_calls()[rank0]
      ms_1 = wall_ms(chain(mesh, step, sharded.get(name, True), 1), a)
      # per call from the slope between 1 and n calls: the execution's fixed cost cancels
      print(f"{name}: {ms_n * 1e3 / n:.1f} us/call wall in a chain of {n}; 1 call "
            f"{ms_1 * 1e3:.1f} us; slope {(ms_n - ms_1) * 1e3 / (n - 1):.1f} us/call; handler "
            f"invocations {after[0] - before[0]} ({after[1] - before[1]} under capture) for "
            f"{n * (args.reps + 2)} calls", flush=True)
      if name == "fused_auto":  # graphs: profiling would change what runs
        continue
      with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
          with jax.profiler.StepTraceAnnotation("step", step_num=0):
            jax.block_until_ready(f(*a))
        print("\n".join(host_table(logdir, n, args.top)), flush=True)
  finally:
    ws.close()


if __name__ == "__main__":
  main()

#!/usr/bin/env python3
"""One serving step on device: ModelRunner's compile times, decode step latency and prefill
step time against the prefill-only Engine forward (random weights).

    python run/bench_serve_step.py                          # Llama-3.1-8B shapes, TP=1, bf16
    python run/bench_serve_step.py --layers 8 --batches 1 64
    python run/bench_serve_step.py --allow-cpu --preset tiny --context 64 --batches 1 4 \
        --prefill-tokens 64                                 # CPU smoke run

Printed:
- the KV cache line and one line per compiled bucket (ModelRunner.compile_all), total compile;
- per decode batch B (every request one new token after ``--context`` cached tokens): the step
  through ``ModelRunner.execute`` (host metadata + one device_put + the step and sampler
  programs + fetching the sampled ids), the two programs alone (``ModelRunner.launch`` on an
  input already placed), the host-side metadata build alone (``ModelRunner.prepare``), and the
  median of each phase of an execute (meta, put, launch = enqueueing both programs, wait = the
  device finishing plus the copy of the sampled ids): where a step's host time goes.
  Where B x pages exceeds the pool, requests share pages (said so);
- the prefill step of ``--prefill-tokens`` tokens (one request, empty cache) against
  ``Engine`` with RunConfig(logits="last") on the same weights, timed interleaved, and the
  ratio (target: <= 1.05);
- on GPU, per decode batch and for the prefill step: CUDA graph launches and kernel launches
  per step, from a profiler trace (graph launches > 0: XLA's command buffers replay).
"""
from __future__ import annotations

import os

# Leave room for the KV cache: JAX's default pool is 75% of the device.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from weave_jax import Engine, RunConfig, init_random, make_mesh, preset, trace  # noqa: E402
from weave_jax.bench import time_fn, time_interleaved, write_json  # noqa: E402
from run.serve_common import decode_block_tables  # noqa: E402
from weave_jax.serve import ModelRunner, SamplingParams, ScheduledChunk  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


def parse_args(argv=None):
  gpu = jax.default_backend() == "gpu"
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="llama-3.1-8b")
  p.add_argument("--layers", type=int, default=None, help="default: the preset's")
  p.add_argument("--tp", type=int, default=1)
  p.add_argument("--backend", default="psum")
  p.add_argument("--weave", action="store_true")
  p.add_argument("--paged-attention", default="auto",
                 help="RunConfig.paged_attention (default auto: the fastest kernel verified on "
                      "this device, Mosaic GPU on Hopper)")
  p.add_argument("--context", type=int, default=2048, help="cached tokens of each decode request")
  p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
  p.add_argument("--prefill-tokens", type=int, default=2048)
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--num-pages", type=int, default=None, help="default: from free memory (GPU)")
  p.add_argument("--memory-fraction", type=float, default=0.9)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--compile", choices=("all", "used"), default="all",
                 help="all: every bucket ahead (what a server does; a line per bucket); used: only "
                      "the buckets this run steps through (quicker on a full-depth model)")
  p.add_argument("--json", default=None, help="write the results here")
  p.add_argument("--allow-cpu", action="store_true", help="run on CPU (smoke test)")
  args = p.parse_args(argv)
  if not gpu and not args.allow_cpu:
    p.error(f"no GPU visible to JAX (backend {jax.default_backend()}); --allow-cpu to run anyway")
  if not gpu and args.num_pages is None:
    args.num_pages = 256
  return args


def decode_chunks(batch: int, context: int, page_size: int, num_pages: int):
  """``batch`` requests, each one token at position ``context``.  Each request gets its own
  consecutive pages when the pool holds them all; otherwise the requests share their prefix
  pages and only the last page, which the step writes, is per request.  Returns (chunks,
  shared)."""
  try:
    tables, _, shared = decode_block_tables(batch, math.ceil((context + 1) / page_size),
                                            num_pages)
  except ValueError as err:
    raise SystemExit(f"context {context}: {err}") from None
  chunks = [ScheduledChunk(i, np.array([1 + i % 100], np.int32), context, table, True, GREEDY, 0)
            for i, table in enumerate(tables)]
  return chunks, shared


def launches(fn, steps: int = 5) -> str:
  """CUDA graph launches and kernel launches per call of ``fn``, counted in a profiler trace
  (the CUDA API events CUPTI records).  XLA forms command buffers from thunks after the HLO is
  final, so the HLO text cannot show them; a replayed graph shows as ``cuGraphLaunch``."""
  with tempfile.TemporaryDirectory() as logdir:
    jax.block_until_ready(fn())
    with jax.profiler.trace(logdir):
      for _ in range(steps):
        jax.block_until_ready(fn())
    events = trace.load_events(trace.find_trace(logdir))
  names = [str(e.get("name", "")).lower() for e in events if e.get("ph") == "X"]
  graphs = sum("graphlaunch" in n for n in names)
  kernels = sum("launchkernel" in n for n in names)
  if not graphs and not kernels:
    return "no CUDA launch events in the trace"
  return f"{graphs / steps:.0f} graph + {kernels / steps:.0f} kernel launches per step"


def placed_step(runner: ModelRunner, chunks):
  """(step shape, its packed input already on device): a step with no host work left."""
  _, shape, packed = runner.prepare(chunks)
  return shape, jax.device_put(packed, runner._replicated)


def launcher(runner: ModelRunner, shape, buf):
  """The step and its (greedy) sampler on a placed input; returns the sampled ids on device."""
  return lambda: runner.launch(shape, buf, "greedy")[0]


def execute_phases(runner: ModelRunner, chunks, *, warmup: int, iters: int) -> dict[str, float]:
  """Median ms of each host phase of ``ModelRunner.execute``: build the metadata ("meta"),
  place it ("put"), enqueue the step and sampler programs ("launch": returns before the device
  is done), then wait for the sampled ids and copy them to the host ("wait")."""
  samples: dict[str, list[float]] = {"meta": [], "put": [], "launch": [], "wait": []}
  for i in range(warmup + iters):
    t0 = time.perf_counter()
    _, shape, packed = runner.prepare(chunks)
    t1 = time.perf_counter()
    buf = jax.device_put(packed, runner._replicated)
    t2 = time.perf_counter()
    out, _ = runner.launch(shape, buf, "greedy")
    t3 = time.perf_counter()
    np.asarray(out)
    t4 = time.perf_counter()
    if i >= warmup:
      for name, dt in zip(samples, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
        samples[name].append(dt * 1e3)
  return {name: float(np.median(v)) for name, v in samples.items()}


def compile_used(runner: ModelRunner, args) -> None:
  """Compile the decode buckets and the prefill bucket this run uses, a line each."""
  shapes = {runner.shape(runner.bucket(b), decode=True) for b in args.batches}
  shapes.add(runner.shape(runner.bucket(args.prefill_tokens), decode=False))
  for shape in sorted(shapes, key=lambda s: (s.bucket, s.split is None)):
    t = time.perf_counter()
    runner.program(shape)
    runner.sampler_program(shape.sample_rows, "greedy")
    print(f"[serve] compiled bucket {shape.bucket} "
          f"({'unsplit' if shape.split is None else f'woven at {shape.split}'}) and its sampler in "
          f"{time.perf_counter() - t:.1f} s", flush=True)


def main(argv=None):
  args = parse_args(argv)
  cfg = preset(args.preset)
  cfg = preset(args.preset, num_layers=args.layers or cfg.num_layers)
  dev = jax.devices()[0]
  print(f"device: {getattr(dev, 'device_kind', dev.platform)} x{jax.device_count()}, jax "
        f"{jax.__version__}, {args.preset} ({cfg.num_layers} layers, {cfg.dtype}), TP={args.tp}, "
        f"backend {args.backend}{' woven' if args.weave else ''}", flush=True)
  mesh = make_mesh(args.tp)
  model = init_random(cfg, mesh)
  run = RunConfig(backend=args.backend, weave=args.weave, paged_attention=args.paged_attention)
  t0 = time.perf_counter()
  runner = ModelRunner(model, mesh, run, page_size=args.page_size, num_pages=args.num_pages,
                       memory_fraction=args.memory_fraction,
                       max_model_len=args.context + args.page_size,
                       max_num_batched_tokens=args.prefill_tokens,
                       max_num_seqs=max(args.batches), compile_ahead=args.compile == "all")
  if args.compile == "used":
    compile_used(runner, args)
  print(f"runner ready in {time.perf_counter() - t0:.1f} s", flush=True)
  results = {"device": getattr(dev, "device_kind", dev.platform), "jax": jax.__version__,
             "preset": args.preset, "layers": cfg.num_layers, "tp": args.tp,
             "paged_attention": runner.attention_impl, "decode": {}, "prefill": {}}

  print(f"\ndecode, {args.context} cached tokens per request (ms, median of {args.iters}):")
  print(f"{'batch':>6} {'execute':>9} {'program':>9} {'host meta':>10}  {'execute phases':<40}"
        "  notes")
  for b in args.batches:
    chunks, shared = decode_chunks(b, args.context, args.page_size, runner.num_pages)
    step = time_fn(lambda: runner.execute(chunks), warmup=args.warmup, iters=args.iters)
    shape, buf = placed_step(runner, chunks)
    device = time_fn(launcher(runner, shape, buf), warmup=args.warmup, iters=args.iters)
    host = time_fn(lambda: runner.prepare(chunks), warmup=args.warmup, iters=args.iters)
    phases = execute_phases(runner, chunks, warmup=args.warmup, iters=args.iters)
    phase_text = " ".join(f"{k} {v:.3f}" for k, v in phases.items())
    notes = f"bucket {shape.bucket}"
    if jax.default_backend() == "gpu":
      notes += f"; {launches(launcher(runner, shape, buf))}"
    if shared:
      notes += "; pool too small: requests share pages"
    print(f"{b:>6} {step.median_ms:>9.3f} {device.median_ms:>9.3f} {host.median_ms:>10.3f}  "
          f"{phase_text:<40}  {notes}", flush=True)
    results["decode"][b] = {"execute_ms": step.median_ms, "program_ms": device.median_ms,
                            "host_ms": host.median_ms, "phases_ms": phases,
                            "shared_pages": shared}

  n = args.prefill_tokens
  prompt = np.random.RandomState(0).randint(0, cfg.vocab_size, n).astype(np.int32)
  table = np.arange(math.ceil(n / args.page_size), dtype=np.int32) % runner.num_pages
  chunks = [ScheduledChunk(0, prompt, 0, table, True, GREEDY, 0)]
  shape, buf = placed_step(runner, chunks)
  engine = Engine(model, mesh, RunConfig(backend=args.backend, weave=args.weave, logits="last"))
  _, fwd, fwd_args = engine.prepare(prompt)

  t = time_interleaved({"runner step": launcher(runner, shape, buf),
                        "Engine forward": lambda: fwd(*fwd_args)},
                       warmup=args.warmup, iters=args.iters)
  execute = time_fn(lambda: runner.execute(chunks), warmup=args.warmup, iters=args.iters)
  ratio = t["runner step"].median_ms / t["Engine forward"].median_ms
  kind = "unsplit" if shape.split is None else f"woven at {shape.split}"
  print(f"\nprefill {n} tokens (bucket {shape.bucket}, {kind}): runner step "
        f"{t['runner step'].median_ms:.3f} ms (execute {execute.median_ms:.3f} ms), Engine forward "
        f"{t['Engine forward'].median_ms:.3f} ms, ratio {ratio:.3f} (target <= 1.05)", flush=True)
  if jax.default_backend() == "gpu":
    print(f"prefill step: {launches(launcher(runner, shape, buf))}", flush=True)
  results["prefill"] = {"tokens": n, "step_ms": t["runner step"].median_ms,
                        "execute_ms": execute.median_ms,
                        "engine_ms": t["Engine forward"].median_ms, "ratio": ratio}
  if args.json:
    write_json(results, args.json)


if __name__ == "__main__":
  main()

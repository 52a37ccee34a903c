"""Microbenchmark: AllReduce + residual add + RMSNorm on --tp GPUs (default 2), H=8192, bf16.

    python run/bench_allreduce_norm.py [--tp 2] [--hidden 8192] [--min-tokens 8] [--max-tokens 32768]

Methods (each row: the median per-call time and busbw = 2*(n-1)/n * bytes / t, bytes = T*H*2):
  xla_psum_norm     XLA psum + residual add + RMSNorm on every token
  xla_rs_norm_ag    XLA reduce-scatter + add + norm on 1/n tokens + all-gather
  fused_p2p_cN      the fused kernel "auto" picks (ops.choose_algorithm: one-shot up to the
                    tuned size, else two-shot), N CTAs
  fused_ce_gN       the copy-engine algorithm, local reduce kernel of N blocks
  fused_1shot_cN    the one-shot kernel with N CTAs (messages up to 1 MiB per source)
  fused_auto        what the fused_p2p backend runs by default (ops.choose_algorithm)
  fused_p2p_cN_plain   fused_p2p_cN through the plain target (--plain-ctas): XLA launches every
                    call from the host.  The other fused methods take the default target, which
                    XLA records into CUDA graphs where that is verified (ops.graph_target_default:
                    not the copy engines); column command_buffer is True when the handler ran
                    fewer times than calls were timed (a graph was replayed)
  fused_auto_plain  fused_auto through the plain target (--plain-ctas auto)
  torch_1shot_norm  torch.ops.symm_mem.one_shot_all_reduce + add + rms_norm (--tp processes)
  torch_2shot_norm  torch.ops.symm_mem.two_shot_all_reduce_ + add + rms_norm (--tp processes)

Timing: JAX methods run N calls chained by data inside one jit (unrolled, no host round trip
between calls), timed with wall clock around block_until_ready over several repeats after a
warm-up; the median divided by N is reported (it includes 1/N of one dispatch).  Torch methods
use CUDA events around N calls.  Multicast stays disabled everywhere (TORCH_SYMM_MEM_DISABLE_
MULTICAST=1 is forced for the torch processes).  Writes benchmarks/results/allreduce_norm_<device>.json
(..._tp<N>.json for --tp N other than 2).

--device-time also profiles one repeat of every JAX method per size and reports dev_us: the GPU
busy time per call on device 0 (union of its kernels and copies), without host launch gaps.

--phases also runs every fused kernel method's chain 3 more times per size with the kernels' phase
stamps on (weave_jax.fused.phases) and reports, for the chain's last call, each phase's median µs
over blocks and devices.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EPS = 1e-6


def n_calls(tokens: int) -> int:
  """Calls chained per jit: enough that one execution's fixed cost (dispatch to both devices,
  ~0.13-0.14 ms measured by run/host_gaps.py on 2 x H200) stays under 1 µs per call at small
  sizes."""
  return 256 if tokens <= 256 else 64 if tokens <= 1024 else 32 if tokens <= 8192 else 8


def device_busy_us(logdir, n_calls_by_step):
  """{step: busy us per call on GPU 0} from a profile whose steps are StepTraceAnnotations."""
  from weave_jax import trace as tr

  events = tr.load_events(tr.find_trace(logdir))
  ops = [o for o in tr.device_ops(events) if o.device.endswith(":0") or o.device.endswith("GPU:0")]
  out = {}
  for step, start, end in tr.step_windows(events):
    spans = [(o.start, o.end) for o in ops if start <= o.start <= end]
    if spans:
      out[step] = tr.measure(spans) / n_calls_by_step[step]
  return out


def chain(mesh, step, residual_sharded: bool, n: int):
  """jit of `n` calls of `step(partial, residual, weight)` chained by data inside shard_map over
  `mesh` (each call consumes the previous call's outputs), residual sharded by token or
  replicated."""
  import jax
  from jax.sharding import PartitionSpec as P

  from weave_jax.comm.base import AXIS

  def local(partial, residual, weight):
    for _ in range(n):
      partial, residual = step(partial, residual, weight)
    return partial[None], residual
  rspec = P(AXIS) if residual_sharded else P()
  # check_vma=False: with vma checking, psum of an already-reduced (invariant) value need not
  # communicate; the benchmark must run a real all-reduce on every call.
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), rspec, P()),
                               out_specs=(P(AXIS), rspec), check_vma=False))


def placed_inputs(mesh, tokens: int, hidden: int, seed: int):
  """Random bf16 (partial, {residual_sharded: residual}, weight) for `chain`, placed as its
  programs take them, so no execution reshards its inputs first."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from weave_jax.comm.base import AXIS

  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  k = jax.random.split(jax.random.key(seed), 3)
  partial = jax.random.normal(k[0], (mesh.size * tokens, hidden)).astype(jnp.bfloat16)
  res_full = jax.random.normal(k[1], (tokens, hidden)).astype(jnp.bfloat16)
  weight = (1 + 0.1 * jax.random.normal(k[2], (hidden,))).astype(jnp.bfloat16)
  return (put(partial, P(AXIS)), {True: put(res_full, P(AXIS)), False: put(res_full, P())},
          put(weight, P()))


def ints_or_auto(text: str) -> list:
  """"auto,1,4" -> ["auto", 1, 4] ("" -> [])."""
  return [c if c == "auto" else int(c) for c in text.split(",") if c]


def replayed(before, after, calls):
  """Whether the synchronous fused handler's counts (invocations, under capture) before and after
  `calls` executed calls show a replayed CUDA graph: fewer invocations than calls.  None when
  the handler did not run (XLA methods, or the start/done targets)."""
  invocations = after[0] - before[0]
  if invocations == 0:
    return None
  return invocations < calls


def stamp_algorithm(method, tokens, hidden, ws):
  """The kernel a fused bench method runs at `tokens` (its phase-stamp points), or None."""
  from weave_jax.fused import ops

  if method.startswith("fused_1shot"):
    return "one_shot"
  if method.startswith("fused_p2p") or method == "fused_auto":
    return ops.choose_algorithm(tokens, hidden, 2, ws)
  return None  # XLA methods, copy engine (its kernel records no stamps)


def phase_times(ws, f, args, algorithm, reps=3):
  """Median over `reps` runs of `f` of each phase's stamps summary (µs) of its last call."""
  import jax

  from weave_jax.fused import phases

  runs = []
  for _ in range(reps):
    phases.enable(ws, True)
    jax.block_until_ready(f(*args))
    runs.append(phases.summary(phases.read(ws), algorithm))
  phases.enable(ws, False)
  return {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]}


def jax_methods(hidden, sizes, ctas_list, plain_ctas, reps, ce_grids=(), oneshot_ctas=(),
                device_time=False, stamp_phases=False, tp=2, ce_chunks=()):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from weave_jax import fused
  from weave_jax.comm.base import AXIS
  from weave_jax.comm.xla import Psum, ReduceScatterAllGather
  from weave_jax.fused import ops

  gpus = jax.devices("gpu")[:tp]
  if len(gpus) < tp:
    raise SystemExit(f"--tp {tp}: only {len(gpus)} GPUs visible")
  mesh = jax.sharding.Mesh(np.array(gpus), (AXIS,))
  ws = fused.Workspace(mesh, max_tokens=max(sizes), hidden=hidden, dtype=jnp.bfloat16).open()
  rank0 = gpus[0].local_hardware_id
  fused_call = lambda p, r, w, **kw: ops.fused_reduce_add_norm(p, r, w, eps=EPS, workspace=ws,
                                                               **kw)

  methods = {"xla_psum_norm": (lambda p, r, w: Psum().reduce_add_norm(p, r, w, eps=EPS), False),
             "xla_rs_norm_ag": (lambda p, r, w: ReduceScatterAllGather().reduce_add_norm(
                 p, r, w, eps=EPS), True)}
  for c in ctas_list:
    methods[f"fused_p2p_c{c}"] = (lambda p, r, w, c=c: fused_call(p, r, w, ctas=c), True)
  for c in oneshot_ctas:
    methods[f"fused_1shot_c{c}"] = (
        lambda p, r, w, c=c: fused_call(p, r, w, algorithm="one_shot", ctas=c), True)
  for g in ce_grids:
    for k in ce_chunks or ["auto"]:  # "auto": ops.ce_chunks_for; k: that many pipeline chunks
      name = f"fused_ce_g{g}" + ("" if k == "auto" else f"_k{k}")
      methods[name] = (lambda p, r, w, g=g, k=k: fused_call(
          p, r, w, algorithm="copy_engine", ce_ctas=g, ce_chunks=k), True)
  methods["fused_auto"] = (lambda p, r, w: fused_call(p, r, w), True)
  for c in plain_ctas:  # the plain target: XLA launches every call from the host
    name = "fused_auto_plain" if c == "auto" else f"fused_p2p_c{c}_plain"
    kw = {} if c == "auto" else dict(ctas=c)
    methods[name] = (lambda p, r, w, kw=kw: fused_call(p, r, w, cmd_buffer=False, **kw), True)

  rows = []
  for tokens in sizes:
    n = n_calls(tokens)
    partial, residual, weight = placed_inputs(mesh, tokens, hidden, seed=tokens)
    timed = []  # (row index, compiled fn, args) for --device-time
    for name, (step, sharded) in methods.items():
      if name.startswith("fused_1shot") and tokens > ws.one_shot_rows():
        continue
      try:
        f = chain(mesh, step, sharded, n)
        args = (partial, residual[sharded], weight)
        jax.block_until_ready(f(*args))  # compile + warm-up
        jax.block_until_ready(f(*args))
        before = ws.handler_calls()[rank0]
        times = []
        for _ in range(reps):
          t0 = time.perf_counter()
          jax.block_until_ready(f(*args))
          times.append((time.perf_counter() - t0) / n)
        after = ws.handler_calls()[rank0]
        rows.append(dict(method=name, tokens=tokens, us=statistics.median(times) * 1e6,
                         us_min=min(times) * 1e6, calls=n, reps=reps,
                         command_buffer=replayed(before, after, n * reps)))
        timed.append((len(rows) - 1, f, args))
      except Exception as e:  # report, keep going
        if (timeout := ws.timeout_error()) is not None:  # names the rank and barrier
          e = timeout
        rows.append(dict(method=name, tokens=tokens, error=f"{type(e).__name__}: {e}"[:300]))
      print(rows[-1], flush=True)
      algo = stamp_algorithm(name, tokens, hidden, ws)
      if stamp_phases and algo is not None and "us" in rows[-1]:
        try:  # the chain's last call: launch skew between the devices is absorbed by then
          rows[-1]["phases_us"] = phase_times(ws, f, args, algo)
          print(f"  phases {name} {tokens} tok ({algo}): {rows[-1]['phases_us']}", flush=True)
        except Exception as e:
          print(f"  phases {name} {tokens} tok: {type(e).__name__}: {e}"[:300], flush=True)
    if device_time and timed:
      import tempfile
      with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
          for step, (_, f, args) in enumerate(timed):
            with jax.profiler.StepTraceAnnotation("step", step_num=step):
              jax.block_until_ready(f(*args))
        busy = device_busy_us(logdir, {s: n for s in range(len(timed))})
      for step, (i, _, _) in enumerate(timed):
        if step in busy:
          rows[i]["dev_us"] = busy[step]
      print({rows[i]["method"]: round(rows[i].get("dev_us", -1), 1) for i, _, _ in timed},
            flush=True)
  ws.close()
  return rows


def _torch_worker(rank, world, hidden, sizes, reps, port, out_path):
  import torch
  import torch.distributed as dist
  import torch.distributed._symmetric_memory as symm_mem

  torch.cuda.set_device(rank)
  dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                          world_size=world)
  group = dist.group.WORLD
  if hasattr(symm_mem, "enable_symm_mem_for_group"):
    symm_mem.enable_symm_mem_for_group(group.group_name)
  rows = []
  for tokens in sizes:
    numel = tokens * hidden
    buf = symm_mem.empty(numel, dtype=torch.bfloat16, device=f"cuda:{rank}")
    hdl = symm_mem.rendezvous(buf, group.group_name)
    torch.manual_seed(tokens + rank)
    buf.copy_(torch.randn(numel, device=buf.device).to(torch.bfloat16))
    residual = torch.randn(tokens, hidden, device=buf.device).to(torch.bfloat16)
    weight = torch.ones(hidden, device=buf.device, dtype=torch.bfloat16)
    n = n_calls(tokens)

    def one_shot():
      out = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group.group_name)
      x = out.view(tokens, hidden) + residual
      return torch.nn.functional.rms_norm(x.float(), (hidden,), weight.float(), EPS).to(torch.bfloat16), x

    def two_shot():
      torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group.group_name)
      x = buf.view(tokens, hidden) + residual
      return torch.nn.functional.rms_norm(x.float(), (hidden,), weight.float(), EPS).to(torch.bfloat16), x

    for name, fn in (("torch_1shot_norm", one_shot), ("torch_2shot_norm", two_shot)):
      try:
        for _ in range(3):
          fn()
        torch.cuda.synchronize()
        dist.barrier()
        times = []
        for _ in range(reps):
          start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
          start.record()
          for _ in range(n):
            fn()
          end.record()
          end.synchronize()
          times.append(start.elapsed_time(end) / n * 1e-3)
        rows.append(dict(method=name, tokens=tokens, us=statistics.median(times) * 1e6,
                         us_min=min(times) * 1e6, calls=n, reps=reps, note="eager, no copy-in"))
      except Exception as e:
        rows.append(dict(method=name, tokens=tokens, error=f"{type(e).__name__}: {e}"[:300]))
    del hdl, buf
    torch.cuda.synchronize()
    dist.barrier()
  if rank == 0:
    pathlib.Path(out_path).write_text(json.dumps(rows))
  dist.destroy_process_group()


def torch_methods(hidden, sizes, reps, world=2):
  import tempfile

  import torch.multiprocessing as mp

  os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"  # multicast stays off
  os.environ["NCCL_NVLS_ENABLE"] = "0"
  os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
  out = tempfile.mktemp(suffix=".json")
  mp.start_processes(_torch_worker, args=(world, hidden, sizes, reps, 29517, out), nprocs=world,
                     start_method="spawn", join=True)
  return json.loads(pathlib.Path(out).read_text())


def table(rows, sizes, hidden, world=2):
  methods = list(dict.fromkeys(r["method"] for r in rows))
  by = {(r["method"], r["tokens"]): r for r in rows}
  head = "| method | " + " | ".join(f"{t} tok ({t * hidden * 2 / 2**20:g} MiB)" for t in sizes) + " |"
  lines = [head, "|" + "---|" * (len(sizes) + 1)]
  for m in methods:
    cells = []
    for t in sizes:
      r = by.get((m, t))
      if r is None or "us" not in r:
        cells.append("err" if r else "-")
        continue
      busbw = 2 * (world - 1) / world * t * hidden * 2 / (r["us"] * 1e-6) / 1e9
      dev = f" (dev {r['dev_us']:.1f})" if "dev_us" in r else ""
      cells.append(f"{r['us']:.1f}{dev} µs / {busbw:.0f} GB/s")
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def parse_args(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--tp", type=int, default=2, help="GPUs in the group (the first --tp)")
  ap.add_argument("--hidden", type=int, default=8192)
  ap.add_argument("--min-tokens", type=int, default=8)
  ap.add_argument("--max-tokens", type=int, default=32768)
  ap.add_argument("--ctas", default="2,4,8,16,32", help="two-shot kernel CTA counts")
  ap.add_argument("--plain-ctas", default="", help="CTA counts (or 'auto': the default "
                  "kernel choice) also timed through the plain target, outside CUDA graphs "
                  "('' for none)")
  ap.add_argument("--ce-grids", default="", help="copy-engine algorithm: grids of its local "
                  "reduce kernel, e.g. 64,132")
  ap.add_argument("--ce-chunks", default="", help="copy-engine algorithm: pipeline chunk "
                  "counts to time for each --ce-grids grid, e.g. auto,1,4,16 (default: auto)")
  ap.add_argument("--oneshot-ctas", default="8,16,32", help="one-shot kernel CTA counts")
  ap.add_argument("--device-time", action="store_true",
                  help="also profile each method once per size and report GPU busy time per call")
  ap.add_argument("--phases", action="store_true",
                  help="also report each fused kernel's per-phase µs from its phase stamps")
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--skip-torch", action="store_true")
  ap.add_argument("--json", help="also write the results JSON here")
  return ap.parse_args(argv)


def main():
  args = parse_args()
  sizes, t = [], args.min_tokens
  while t <= args.max_tokens:
    sizes.append(t)
    t *= 2
  rows = []
  if not args.skip_torch:  # before JAX touches the GPUs
    try:
      rows += torch_methods(args.hidden, sizes, args.reps, args.tp)
    except Exception:
      print("torch symmetric-memory baseline failed:\n" + traceback.format_exc(), flush=True)
  ints = lambda text: [int(c) for c in text.split(",") if c]
  rows += jax_methods(args.hidden, sizes, ints(args.ctas), ints_or_auto(args.plain_ctas),
                      args.reps,
                      ints(args.ce_grids), ints(args.oneshot_ctas), args.device_time,
                      args.phases, args.tp, ints_or_auto(args.ce_chunks))
  import jax
  device = jax.devices("gpu")[0].device_kind.replace(" ", "_")
  name = f"allreduce_norm_{device}" + (f"_tp{args.tp}" if args.tp != 2 else "") + ".json"
  meta = dict(hidden=args.hidden, dtype="bf16", world=args.tp, jax=jax.__version__,
              date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device=device,
              command="python " + " ".join(sys.argv))
  outdir = ROOT / "benchmarks" / "results"
  outdir.mkdir(parents=True, exist_ok=True)
  paths = [outdir / name]
  if args.json:
    paths.append(pathlib.Path(args.json))
  if os.environ.get("OUT"):
    paths.append(pathlib.Path(os.environ["OUT"], name))
  text = json.dumps(dict(meta=meta, rows=rows), indent=1)
  for path in paths:
    path.write_text(text)
  print(json.dumps(meta))
  print(table(rows, sizes, args.hidden, args.tp))


if __name__ == "__main__":
  main()

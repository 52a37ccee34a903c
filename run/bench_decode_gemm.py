#!/usr/bin/env python3
"""Decode GEMMs of Llama-3.1-8B (TP = 1, bf16) on one GPU: XLA's GEMMs under several XLA flag
settings against the Triton kernel of ``experimental/skinny_gemm.py``, as GB/s and as a
fraction of the device's copy bandwidth.

    python run/bench_decode_gemm.py                  # M 1/16/64/256, 5 GEMMs: < 150 s on one H100
    python run/bench_decode_gemm.py --quick          # M 1/16/64, the 4 layer GEMMs: < 90 s
    python run/bench_decode_gemm.py --variants xla_exhaustive --budget 500   # one slow variant
    python run/bench_decode_gemm.py --variant-flags big_tiles="--xla_gpu_..."  # any flag set
    python run/bench_decode_gemm.py --dry-run        # CPU: tiny shapes, Triton's interpreter

GEMMs (x (M, K) @ w, w as the model stores it, ``weave_jax/model.py``): qkv 4096 -> 6144
(einsum th,hkgd->tkgd), o 4096 -> 4096 (tkgd,kgdh->th), gate_up 4096 -> 2 x 14336 fused
(th,hcf->tcf), down 14336 -> 4096, lm_head 4096 -> 128256 (th,vh->tv: the (vocab, hidden)
table, float32 logits).

Variants, each in its own process (XLA_FLAGS are process-wide, and XLA's in-process autotuning
cache would hand one setting's choice to the next); a process that dies (an unknown flag
aborts XLA) is reported and the run goes on:
  xla              the model's einsum, default flags
  triton           ``skinny_gemm`` at every config of ``configs_for`` (best one reported; its
                   output is checked against float32 before it is timed)
  xla_cublas       --xla_gpu_enable_triton_gemm=false (cuBLAS)
  xla_cublaslt     the same + --xla_gpu_enable_cublaslt=true
  xla_no_autotune  --xla_gpu_autotune_level=0 (XLA's heuristic tiles)
  xla_triton_only  --xla_gpu_cublas_fallback=false (the autotuner may not pick cuBLAS)
  xla_exhaustive   --xla_gpu_exhaustive_tiling_search=true (slow compiles: budget-bound)
  xla_cublas_opt   (only when named) xla_cublas's flag as a per-compile option, the route
                   ``weave_jax/xla_options.py`` takes, to check it gives the same kernels
(flag names checked in jaxlib 0.12.1 and in XLA's debug_options_flags.cc of older releases.)

Timing: R copies of each weight (R * size >= 256 MiB, so L2 never holds the next one, as in a
decode step where every layer's weights differ), R GEMMs per jitted call with distinct x (no
dot merging), calls issued back to back (>= 1 ms per sample, launch costs overlapped), median
of ``--samples`` samples after warm-up.  GB/s = (weight + x + y bytes) / time; "% copy" divides
by the copy bandwidth (the faster of a 4 GiB copy and negation, read + write counted) measured
in the same run.  The run is bound by ``--budget`` seconds: each process gets a share of what
is left and marks what it could not reach "skipped (budget)"; rerun those rows with
``--variants``, ``--ms`` and a larger ``--budget``.

Output: one table, the winner per GEMM and M, and per M the GEMM time of one decode step
(32 layers x (qkv + o + gate_up + down) + lm_head) per variant.  ``--json PATH`` writes it all.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

XLA_VARIANTS = {
    "xla": "",
    "xla_cublas": "--xla_gpu_enable_triton_gemm=false",
    "xla_cublaslt": "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cublaslt=true",
    "xla_no_autotune": "--xla_gpu_autotune_level=0",
    "xla_triton_only": "--xla_gpu_cublas_fallback=false",
    "xla_exhaustive": "--xla_gpu_exhaustive_tiling_search=true",
}
# the same options per compile (``weave_jax/xla_options.py``'s route; not run by default)
OPTION_VARIANTS = {"xla_cublas_opt": {"xla_gpu_enable_triton_gemm": False}}
# run order and weight in the split of the remaining budget (the baseline and the kernel get
# the most; the exhaustive search runs last and takes what the others left)
ORDER = ("xla", "triton", "xla_cublas", "xla_cublaslt", "xla_no_autotune", "xla_triton_only",
         "xla_exhaustive")
QUICK_ORDER = ("xla", "triton", "xla_cublas", "xla_cublaslt", "xla_exhaustive")
WEIGHT = {"xla": 3.0, "triton": 3.0, "xla_exhaustive": 1.5}
MIN_COPIES_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class Gemm:
  """One decode GEMM in the model's layout: y = einsum(spec, x, w), x (M, *x_dims)."""
  name: str
  spec: str
  x_dims: tuple
  w_dims: tuple
  transpose_w: bool = False      # w is (N, K) in memory
  f32_out: bool = False
  per_layer: bool = True

  @property
  def k(self) -> int:
    return math.prod(self.x_dims)

  @property
  def n(self) -> int:
    return math.prod(self.w_dims) // self.k


def llama_gemms(h, f, kv_heads, q_per_kv, head_dim, vocab) -> list[Gemm]:
  return [
      Gemm("qkv", "th,hkgd->tkgd", (h,), (h, kv_heads, q_per_kv + 2, head_dim)),
      Gemm("o", "tkgd,kgdh->th", (kv_heads, q_per_kv, head_dim), (kv_heads, q_per_kv, head_dim, h)),
      Gemm("gate_up", "th,hcf->tcf", (h,), (h, 2, f)),
      Gemm("down", "tf,fh->th", (f,), (f, h)),
      Gemm("lm_head", "th,vh->tv", (h,), (vocab, h), transpose_w=True, f32_out=True,
           per_layer=False),
  ]


def plan_gemms(args) -> tuple[list[Gemm], int]:
  """(GEMMs, decoder layers) of Llama-3.1-8B, or of a tiny model for --dry-run."""
  if args.dry_run:
    return llama_gemms(64, 96, 2, 2, 16, 256), 2
  from weave_jax.config import preset
  from weave_jax.model import padded_vocab
  cfg = preset("llama-3.1-8b")
  gemms = llama_gemms(cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads, cfg.q_per_kv,
                      cfg.head_dim, padded_vocab(cfg))
  return (gemms[:4] if args.quick else gemms), cfg.num_layers


# --------------------------------------------------------------------------------------------
# Child: one variant, every (GEMM, M) it reaches; prints "ROW {json}" / "INFO {json}" lines
# --------------------------------------------------------------------------------------------

def emit(kind: str, obj: dict) -> None:
  print(kind, json.dumps(obj), flush=True)


def normal(shape, dtype, seed: int, *, host: bool, scale: float = 1.0):
  """Random normal array (host: numpy-made, no per-shape compile: the CPU dry run)."""
  import jax
  import numpy as np
  if host:
    return jax.numpy.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, dtype)
  return (jax.random.normal(jax.random.key(seed), shape, dtype) * scale).astype(dtype)


def make_weights(g: Gemm, plan: dict, dtype, seed: int) -> list:
  """Copies of w (the model's layout), enough that together they overflow L2 (2 when dry)."""
  w_bytes = math.prod(g.w_dims) * dtype.itemsize
  copies = 2 if plan["dry_run"] else min(16, max(2, math.ceil(MIN_COPIES_BYTES / w_bytes)))
  return [normal(g.w_dims, dtype, 100 * seed + i, host=plan["dry_run"], scale=g.k ** -0.5)
          for i in range(copies)]


def xla_fn(g: Gemm):
  import jax.numpy as jnp
  pet = jnp.float32 if g.f32_out else None
  return lambda x, w: jnp.einsum(g.spec, x, w, preferred_element_type=pet)


def triton_fn(g: Gemm, cfg, launch):
  import jax.numpy as jnp
  from experimental.skinny_gemm import skinny_gemm
  out = jnp.float32 if g.f32_out else None

  def f(x, w):
    w2 = w.reshape(g.n, g.k) if g.transpose_w else w.reshape(g.k, g.n)
    return skinny_gemm(x.reshape(x.shape[0], g.k), w2, config=cfg, transpose_w=g.transpose_w,
                       out_dtype=out, launch=launch)
  return f


def build(fn, xs, ws, *, jit: bool, options: dict | None = None):
  """(call, compiled HLO text): ``call(xs, ws)`` runs ``fn`` on every copy in one program
  compiled with ``options`` (or eagerly, for the interpreter, with no HLO)."""
  import jax
  many = lambda xs, ws: [fn(x, w) for x, w in zip(xs, ws)]
  if not jit:
    return many, ""
  compiled = jax.jit(many).lower(xs, ws).compile(options or None)
  return compiled, compiled.as_text()


def xla_kernels(hlo: str) -> str:
  """What a compiled module runs for its GEMMs: cuBLAS calls and the tiles of XLA's Triton
  GEMM fusions (from their backend configs, named like the kernel's configs: m16n64k256s4w4p4
  is block_m 16, block_n 64, block_k 256, split_k 4, 4 warps, 4 stages)."""
  found = []
  for target in re.findall(r'custom_call_target="(__cublas[^"]*)"', hlo):
    found.append(target.strip("_"))
  for cfg in re.findall(r'"triton_gemm_config":(\{[^}]*\})', hlo):
    found.append("triton m{block_m}n{block_n}k{block_k}s{split_k}w{num_warps}p{num_stages}"
                 .format_map(collections.defaultdict(str, json.loads(cfg))))
  for part in hlo.split('"block_level_fusion_config":')[1:]:
    sizes = re.search(r'"sizes":\[([^\]]*)\]', part[:400])
    warps = re.search(r'"num_warps":"?(\d+)', part[:400])
    found.append("triton tile " + (sizes.group(1).replace('"', "") if sizes else "?")
                 + (f" warps{warps.group(1)}" if warps else ""))
  return ", ".join(dict.fromkeys(found)) or ("dot" if " dot(" in hlo else "?")


def seconds_per_gemm(call, xs, ws, *, samples: int, warmup: int) -> float:
  """Median seconds of one GEMM: each sample issues calls of ``len(xs)`` GEMMs back to back
  (>= 1 ms in all) and waits once."""
  from weave_jax.bench import time_fn
  once = time_fn(lambda: call(xs, ws), warmup=warmup, iters=warmup).median_ms
  reps = max(1, math.ceil(1.0 / once))
  t = time_fn(lambda: [call(xs, ws) for _ in range(reps)], warmup=1, iters=samples)
  return t.median_ms * 1e-3 / (reps * len(xs))


def rel_err(y, ref) -> float:
  import numpy as np
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def timed_row(row: dict, call, xs, ws, moved: int, plan: dict) -> dict:
  t = seconds_per_gemm(call, xs, ws, samples=plan["samples"], warmup=plan["warmup"])
  return {**row, "us": t * 1e6, "GBps": moved / t / 1e9, "copies": len(ws)}


def xla_row(row: dict, g: Gemm, xs, ws, moved: int, plan: dict) -> dict:
  call, hlo = build(xla_fn(g), xs, ws, jit=True, options=OPTION_VARIANTS.get(row["variant"]))
  return {**timed_row(row, call, xs, ws, moved, plan), "kernels": xla_kernels(hlo)}


def triton_row(row: dict, g: Gemm, cfg, xs, ws, ref, moved: int, plan: dict, launch) -> dict:
  """The kernel at ``cfg``, timed only if its first product matches float32 (rel err < 1e-2)."""
  call, _ = build(triton_fn(g, cfg, launch), xs, ws, jit=launch is None)
  err = rel_err(call(xs, ws)[0], ref)
  if not err < 1e-2:
    return {**row, "status": f"WRONG (rel err {err:.2e})"}
  return {**timed_row(row, call, xs, ws, moved, plan), "rel_err": err}


def attempt(row: dict, plan: dict, make) -> None:
  """Emit ``make()``'s row, or the row marked skipped past the deadline or FAILED with the
  error (a config that does not compile must not end the others' measurement)."""
  if time.time() > plan["deadline"]:
    emit("ROW", {**row, "status": "skipped (budget)"})
    return
  try:
    emit("ROW", make())
  except Exception as e:  # noqa: BLE001 -- reported in the table, the run goes on
    emit("ROW", {**row, "status": f"FAILED: {type(e).__name__}: {str(e)[:300]}"})


def run_child(variant: str, plan: dict) -> None:
  import jax
  import jax.numpy as jnp
  dtype = jnp.dtype(plan["dtype"])
  dev = jax.devices()[0]
  info = {"variant": variant, "device": dev.device_kind, "platform": dev.platform,
          "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}
  if plan["measure_copy"]:
    from weave_jax.bench import stream_gbps
    info["copy_GBps"] = max(stream_gbps(1 << 21 if plan["dry_run"] else 4 << 30).values())
  emit("INFO", info)
  launch = None
  if variant == "triton":
    from experimental.skinny_gemm import configs_for, reference
    if plan["dry_run"]:
      from experimental.skinny_gemm import interpreter_launch as launch
  gemms = [Gemm(**{**gd, "x_dims": tuple(gd["x_dims"]), "w_dims": tuple(gd["w_dims"])})
           for gd in plan["gemms"]]
  weights = {}                                   # gemm name -> its copies, made when first used
  for m in plan["ms"]:                           # M outer: a cut run leaves whole decode steps
    for gi, g in enumerate(gemms):
      row = {"gemm": g.name, "m": m, "k": g.k, "n": g.n, "variant": variant}
      if time.time() > plan["deadline"]:
        emit("ROW", {**row, "status": "skipped (budget)"})
        continue
      if g.name not in weights:
        weights[g.name] = make_weights(g, plan, dtype, seed=gi)
      ws = weights[g.name]
      xs = [normal((m, *g.x_dims), dtype, 10000 + 100 * gi + i, host=plan["dry_run"])
            for i in range(len(ws))]
      moved = (math.prod(g.w_dims) * dtype.itemsize + m * g.k * dtype.itemsize
               + m * g.n * (4 if g.f32_out else dtype.itemsize))
      if variant != "triton":
        attempt(row, plan, lambda: xla_row(row, g, xs, ws, moved, plan))
        continue
      ref = reference(xs[0].reshape(m, g.k),
                      ws[0].reshape((g.n, g.k) if g.transpose_w else (g.k, g.n)),
                      transpose_w=g.transpose_w, out_dtype=jnp.float32)
      for cfg in configs_for(m, g.k, g.n)[:plan["max_configs"]]:
        cfg_row = {**row, "config": cfg.name}
        attempt(cfg_row, plan,
                lambda: triton_row(cfg_row, g, cfg, xs, ws, ref, moved, plan, launch))


# --------------------------------------------------------------------------------------------
# Parent: runs the variants, prints the tables
# --------------------------------------------------------------------------------------------

def child_env(variant: str, flags: str, dry_run: bool) -> dict:
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), flags]))
  if dry_run:
    env["JAX_PLATFORMS"] = "cpu"
    if variant == "triton":
      env["TRITON_INTERPRET"] = "1"
  return env


def run_variant(variant: str, flags: str, plan: dict, kill_at: float) -> tuple[list, dict, str]:
  """(rows, info, failure or "") of one variant's process."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--plan", json.dumps(plan)]
  proc = subprocess.Popen(cmd, env=child_env(variant, flags, plan["dry_run"]), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    out, err = proc.communicate(timeout=max(5.0, kill_at - time.time()))
    failure = ""
    if proc.returncode:
      why = ("unknown XLA flag" if "Unknown flag in XLA_FLAGS" in err
             else f"exit {proc.returncode}")
      last = [line for line in err.strip().splitlines() if line.strip()][-1:] or [""]
      failure = f"{why}: {last[0][-300:]}"
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    failure = "killed at its time share (a compile ran past it)"
  rows, info = [], {}
  for line in out.splitlines():
    kind, _, payload = line.partition(" ")
    if kind == "ROW":
      rows.append(json.loads(payload))
    elif kind == "INFO":
      info = json.loads(payload)
  return rows, info, failure


def best_rows(rows: list[dict]) -> list[dict]:
  """One row per (gemm, m, variant): the fastest timed one (the best Triton config), else the
  first status row."""
  best: dict = {}
  for r in rows:
    key = (r["gemm"], r["m"], r["variant"])
    old = best.get(key)
    if old is None or ("us" in r and ("us" not in old or r["us"] < old["us"])):
      best[key] = r
  return list(best.values())


def step_summary(table: list[dict], gemms: list[Gemm], layers: int, ms: list[int],
                 variants: list[str], copy_gbps: float | None) -> dict:
  """Per M and variant: ms of one decode step's GEMMs (layers x layer GEMMs + lm_head), None
  if a GEMM is missing; "best" takes the fastest variant of each GEMM, "copy_bw" is the time
  of the same bytes at the copy bandwidth."""
  us = {(r["gemm"], r["m"], r["variant"]): r["us"] for r in table if "us" in r}
  if copy_gbps:                 # the GEMM's bytes at the copy bandwidth
    for r in table:
      if "us" in r:
        us[(r["gemm"], r["m"], "copy_bw")] = r["GBps"] * r["us"] / copy_gbps
  out = {}
  for m in ms:
    per = {}
    for v in [*variants, "best", "copy_bw"]:
      total = 0.0
      for g in gemms:
        t = (min((t for (n, mm, u), t in us.items() if n == g.name and mm == m
                  and u != "copy_bw"), default=None)
             if v == "best" else us.get((g.name, m, v)))
        if t is None:
          total = None
          break
        total += t * (layers if g.per_layer else 1)
      per[v] = None if total is None else total * 1e-3
    out[str(m)] = per
  return out


def print_table(table: list[dict]) -> None:
  print(f"\n{'gemm':8} {'M':>4} {'variant':16} {'us':>9} {'GB/s':>8} {'% copy':>7}  note")
  for r in table:
    head = f"{r['gemm']:8} {r['m']:4d} {r['variant']:16}"
    if "us" not in r:
      print(f"{head} {'-':>9} {'-':>8} {'-':>7}  {r.get('status', '')}")
      continue
    pct = f"{r['pct_copy']:6.1f}%" if "pct_copy" in r else "      -"
    note = r.get("config", r.get("kernels", ""))
    print(f"{head} {r['us']:9.2f} {r['GBps']:8.1f} {pct}  {note}")


def print_configs(rows: list[dict], gemms: list[Gemm], ms: list[int]) -> None:
  configs = [r for r in rows if r["variant"] == "triton" and "config" in r]
  if configs:
    print("\nTriton configs (us; rows not timed are counted as such):")
  for g in gemms:
    for m in ms:
      mine = [r for r in configs if r["gemm"] == g.name and r["m"] == m]
      timed = sorted((r for r in mine if "us" in r), key=lambda r: r["us"])
      cells = [f"{r['config']} {r['us']:.1f}" for r in timed]
      if len(timed) < len(mine):
        cells.append(f"({len(mine) - len(timed)} not timed: skipped, WRONG or FAILED)")
      if mine:
        print(f"  {g.name:8} M={m:<4d} " + "  ".join(cells))


def print_winners(table: list[dict], gemms: list[Gemm], ms: list[int]) -> list[dict]:
  print("\nWinners:")
  winners = []
  for g in gemms:
    for m in ms:
      timed = [r for r in table if r["gemm"] == g.name and r["m"] == m and "us" in r]
      if not timed:
        continue
      win = min(timed, key=lambda r: r["us"])
      xla = next((r["us"] for r in timed if r["variant"] == "xla"), None)
      gain = f", {xla / win['us']:.2f}x xla default" if xla and win["variant"] != "xla" else ""
      pct = f", {win['pct_copy']:.0f}% copy" if "pct_copy" in win else ""
      others = ", ".join(f"{r['variant']} {r['us']:.1f}" for r in timed if r is not win)
      print(f"  {g.name:8} M={m:<4d} {win['variant']} {win['us']:.1f} us "
            f"({win['GBps']:.0f} GB/s{pct}{gain}) | {others}")
      winners.append({"gemm": g.name, "m": m, "variant": win["variant"],
                      "config": win.get("config"), "us": win["us"]})
  return winners


def print_steps(steps: dict, gemms: list[Gemm], layers: int) -> None:
  layer_names = "+".join(g.name for g in gemms if g.per_layer)
  tail = "".join(f" + {g.name}" for g in gemms if not g.per_layer)
  print(f"\nDecode-step GEMM time, ms ({layers} layers x ({layer_names}){tail}):")
  names = next(iter(steps.values()), {})
  print(f"  {'M':>4}  " + "  ".join(f"{v:>15}" for v in names))
  for m, per in steps.items():
    print(f"  {m:>4}  " + "  ".join("{:>15}".format("-" if t is None else f"{t:.3f}")
                                    for t in per.values()))
  print("  the same as % of the copy-bandwidth time (the HBM roofline of these GEMMs):")
  for m, per in steps.items():
    bound = per["copy_bw"]
    print(f"  {m:>4}  " + "  ".join(
        "{:>15}".format("-" if t is None or not bound else f"{100 * bound / t:.0f}%")
        for t in per.values()))


def report(rows: list[dict], gemms: list[Gemm], layers: int, ms: list[int], variants: list[str],
           copy_gbps: float | None, failures: dict) -> dict:
  """Print the table, the Triton configs, the winners and the decode-step sums; return them."""
  order = {g.name: i for i, g in enumerate(gemms)}
  table = sorted(best_rows(rows), key=lambda r: (order[r["gemm"]], r["m"], r.get("us", math.inf)))
  for r in table:
    if "us" in r and copy_gbps:
      r["pct_copy"] = 100 * r["GBps"] / copy_gbps
  print_table(table)
  print_configs(rows, gemms, ms)
  winners = print_winners(table, gemms, ms)
  steps = step_summary(table, gemms, layers, ms, variants, copy_gbps)
  print_steps(steps, gemms, layers)
  for v, why in failures.items():
    print(f"variant {v} FAILED: {why}")
  return {"rows": rows, "table": table, "winners": winners, "step_ms": steps}


def run_variants(variants: list[str], extra: dict, plan: dict, budget: float):
  """(rows, infos, failures) of every variant's process, run one after another, each with a
  share of the budget left (by WEIGHT): a variant that ends early leaves its time to the rest."""
  start = time.time()
  rows, infos, failures = [], {}, {}
  for i, v in enumerate(variants):
    left = budget - (time.time() - start)
    share = left * WEIGHT.get(v, 1.0) / sum(WEIGHT.get(u, 1.0) for u in variants[i:])
    now = time.time()
    # the child starts no row in the last quarter of its share (10 s at most): a row's compile
    # may take that long; the process is killed 5 s after its share
    child_plan = {**plan, "deadline": now + share - min(10.0, share / 4),
                  "measure_copy": v == "xla"}
    print(f"[{time.strftime('%H:%M:%S')}] {v}: {share:.0f} s", file=sys.stderr, flush=True)
    got, info, failure = run_variant(v, extra.get(v, XLA_VARIANTS.get(v, "")), child_plan,
                                     kill_at=now + share + 5)
    rows += got
    infos[v] = info
    if failure:
      failures[v] = failure
      print(f"[{time.strftime('%H:%M:%S')}] {v} FAILED: {failure}", file=sys.stderr, flush=True)
  return rows, infos, failures


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="M 1/16/64, the 4 layer GEMMs")
  ap.add_argument("--dry-run", action="store_true",
                  help="CPU: tiny shapes, float16, Triton's interpreter")
  ap.add_argument("--variants", default=None,
                  help=f"comma-separated, from {', '.join(ORDER + tuple(OPTION_VARIANTS))} "
                       f"(default: {', '.join(ORDER)}; --quick: {', '.join(QUICK_ORDER)})")
  ap.add_argument("--variant-flags", action="append", default=[], metavar="NAME=FLAGS",
                  help="an extra XLA variant: its name and its XLA_FLAGS (repeatable)")
  ap.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], default=None,
                  help="token counts M (default 1,16,64,256; --quick 1,16,64; --dry-run 1,5,16)")
  ap.add_argument("--budget", type=float, default=None,
                  help="seconds for the variants' processes (default 135; --quick 75; "
                       "--dry-run 60); one that overruns its share is killed 5 s after it")
  ap.add_argument("--samples", type=int, default=20, help="timed samples per row (>= 20)")
  ap.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--plan", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if any("=" not in item for item in args.variant_flags):
    ap.error(f"--variant-flags takes NAME=FLAGS, got {args.variant_flags}")
  args.extra = dict(item.split("=", 1) for item in args.variant_flags)
  chosen = args.variants.split(",") if args.variants else QUICK_ORDER if args.quick else ORDER
  args.variant_list = [v for v in chosen if v] + list(args.extra)
  unknown = [v for v in args.variant_list if v not in (*ORDER, *OPTION_VARIANTS, *args.extra)]
  if unknown:
    names = ", ".join(ORDER + tuple(OPTION_VARIANTS))
    ap.error(f"unknown variant(s) {unknown}: choose from {names} or --variant-flags")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.child:
    run_child(args.child, json.loads(args.plan))
    return 0
  extra, variants = args.extra, args.variant_list
  if "xla" not in variants:
    variants.insert(0, "xla")                    # the baseline; it also measures copy bandwidth
  start = time.time()
  budget = args.budget or (60 if args.dry_run else 75 if args.quick else 135)
  ms = args.ms or ([1, 5, 16] if args.dry_run else [1, 16, 64] if args.quick else
                   [1, 16, 64, 256])
  gemms, layers = plan_gemms(args)
  plan = {"gemms": [dataclasses.asdict(g) for g in gemms], "ms": ms,
          "dtype": "float16" if args.dry_run else "bfloat16", "dry_run": args.dry_run,
          "samples": 2 if args.dry_run else max(20, args.samples),
          "warmup": 1 if args.dry_run else 3, "max_configs": 2 if args.dry_run else 16}
  rows, infos, failures = run_variants(variants, extra, plan, budget)
  copy_gbps = infos.get("xla", {}).get("copy_GBps")
  device = next((i["device"] for i in infos.values() if i), "?")
  print(f"\ndevice {device}, copy bandwidth "
        + (f"{copy_gbps:.0f} GB/s (read + write)" if copy_gbps else "not measured")
        + f", {plan['dtype']}, {time.time() - start:.0f} s")
  res = report(rows, gemms, layers, ms, variants, copy_gbps, failures)
  res.update(device=device, copy_GBps=copy_gbps, infos=infos, failures=failures,
             args=vars(args), variants=variants, layers=layers,
             date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             flags={v: extra.get(v, XLA_VARIANTS.get(v, OPTION_VARIANTS.get(v, "")))
                    for v in variants if v != "triton"})
  if args.json:
    from weave_jax.bench import write_json
    write_json(res, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())

#!/usr/bin/env python3
"""Prefill benchmark (the TokenWeave paper's Figure 11): ms per forward for each variant.

Where JAX runs on GPUs: a preset model (default Llama-3.3-70B shapes, 4 layers, random weights)
with TP over all local GPUs, batch 1, prompts of 1K..16K tokens.  Without a GPU: the ``tiny``
preset on 8 virtual CPU devices (timings then only show that the harness works).  On a machine
with an NVIDIA driver where JAX has no GPU (CPU-only jax installed), it refuses to start and
says what to install, unless --allow-cpu.

    python run/bench_prefill.py                          # embedded default
    python run/bench_prefill.py --preset qwen2.5-72b --layers 4 --tokens 1024 4096 16384
    python run/bench_prefill.py --variants baseline nocomm --json out.json --png out.png
    python run/bench_prefill.py --profile traces/        # + trace summary of exposed comm
    python run/bench_prefill.py --shard-of 2 --layers 16 --variants nocomm nocomm+weave  # one GPU

Variants: baseline (psum, unsplit) | psum+weave | rs_ag | rs_ag+weave | fused | fused+weave |
fused+tuned (the library default: woven or unsplit per token bucket from the tuning table) |
nocomm (no communication: the upper bound) | nocomm+weave (the split without communication: what
weaving costs in compute).  A fused variant may name its kernel's grid and options:
fused+weave@8, fused+weave:weave_algorithm=two_shot.

Per prompt length, every variant is compiled and warmed up, then the variants' calls are timed
interleaved (round-robin, --iters rounds), so that drift during the run (GPU clocks,
temperature) affects them alike and their ratios compare like with like.

The nocomm model's FLOP rate is given two ways, labelled: as a share of the card's datasheet
dense bf16 peak (H100 SXM and H200: 989.5 TFLOP/s), and as a share of the bf16 matmul rate
measured on the same device in the same run (an 8192^3 jnp.dot).  The second can exceed 100%
(the model's GEMMs may run faster than that one matmul); the first cannot, for real work.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

NVIDIA_DRIVER = shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0")
# 8 virtual CPU devices for the CPU path (the flag only shapes the host platform; GPUs unaffected)
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from weave_jax import Engine, RunConfig, init_random, make_mesh, preset  # noqa: E402
from weave_jax.bench import (layer_flops_per_rank, matmul_tflops, progress,  # noqa: E402
                             time_interleaved, write_json)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_common import VARIANT_HELP, engine_for, is_fused, variant_arg  # noqa: E402

HAS_GPU = jax.default_backend() == "gpu"

# Dense bf16 peak per device from NVIDIA's datasheets (TFLOP/s, without sparsity), by the
# device_kind JAX reports.  H100 SXM and H200 share the same SMs and clocks, hence one figure.
DATASHEET_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.5,   # H100 SXM
    "NVIDIA H100 SXM": 989.5,
    "NVIDIA H200": 989.5,
}

CPU_JAX_ON_GPU_HOST = (
    "this machine has an NVIDIA driver but JAX runs on {backend}: the GPU defaults "
    "(Llama-3.3-70B shapes, 1K-16K tokens) would run on the CPU for hours.  Install JAX's CUDA "
    "plugin: `bash run/bench.sh` does it, or pip install -e '.[bench,cuda12]' "
    "(cuda13 where the CUDA toolkit is 13).  --allow-cpu runs the CPU defaults (tiny preset) "
    "anyway.")


def datasheet_tflops(device_kind: str) -> float | None:
  """The datasheet dense bf16 peak of ``device_kind`` (TFLOP/s), or None if not in the table."""
  return DATASHEET_BF16_TFLOPS.get(device_kind)



def parse_args(argv=None):
  gpu = HAS_GPU
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="llama-3.3-70b" if gpu else "tiny")
  p.add_argument("--layers", type=int, default=None,
                 help="decoder layers to build (default: 4 on GPU for large presets, else all)")
  p.add_argument("--tokens", type=int, nargs="+",
                 default=[1024, 2048, 4096, 8192, 16384] if gpu else [128, 1024])
  p.add_argument("--variants", nargs="+", default=None, type=variant_arg, metavar="VARIANT",
                 help=VARIANT_HELP + ".  Default: baseline rs_ag rs_ag+weave nocomm (+ fused, "
                      "fused+weave on GPU when the FFI library is built)")
  p.add_argument("--tp", type=int, default=None, help="default: all local devices")
  p.add_argument("--shard-of", type=int, default=None, metavar="N",
                 help="build one TP=N rank's shapes (heads, KV heads and FFN divided by N, KV "
                      "heads replicated first where N exceeds them; dense presets) and run "
                      "them on one device: the compute of a TP=N rank on one GPU.  Only the "
                      "nocomm variants, which have no communication to leave out")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--iters", type=int, default=20 if gpu else 5)
  p.add_argument("--weave-min-tokens", type=int, default=None,
                 help="smallest woven batch for the +weave variants (default: 1, always weave)")
  p.add_argument("--ctas", type=int, default=None, help="CTAs of the fused kernel")
  p.add_argument("--json", default=None,
                 help="write results here (default: benchmarks/results/"
                      "prefill_PRESET_DEVICE_tpN_DATE.json)")
  p.add_argument("--png", default=None, help="write a bar chart here")
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="capture a trace per variant at --profile-tokens and print its summary")
  p.add_argument("--profile-tokens", type=int, default=None)
  p.add_argument("--no-matmul-peak", action="store_true",
                 help="skip measuring the device's bf16 matmul rate (the second utilization figure)")
  p.add_argument("--datasheet-tflops", type=float, default=None, metavar="TFLOPS",
                 help="the device's dense bf16 datasheet peak per device (default: from its name; "
                      "H100 SXM and H200: 989.5)")
  p.add_argument("--allow-cpu", action="store_true",
                 help="run on the CPU even where an NVIDIA driver is present but JAX has no GPU")
  args = p.parse_args(argv)
  if NVIDIA_DRIVER and not gpu and not args.allow_cpu:
    p.error(CPU_JAX_ON_GPU_HOST.format(backend=jax.default_backend()))
  if args.variants and len(set(args.variants)) != len(args.variants):
    p.error(f"--variants names a variant twice: {args.variants}")
  if args.shard_of is not None:
    if args.shard_of not in (2, 4, 8):
      p.error(f"--shard-of must be 2, 4 or 8, got {args.shard_of}")
    if not args.variants or set(args.variants) - {"nocomm", "nocomm+weave"}:
      p.error("--shard-of runs only the variants nocomm and nocomm+weave (name them with "
              "--variants): on one rank's shapes the others would time no communication")
    if args.tp not in (None, 1):
      p.error(f"--shard-of runs one rank's shapes on one device; --tp {args.tp} would shard "
              "them again")
    args.tp = 1
  elif (args.tp or jax.device_count()) == 1:
    p.error("TP=1: with one device there is no communication, so every variant would time the "
            "same program.  What one GPU can show: --shard-of 2 --layers 16 --variants nocomm "
            "nocomm+weave (one TP=2 rank's compute, unsplit and woven; bash run/bench.sh runs it "
            "on a one-GPU machine)")
  return args


def default_variants() -> list[str]:
  names = ["baseline", "rs_ag", "rs_ag+weave", "nocomm"]
  if HAS_GPU:
    from weave_jax.comm import fused_available
    ok, why = fused_available()
    if ok:
      names[3:3] = ["fused", "fused+weave", "fused+tuned"]
    else:
      progress(f"fused variants skipped: {why}")
  return names


def make_engine(model, mesh, variant: str, args) -> Engine:
  return engine_for(model, mesh, variant, ctas=args.ctas, weave_min_tokens=args.weave_min_tokens)


def rank_shapes(cfg, n: int):
  """The shapes one rank of TP=n holds (dense models): heads, KV heads and FFN divided by n.

  Where n exceeds the KV heads, they are first replicated as the TP=n model lays them out
  (``cfg.for_tp(n)``), so each rank holds one KV head; the rank's model is standalone
  (``kv_replicas=1``).
  """
  if cfg.is_moe:
    raise ValueError("--shard-of: MoE presets shard their experts, not one rank's shapes; "
                     "use a dense preset")
  laid_out = cfg.for_tp(n)
  return laid_out.replace(num_heads=laid_out.num_heads // n,
                          num_kv_heads=laid_out.num_kv_heads // n, kv_replicas=1,
                          intermediate_size=laid_out.intermediate_size // n)


def build(args):
  """(config, mesh, model) for the preset, with --layers (default: 4 on GPU for large presets)."""
  cfg0 = preset(args.preset)
  layers = args.layers
  if layers is None:
    layers = 4 if (HAS_GPU and cfg0.num_layers > 8) else cfg0.num_layers
  cfg = preset(args.preset, num_layers=layers)
  if args.shard_of:
    cfg = rank_shapes(cfg, args.shard_of)
  mesh = make_mesh(args.tp)
  return cfg, mesh, init_random(cfg, mesh)


def run(args, cfg, mesh, model) -> dict:
  variants = args.variants or default_variants()
  layers, cfg0 = cfg.num_layers, preset(args.preset)
  tp = mesh.devices.size
  dev = mesh.devices.flat[0]
  if not HAS_GPU:
    progress("no GPU: running on virtual CPU devices; these timings only show that the harness "
             "works (the 'devices' share the host's cores)")
  shapes = f", one TP={args.shard_of} rank's shapes" if args.shard_of else ""
  progress(f"{args.preset}: {layers} of {cfg0.num_layers} layers{shapes}, TP={tp} on "
           f"{getattr(dev, 'device_kind', dev.platform)}, variants {variants}")
  kind = getattr(dev, "device_kind", dev.platform)
  sheet = args.datasheet_tflops or datasheet_tflops(kind)
  if sheet:
    progress(f"datasheet dense bf16 peak: {sheet:.1f} TFLOP/s per device ({kind})")
  elif HAS_GPU:
    progress(f"no datasheet bf16 peak known for {kind!r}: pass --datasheet-tflops")
  measured = None
  if not args.no_matmul_peak:
    # on CPU a small matmul: the figure then only shows that the reporting works
    measured = matmul_tflops() if HAS_GPU else matmul_tflops(n=256, iters=5)
    progress(f"bf16 matmul rate measured in this run: {measured:.1f} TFLOP/s per device")
  rng = np.random.default_rng(0)
  batches = {n: rng.integers(0, cfg.vocab_size, n) for n in args.tokens}
  rows = {n: {"tokens": n} for n in args.tokens}
  # Fused variants are prepared last: a kernel failure (which can poison the CUDA context) then
  # costs only what comes after it.  Each failure is recorded, never timed as data.
  order = sorted(variants, key=is_fused)
  engines = {}
  for n in args.tokens:
    calls, splits = {}, {}
    for v in order:
      try:
        if v not in engines:
          engines[v] = make_engine(model, mesh, v, args)
        t0 = time.perf_counter()
        plan, exe, ex_args = engines[v].prepare(batches[n])
        progress(f"{n:6d} tokens  {v:12s} compiled in {time.perf_counter() - t0:5.1f}s "
                 f"(split={plan.split})")
        jax.block_until_ready(exe(*ex_args))  # a failing variant fails here, before timing
        calls[v], splits[v] = (lambda exe=exe, a=ex_args: exe(*a)), plan.split
      except Exception as e:  # noqa: BLE001 - reported, and the variant is left out of the table
        progress(f"{n:6d} tokens  {v:12s} FAILED: {type(e).__name__}: {str(e)[:300]}")
        rows[n][v] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    if not calls:
      continue
    progress(f"{n:6d} tokens  timing {len(calls)} variants interleaved, {args.iters} rounds")
    for v, t in time_interleaved(calls, warmup=args.warmup, iters=args.iters).items():
      rows[n][v] = {"ms": t.median_ms, "spread": t.spread, "split": splits[v]}
      progress(f"{n:6d} tokens  {v:12s} {t.median_ms:9.3f} ms  (spread {t.spread:.1%})")
  rows = [rows[n] for n in args.tokens]
  for row in rows:
    if "ms" in row.get("nocomm", {}):
      flops = layers * layer_flops_per_rank(cfg, row["tokens"], tp)
      row["nocomm_tflops"] = flops / (row["nocomm"]["ms"] * 1e-3) / 1e12
      if sheet:
        row["nocomm_of_datasheet"] = row["nocomm_tflops"] / sheet
      if measured:
        row["nocomm_of_matmul"] = row["nocomm_tflops"] / measured
  return {"preset": args.preset, "layers": layers, "tp": tp, "variants": variants,
          "shard_of": args.shard_of, "device": kind, "devices": mesh.devices.size,
          "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
          "datasheet_tflops": sheet, "matmul_measured_tflops": measured, "rows": rows,
          "command": "python " + " ".join(sys.argv)}


def utilization_columns(res: dict) -> list[tuple[str, str]]:
  """(header, row key) of the nocomm utilization columns this result has, each labelled with
  what it divides by."""
  cols = []
  if any("nocomm_tflops" in r for r in res["rows"]):
    cols.append(("nocomm TFLOP/s per device", "nocomm_tflops"))
  if res.get("datasheet_tflops"):
    cols.append((f"nocomm / datasheet peak ({res['datasheet_tflops']:.1f})", "nocomm_of_datasheet"))
  if res.get("matmul_measured_tflops"):
    cols.append((f"nocomm / matmul measured this run ({res['matmul_measured_tflops']:.1f})",
                 "nocomm_of_matmul"))
  return cols


def table(res: dict) -> str:
  vs = res["variants"]
  head = "| tokens | " + " | ".join(f"{v} ms/layer" for v in vs)
  ratios = []
  if "baseline" in vs and "nocomm" in vs:
    ratios.append("baseline/nocomm")
  for v in vs:
    if v not in ("baseline", "nocomm") and "baseline" in vs:
      ratios.append(f"speedup {v}")
    if v not in ("baseline", "nocomm") and "nocomm" in vs:
      ratios.append(f"{v}/nocomm")
  util = utilization_columns(res)
  head += "".join(f" | {r}" for r in ratios) + "".join(f" | {h}" for h, _ in util) + " |"
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  ms = lambda row, v: row.get(v, {}).get("ms")
  for row in res["rows"]:
    cells = [str(row["tokens"])] + [
        f"{ms(row, v) / res['layers']:.3f}" if ms(row, v) else "failed" for v in vs]
    for r in ratios:
      if r == "baseline/nocomm":
        a, b = ms(row, "baseline"), ms(row, "nocomm")
      elif r.startswith("speedup "):
        a, b = ms(row, "baseline"), ms(row, r[8:])
      else:
        a, b = ms(row, r.split("/")[0]), ms(row, "nocomm")
      cells.append(f"{a / b:.3f}" if a and b else "-")
    for _, key in util:
      value = row.get(key)
      cells.append("-" if value is None else f"{value:.1f}" if key == "nocomm_tflops"
                   else f"{value:.1%}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(res: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  vs = [v for v in res["variants"] if v != "baseline"]
  x = np.arange(len(res["rows"]))
  w = 0.8 / max(len(vs), 1)
  fig, ax = plt.subplots(figsize=(10, 4))
  for i, v in enumerate(vs):
    sp = [r["baseline"]["ms"] / r[v]["ms"] if "ms" in r.get(v, {}) and "ms" in r.get("baseline", {})
          else 0.0 for r in res["rows"]]
    ax.bar(x + i * w, sp, w, label=v)
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set_xticks(x + w * (len(vs) - 1) / 2, [str(r["tokens"]) for r in res["rows"]])
  ax.set_xlabel("prompt tokens")
  ax.set_ylabel("speedup over baseline (psum)")
  ax.set_title(f"{res['preset']} ({res['layers']} layers), TP={res['tp']}, {res['device']}")
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside, not on, the bars
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def profile(args, res, cfg, mesh, model) -> None:
  from weave_jax import trace
  n = args.profile_tokens or args.tokens[len(args.tokens) // 2]
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, n)
  for v in res["variants"]:
    _, exe, ex_args = make_engine(model, mesh, v, args).prepare(tokens)
    logdir = os.path.join(args.profile, f"{v.replace('+', '_')}_{n}")
    path = trace.capture(exe, *ex_args, logdir=logdir)
    print(f"\n### trace: {v} at {n} tokens ({path})")
    print(trace.format_table(trace.analyze(path)), flush=True)


def main(argv=None):
  args = parse_args(argv)
  cfg, mesh, model = build(args)
  res = run(args, cfg, mesh, model)
  print(table(res))
  out = args.json or os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "results",
      f"prefill_{res['preset']}_{res['device'].replace(' ', '_')}_tp{res['tp']}"
      + (f"_shard-of-{res['shard_of']}" if res["shard_of"] else "") + f"_{res['date']}.json")
  write_json(res, out)
  if args.png:
    plot(res, args.png)
    progress(f"chart written to {args.png}")
  if args.profile:
    profile(args, res, cfg, mesh, model)
  failed = [f"{row['tokens']} tokens {v}" for row in res["rows"] for v in res["variants"]
            if "error" in row.get(v, {})]
  if failed:   # recorded in the JSON and the table; the exit status says so too
    sys.exit(f"bench_prefill: {len(failed)} runs failed: {', '.join(failed)}")


if __name__ == "__main__":
  main()

#!/usr/bin/env python3
"""Serving benchmark (the TokenWeave paper's Figure 12): offline ``LLM.generate`` throughput.

Workload, per input length (each its own run, as in the paper): ``--num-prompts`` prompts of
random token ids of exactly that length, ``--output-len`` new tokens each (EOS ignored,
temperature 1), chunked prefill with a ``--chunk`` token budget per step (2048; 4096 for MoE).
Printed: total (prompt + output) and output tokens/s per variant and their ratio to the
baseline, then the latency of one decode step at batch 1, 16, 64 and 256 over a 2K context.

    python run/bench_serve.py                        # Llama-3.1-8B shapes, TP = all local GPUs
    python run/bench_serve.py --quick                # 200 prompts of 1K: < 4 min on one H100
    python run/bench_serve.py --preset llama-3.3-70b --tp 8 --input-lens 512 1024 2048
    python run/bench_serve.py --hf-reference         # + transformers generate, HBM roofline
    python run/bench_serve.py --quick --sync-too     # + each workload with the step-by-step loop
    python run/bench_serve.py --profile traces/      # + trace summary per step kind
    python run/bench_serve.py --dry-run              # CPU: tiny model at TP 2, 4 and 8

Variants: baseline (psum, unsplit) | fused (fused_p2p, unsplit) | fused+weave (fused_p2p, woven
where the tuning table says: the library default) | nocomm (no communication: the upper
bound).  At TP=1 there is no communication and every variant is the same program: one runs,
named "tp1".  Variants run one after another on the same weights (each with its own KV cache).

With ``--layers N`` (fewer layers than the model has) absolute tokens/s mean little; the
ratios between variants are what the run reports.  ``--hf-reference`` also runs Hugging Face
transformers' ``generate`` (torch, bf16, eager attention) on a scaled-down workload (64 prompts
of 512 + 128 tokens, best of batch 1/16/64) in a child process, measures the device-to-device
copy bandwidth and matmul rate, and prints the HBM roofline of a decode step and the
workload's ideal throughput (prefill FLOPs at the matmul rate + every decode step's bytes at
the copy bandwidth) with the fraction reached.

``--dry-run`` runs on 8 virtual CPU devices: a tiny model at TP 2, 4 and 8, every variant built
(fused_p2p, which needs GPUs, becomes rs_ag, its XLA twin with the same residual layout: said
so in the output), a handful of prompts, the plan of every step program, and a check that every
variant generates the same greedy tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

if "--dry-run" in sys.argv:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

VARIANTS = {            # name -> (backend, weave)
    "baseline": ("psum", False),
    "fused": ("fused_p2p", False),
    "fused+weave": ("fused_p2p", True),
    "nocomm": ("nocomm", False),
}
DECODE_BATCHES = (1, 16, 64, 256)
HF_SCALE_GPU = (64, 512)        # transformers reference: prompts, input tokens
HF_SCALE_CPU = (2, 16)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "results")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="llama-3.1-8b")
  p.add_argument("--paged-attention", default="auto",
                 choices=("auto", "reference", "triton", "mosaic"),
                 help="RunConfig.paged_attention (auto: the fastest kernel verified on this GPU, "
                      "the jnp reference on CPU)")
  p.add_argument("--layers", type=int, default=None, help="keep N layers (ratios reported)")
  p.add_argument("--tp", type=int, default=None, help="default: all local devices")
  p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  p.add_argument("--num-prompts", type=int, default=1000)
  p.add_argument("--input-lens", type=int, nargs="+", default=[512, 1024, 2048])
  p.add_argument("--output-len", type=int, default=128)
  p.add_argument("--chunk", type=int, default=None,
                 help="max_num_batched_tokens (default 2048; 4096 for MoE)")
  p.add_argument("--max-num-seqs", type=int, default=256)
  p.add_argument("--memory-fraction", type=float, default=0.9)
  p.add_argument("--num-pages", type=int, default=None, help="KV pages (default: from memory)")
  p.add_argument("--weave-min-tokens", type=int, default=None,
                 help="woven variants: weave steps of at least this many tokens (default: the "
                      "tuning table)")
  p.add_argument("--decode-batches", type=int, nargs="*", default=list(DECODE_BATCHES))
  p.add_argument("--decode-context", type=int, default=2048)
  p.add_argument("--decode-iters", type=int, default=20)
  p.add_argument("--json", default=None, help="default: benchmarks/results/serve_*.json")
  p.add_argument("--png", default=None)
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="trace a few steps of each kind per variant; print their summaries")
  p.add_argument("--sync-too", action="store_true",
                 help="after each workload, run it again with async_scheduling=False on the "
                      "same engine (each step waits for its tokens) and print the ratio")
  p.add_argument("--greedy-prompts", type=int, default=0, metavar="N",
                 help="check that every variant (but nocomm) generates the first one's greedy "
                      "tokens for N prompts (16 new tokens each); exit 1 if not")
  p.add_argument("--hf-reference", action="store_true",
                 help="+ transformers generate on the same device (a child process), the HBM "
                      "roofline and the workload's ideal throughput")
  p.add_argument("--hf-batches", type=int, nargs="+", default=[1, 16, 64])
  p.add_argument("--quick", action="store_true",
                 help="200 prompts of 1K tokens (< 4 min on one H100 with compilation)")
  p.add_argument("--dry-run", action="store_true",
                 help="CPU: tiny model at TP --dry-tps, a handful of prompts, every variant, "
                      "greedy equality across variants")
  p.add_argument("--dry-tps", type=int, nargs="+", default=[2, 4, 8])
  p.add_argument("--hf-child", default=None, help=argparse.SUPPRESS)   # internal: child process
  args = p.parse_args(argv)
  if args.profile and os.path.exists(args.profile) and not os.path.isdir(args.profile):
    p.error(f"--profile {args.profile}: exists and is not a directory")
  if args.quick:
    args.num_prompts, args.input_lens = 200, [1024]
  return args


# --- building --------------------------------------------------------------------------------

def model_config(args):
  from weave_jax import preset
  overrides = {"num_layers": args.layers} if args.layers else {}
  return preset(args.preset, **overrides)


def variant_names(tp: int, requested: list[str]) -> list[str]:
  """At TP=1 every variant is one program: run it once as "tp1"."""
  return ["tp1"] if tp == 1 else list(requested)


def run_config(variant: str, args, on_gpu: bool):
  """(RunConfig, note): fused_p2p becomes rs_ag off GPU (note says so).  Only fused+weave, the
  library default, lets the tuning table pick the backend per bucket (``backend_by_size``);
  the others run their own backend at every size (plan lines print each bucket's)."""
  from weave_jax import RunConfig
  backend, weave = VARIANTS.get(variant, ("psum", False))
  note = ""
  if backend == "fused_p2p" and not on_gpu:
    backend, note = "rs_ag", "fused_p2p needs GPUs: rs_ag (same layout, XLA collectives) runs"
  min_tokens = args.weave_min_tokens if weave else None
  return RunConfig(backend=backend, weave=weave, weave_min_tokens=min_tokens,
                   backend_by_size=variant == "fused+weave",
                   paged_attention=args.paged_attention), note


def build_llm(model, tp: int, run, *, max_model_len: int, chunk: int, max_num_seqs: int,
              num_pages: int | None, memory_fraction: float = 0.9, compile_ahead: bool = True):
  from weave_jax.serve import LLM
  return LLM(model, tp=tp, run=run, max_model_len=max_model_len, num_pages=num_pages,
             memory_fraction=memory_fraction, max_num_batched_tokens=chunk,
             max_num_seqs=max_num_seqs, compile_ahead=compile_ahead)


def plan_lines(llm) -> list[str]:
  """One line per step program: bucket, woven split or unsplit, backend."""
  runner = llm.runner
  out = []
  for shape in runner.program_shapes():
    plan = runner.engine.plan(shape.bucket)
    decode_only = shape.split is None and runner.shape(shape.bucket, False).split is not None
    kind = ("decode-only, unsplit" if decode_only else
            "unsplit" if shape.split is None else f"woven, half A = {shape.split} rows")
    out.append(f"    bucket {shape.bucket:>5}: {kind}, backend {plan.backend}, "
               f"{shape.sample_rows} seqs")
  return out


# --- workloads -------------------------------------------------------------------------------

def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return rng.integers(0, vocab, (n, length)).tolist()


def throughput(llm, prompts, output_len: int, label: str) -> dict:
  """Run the workload once; tokens/s and the steps by kind."""
  from weave_jax.serve import SamplingParams
  from weave_jax.serve.llm import steps_by_kind
  params = SamplingParams(temperature=1.0, max_tokens=output_len, ignore_eos=True)
  start = len(llm.step_log)
  pre = llm.scheduler.num_preemptions
  t = time.perf_counter()
  outs = llm.generate(prompts, params)
  seconds = time.perf_counter() - t
  n_in = sum(len(p) for p in prompts)
  n_out = sum(len(o.token_ids) for o in outs)
  kinds = steps_by_kind(llm.step_log[start:])
  ttft = [o.metrics.ttft for o in outs]
  tpot = [o.metrics.tpot for o in outs if o.metrics.tpot is not None]
  res = {"seconds": seconds, "input_tokens": n_in, "output_tokens": n_out,
         "total_tok_s": (n_in + n_out) / seconds, "output_tok_s": n_out / seconds,
         "steps": kinds, "preemptions": llm.scheduler.num_preemptions - pre,
         "median_ttft_s": statistics.median(ttft),
         "median_tpot_ms": statistics.median(tpot) * 1e3 if tpot else None}
  steps = ", ".join(f"{k}: {v['steps']}" for k, v in kinds.items())
  _log(f"{label}: {res['total_tok_s']:,.0f} tok/s total, {res['output_tok_s']:,.0f} output "
       f"tok/s, {seconds:.1f} s, steps {{{steps}}}, {res['preemptions']} preemptions")
  return res


def fake_decode_chunks(llm, batch: int, context: int, prefill: int = 0):
  """``batch`` decode chunks at ``context`` tokens (+ one prefill chunk of ``prefill`` tokens).
  Each request gets its own pages when the pool holds them all; otherwise the requests share
  their prefix pages (only the last page, which the step writes, is per request).  Returns
  (chunks, shared)."""
  from run.serve_common import decode_block_tables
  from weave_jax.serve import SamplingParams, ScheduledChunk
  from weave_jax.serve.block_manager import pages_for
  runner = llm.runner
  ps, pool = runner.page_size, runner.num_pages
  tables, next_page, shared = decode_block_tables(batch, pages_for(context, ps), pool,
                                                  pages_for(prefill, ps))
  params = SamplingParams(temperature=1.0, max_tokens=1 << 20, ignore_eos=True)
  rng = np.random.default_rng(0)
  chunks = [ScheduledChunk(i, np.array([rng.integers(0, llm.cfg.vocab_size)], np.int32),
                           context - 1, table, True, params, 0) for i, table in enumerate(tables)]
  if prefill:
    n_pages = pages_for(prefill, ps)
    table = np.arange(next_page, next_page + n_pages, dtype=np.int32)
    chunks.append(ScheduledChunk(batch, rng.integers(0, llm.cfg.vocab_size, prefill)
                                 .astype(np.int32), 0, table, True, params, 0))
  return chunks, shared


def decode_latency(llm, batches, context: int, iters: int, label: str) -> dict:
  """Median ms of one decode step (host packing + device + sampled ids back) per batch size."""
  from weave_jax.bench import time_fn
  out = {}
  for b in batches:
    if b > llm.runner.max_num_seqs:
      out[str(b)] = {"skipped": f"batch > max_num_seqs={llm.runner.max_num_seqs}"}
      continue
    chunks, shared = fake_decode_chunks(llm, b, context)
    t = time_fn(lambda: llm.runner.execute(chunks), warmup=3, iters=iters)
    out[str(b)] = {"ms": t.median_ms, "min_ms": t.min_ms, "shared_pages": shared}
    _log(f"{label}: decode batch {b} at context {context}: {out[str(b)]['ms']:.2f} ms"
         + (" (prefix pages shared: the pool cannot hold every context)" if shared else ""))
  return out


# --- profile ---------------------------------------------------------------------------------

class _StepCall:
  """A step over fixed chunks for ``trace.capture``; ``as_text`` gives the program's HLO (the
  trace's op table)."""

  def __init__(self, llm, chunks, decode: bool):
    self.llm, self.chunks = llm, chunks
    runner = llm.runner
    n = sum(c.token_ids.size for c in chunks)
    self.shape = runner.shape(runner.bucket(n), decode=decode)

  def __call__(self):
    return self.llm.runner.execute(self.chunks).tokens

  def as_text(self):
    return self.llm.runner.program(self.shape).as_text()


def profile(llm, variant: str, args, chunk: int) -> dict:
  from weave_jax import trace
  decodes = min(32, args.max_num_seqs - 1)
  mixed, _ = fake_decode_chunks(llm, decodes, min(1024, args.decode_context), chunk - decodes)
  dec, _ = fake_decode_chunks(llm, min(64, args.max_num_seqs), args.decode_context)
  out = {}
  for label, chunks, decode in (("mixed", mixed, False), ("decode", dec, True)):
    call = _StepCall(llm, chunks, decode)
    kind = llm.runner.execute(chunks).kind
    logdir = os.path.join(args.profile, f"{variant.replace('+', '_')}_{label}_{kind}")
    path = trace.capture(call, logdir=logdir, steps=3, warmup=1)
    print(f"\n### trace: {variant}, {label} step ({kind}, {sum(c.token_ids.size for c in chunks)}"
          f" tokens) -> {path}")
    print(trace.format_table(trace.analyze(path)), flush=True)
    out[f"{label}:{kind}"] = str(path)
  return out


# --- HF reference, roofline ------------------------------------------------------------------

def hf_reference_child(spec: str) -> None:
  """(child process) transformers generate: output tok/s per batch size, JSON on stdout's last
  line.  Random bf16 weights on the spec's device (CUDA; CPU in --dry-run)."""
  import torch
  import transformers
  cfg_d = json.loads(spec)
  family, device = cfg_d.pop("family"), cfg_d.pop("device")
  n_prompts, in_len, out_len = cfg_d.pop("n_prompts"), cfg_d.pop("in_len"), cfg_d.pop("out_len")
  batches = cfg_d.pop("batches")
  cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
         "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
         "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM)}[family]
  config = cls[0](**cfg_d, attn_implementation="eager")
  torch.manual_seed(0)
  torch.set_default_dtype(torch.bfloat16)
  with torch.device(device):
    model = cls[1](config).eval()
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  gen = np.random.default_rng(0)
  res = {}
  for b in batches:
    n = min(n_prompts, max(b, 2))          # batch 1: two prompts one after the other
    ids = torch.tensor(gen.integers(0, config.vocab_size, (n, in_len)), device=device)
    kw = dict(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, pad_token_id=0)
    with torch.no_grad():
      model.generate(ids[:b, :8], attention_mask=torch.ones_like(ids[:b, :8]),
                     **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
      sync()
      t = time.perf_counter()
      for i in range(0, n, b):
        model.generate(ids[i:i + b], attention_mask=torch.ones_like(ids[i:i + b]), **kw)
      sync()
    seconds = time.perf_counter() - t
    res[str(b)] = {"prompts": n, "seconds": seconds, "output_tok_s": n * out_len / seconds}
    print(f"[hf] batch {b}: {n * out_len / seconds:,.0f} output tok/s", file=sys.stderr,
          flush=True)
  print(json.dumps(res))


def hf_reference(cfg, args, device: str, n_prompts: int, in_len: int) -> dict:
  """Run ``hf_reference_child`` in a child process (its own device memory, taken and given
  back before ours)."""
  spec = dict(family=cfg.family, device=device, vocab_size=cfg.vocab_size,
              hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
              rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_embeddings,
              max_position_embeddings=8192, n_prompts=n_prompts, in_len=in_len,
              out_len=args.output_len, batches=args.hf_batches)
  if cfg.is_moe:
    spec.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token)
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  if device == "cuda":
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
  _log(f"hf reference: transformers generate (bf16, eager, {device}) in a child process")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--hf-child",
                         json.dumps(spec)], env=env, capture_output=True, text=True)
  sys.stderr.write(proc.stderr[-4000:])
  if proc.returncode:
    raise RuntimeError(f"hf reference failed (exit {proc.returncode})")
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  best = max(res.values(), key=lambda r: r["output_tok_s"])
  return {"per_batch": res, "best_output_tok_s": best["output_tok_s"],
          "workload": f"{n_prompts} prompts x ({in_len} in + {args.output_len} out), one "
                      f"device, torch bf16 eager", "n_prompts": n_prompts, "in_len": in_len}


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
  """Measured copy rate of one device, bytes/s (read + write counted): the faster of a copy
  and a negation of ``nbytes`` (``weave_jax.bench.stream_gbps``)."""
  from weave_jax.bench import stream_gbps
  return max(stream_gbps(nbytes).values()) * 1e9


def weight_bytes_per_rank(model) -> int:
  import jax
  from flax import nnx
  return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(nnx.state(model)))


def measure_device(small: bool) -> tuple[float, float]:
  """(copy bytes/s, matmul TFLOP/s) of one device, measured before any KV cache takes the
  memory; ``small``: tiny sizes (the CPU dry run)."""
  from weave_jax.bench import matmul_tflops
  if small:
    return copy_bandwidth(1 << 21), matmul_tflops(256, iters=5)
  return copy_bandwidth(), matmul_tflops()


def roofline(weights: int, measured: tuple[float, float], cfg, tp: int, args, res: dict) -> dict:
  """HBM roofline of the decode steps and the workload's ideal throughput (prefill FLOPs of the
  decoder layers at the measured matmul rate + every decode step's weight and KV bytes at the
  measured copy bandwidth; max_num_seqs requests per decode wave)."""
  from weave_jax.bench import layer_flops_per_rank
  from weave_jax.serve.kv_cache import bytes_per_page
  bw, tflops = measured
  kv_token = bytes_per_page(cfg, 1, tp)
  out = {"copy_GBps": bw / 1e9, "matmul_tflops": tflops, "weight_bytes_per_rank": weights,
         "kv_bytes_per_token_per_rank": kv_token, "decode_roofline_ms": {}, "ideal": {}}
  for b in args.decode_batches:
    out["decode_roofline_ms"][str(b)] = (weights + b * args.decode_context * kv_token) / bw * 1e3
  s = args.max_num_seqs
  for length in args.input_lens:
    n = args.num_prompts
    prefill_flops = n * cfg.num_layers * layer_flops_per_rank(cfg, length, tp)
    decode_s = 0.0
    for wave in range(-(-n // s)):
      b = min(s, n - wave * s)
      decode_s += sum(weights + b * (length + j) * kv_token for j in range(args.output_len)) / bw
    ideal_s = prefill_flops / (tflops * 1e12) + decode_s
    ideal = n * (length + args.output_len) / ideal_s
    row = {"ideal_total_tok_s": ideal, "prefill_s": prefill_flops / (tflops * 1e12),
           "decode_s": decode_s}
    for v, r in res["throughput"].get(str(length), {}).items():
      row[f"fraction_{v}"] = r["total_tok_s"] / ideal
    out["ideal"][str(length)] = row
  return out


# --- output ----------------------------------------------------------------------------------

def _log(msg: str) -> None:
  """weave_jax.bench.progress, imported here: the transformers child must not import jax."""
  from weave_jax.bench import progress
  progress(msg)


def table(res: dict) -> str:
  vs = res["variants"]
  base = "baseline" if "baseline" in vs else vs[0]
  cut = ", cut: compare ratios" if res["cut"] else ""
  lines = [f"\n{res['preset']} ({res['layers']} layers{cut})"
           f", TP={res['tp']}, {res['device']}, chunk {res['chunk']}, {res['num_prompts']} "
           f"prompts, {res['output_len']} output tokens",
           f"{'input':>6} {'variant':>12} {'total tok/s':>12} {'output tok/s':>13} "
           f"{'vs ' + base:>12} {'steps woven/unsplit/decode':>27} {'preempt':>8}"]
  for length, per in res["throughput"].items():
    for v, r in per.items():
      st = r["steps"]
      ratio = r["total_tok_s"] / per[base]["total_tok_s"] if base in per else float("nan")
      counts = "/".join(str(st.get(k, {}).get("steps", 0)) for k in ("woven", "unsplit", "decode"))
      lines.append(f"{length:>6} {v:>12} {r['total_tok_s']:>12,.0f} {r['output_tok_s']:>13,.0f} "
                   f"{ratio:>11.3f}x {counts:>27} {r['preemptions']:>8}")
  for length, per in res.get("throughput_sync", {}).items():
    for v, r in per.items():
      fast = res["throughput"][length][v]["total_tok_s"]
      lines.append(f"{length:>6} {v:>12} sync loop: {r['total_tok_s']:,.0f} tok/s total; "
                   f"asynchronous scheduling {fast / r['total_tok_s']:.3f}x")
  lines += [f"note: {v}: {note}" for v, note in res.get("notes", {}).items()]
  lines += [f"FAILED: {v}: {err}" for v, err in res.get("errors", {}).items()]
  if any(res.get("decode_ms", {}).values()):
    batches = list(next(iter(res["decode_ms"].values())))
    lines += ["", f"decode step latency (ms) at context {res['decode_context']}",
              f"{'variant':>12} " + " ".join(f"{'b=' + b:>9}" for b in batches)]
    for v, per in res["decode_ms"].items():
      lines.append(f"{v:>12} " + " ".join(
          f"{per[b]['ms']:>9.2f}" if "ms" in per[b] else f"{'-':>9}" for b in batches))
  if res.get("roofline"):
    rf = res["roofline"]
    lines += ["", f"HBM: copy {rf['copy_GBps']:.0f} GB/s, matmul {rf['matmul_tflops']:.0f} "
              f"TFLOP/s, weights {rf['weight_bytes_per_rank'] / 2**30:.2f} GiB/rank",
              "decode roofline (ms): " + ", ".join(f"b={b}: {ms:.2f}"
                                                   for b, ms in rf["decode_roofline_ms"].items())]
    for length, row in rf["ideal"].items():
      fr = ", ".join(f"{k[9:]} {v:.0%}" for k, v in row.items() if k.startswith("fraction_"))
      lines.append(f"input {length}: ideal {row['ideal_total_tok_s']:,.0f} tok/s; reached: {fr}")
  if res.get("hf_reference"):
    hf = res["hf_reference"]
    lines.append(f"transformers generate ({hf['workload']}): best "
                 f"{hf['best_output_tok_s']:,.0f} output tok/s; weave_jax on the same: "
                 f"{res.get('same_as_hf', {}).get('output_tok_s', float('nan')):,.0f}"
                 + (f" (sync loop: {res['same_as_hf_sync']['output_tok_s']:,.0f})"
                    if "same_as_hf_sync" in res else ""))
  return "\n".join(lines)


def plot(res: dict, path: str) -> bool:
  """The chart (throughput ratios per input length, decode latency per batch); False when
  matplotlib is missing (said on stderr)."""
  try:
    import matplotlib
  except ImportError:
    _log(f"matplotlib is not installed: no chart written ({path}); the JSON has every number")
    return False
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  lengths = list(res["throughput"])
  vs = [v for v in res["variants"] if lengths and all(v in res["throughput"][n] for n in lengths)]
  if not vs:
    _log(f"no variant has results: no chart ({path})")
    return False
  base = "baseline" if "baseline" in vs else vs[0]
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
  w = 0.8 / len(vs)
  for i, v in enumerate(vs):
    ratio = [res["throughput"][n][v]["total_tok_s"] / res["throughput"][n][base]["total_tok_s"]
             for n in lengths]
    ax.bar(np.arange(len(lengths)) + i * w, ratio, w, label=v)
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set_xticks(np.arange(len(lengths)) + w * (len(vs) - 1) / 2, lengths)
  ax.set_xlabel("input tokens")
  ax.set_ylabel(f"throughput / {base}")
  ax.legend(fontsize=8)
  for v, per in res.get("decode_ms", {}).items():
    xs = [int(b) for b in per if "ms" in per[b]]
    ax2.plot(xs, [per[str(b)]["ms"] for b in xs], marker="o", label=v)
  ax2.set_xscale("log", base=2)
  ax2.set_xlabel("decode batch")
  ax2.set_ylabel(f"ms per step (context {res['decode_context']})")
  ax2.legend(fontsize=8)
  fig.suptitle(f"{res['preset']} ({res['layers']} layers), TP={res['tp']}, {res['device']}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


# --- main ------------------------------------------------------------------------------------

def run(args, on_gpu: bool, hf: dict | None = None) -> dict:
  """Every variant over the workload.  ``hf``: the transformers reference measured before JAX
  took the GPU (``main``); in the CPU dry run it is measured here."""
  import jax
  from weave_jax import init_random, make_mesh
  cfg = model_config(args)
  tp = args.tp or len(jax.local_devices())
  chunk = args.chunk or (4096 if cfg.is_moe else 2048)
  max_model_len = max(max(args.input_lens) + args.output_len, args.decode_context + 1)
  dev = jax.local_devices()[0]
  res = {"preset": args.preset, "layers": cfg.num_layers, "cut": args.layers is not None,
         "tp": tp, "device": getattr(dev, "device_kind", dev.platform), "jax": jax.__version__,
         "date": time.strftime("%Y-%m-%d"), "chunk": chunk, "num_prompts": args.num_prompts,
         "input_lens": args.input_lens, "output_len": args.output_len,
         "max_num_seqs": args.max_num_seqs, "decode_context": args.decode_context,
         "variants": variant_names(tp, args.variants), "notes": {}, "errors": {}, "throughput": {},
         "decode_ms": {}, "command": " ".join(sys.argv)}
  if tp == 1:
    _log("TP=1: no communication, every variant is one program; running it once as 'tp1'")
  _log(f"{args.preset}: {cfg.num_layers} layers" + (" (cut with --layers: compare ratios, not "
                                                   "absolute tokens/s)" if args.layers else ""))
  if args.hf_reference:
    res["hf_reference"] = hf or hf_reference(cfg, args, "cpu", *HF_SCALE_CPU)
  model = init_random(cfg, make_mesh(tp))
  measured = measure_device(small=not on_gpu) if args.hf_reference else None
  for v in res["variants"]:
    try:
      run_variant(v, model, cfg, tp, chunk, max_model_len, args, on_gpu, res)
    except Exception as e:              # one variant's failure must not lose the others' numbers
      traceback.print_exc()
      res["errors"][v] = f"{type(e).__name__}: {e}"
      _log(f"{v}: FAILED ({res['errors'][v]}); going on with the other variants")
    gc.collect()
  if measured:
    res["roofline"] = roofline(weight_bytes_per_rank(model), measured, cfg, tp, args, res)
  return res


def sync_throughput(llm, prompts, output_len: int, label: str) -> dict:
  """``throughput`` with the step-by-step loop (async_scheduling off), on the same engine."""
  llm.async_scheduling = False
  try:
    return throughput(llm, prompts, output_len, label)
  finally:
    llm.async_scheduling = True


def run_variant(v: str, model, cfg, tp: int, chunk: int, max_model_len: int, args, on_gpu: bool,
                res: dict) -> None:
  """One variant: build its LLM on the shared weights, run every workload, record in ``res``."""
  run_cfg, note = run_config(v, args, on_gpu)
  if note:
    res["notes"][v] = note
    _log(f"{v}: {note}")
  _log(f"{v}: building ({run_cfg})")
  llm = build_llm(model, tp, run_cfg, max_model_len=max_model_len, chunk=chunk,
                  max_num_seqs=args.max_num_seqs, num_pages=args.num_pages,
                  memory_fraction=args.memory_fraction)
  print(f"plan of {v}:\n" + "\n".join(plan_lines(llm)), flush=True)
  throughput(llm, random_prompts(min(8, args.num_prompts), min(args.input_lens),
                                 cfg.vocab_size, 99), 4, f"{v} warm-up")
  for length in args.input_lens:
    prompts = random_prompts(args.num_prompts, length, cfg.vocab_size, length)
    res["throughput"].setdefault(str(length), {})[v] = throughput(
        llm, prompts, args.output_len, f"{v} input {length}")
    if args.sync_too:
      res.setdefault("throughput_sync", {}).setdefault(str(length), {})[v] = sync_throughput(
          llm, prompts, args.output_len, f"{v} input {length}, sync")
  res["decode_ms"][v] = decode_latency(llm, args.decode_batches, args.decode_context,
                                       args.decode_iters, v)
  if args.greedy_prompts:
    res.setdefault("greedy", {})[v] = greedy_check(llm, random_prompts(
        args.greedy_prompts, min(args.input_lens), cfg.vocab_size, 3))
  if args.hf_reference and v == res["variants"][-1]:
    hf = res["hf_reference"]
    hf_prompts = random_prompts(hf["n_prompts"], hf["in_len"], cfg.vocab_size, 7)
    res["same_as_hf"] = throughput(llm, hf_prompts, args.output_len, f"{v} hf workload")
    if args.sync_too:
      res["same_as_hf_sync"] = sync_throughput(llm, hf_prompts, args.output_len,
                                               f"{v} hf workload, sync")
  if args.profile:
    res.setdefault("profiles", {})[v] = profile(llm, v, args, chunk)


def greedy_check(llm, prompts) -> list[list[int]]:
  """Greedy tokens (16 per prompt): every variant but nocomm must give the baseline's."""
  from weave_jax.serve import SamplingParams
  outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                      progress=False)
  return [o.token_ids for o in outs]


def greedy_verdict(res: dict) -> int:
  """Print, per variant, how many prompts' greedy tokens equal the first variant's (and where
  the others first differ); returns the number of variants that differ anywhere.  nocomm,
  wrong on purpose, is not compared."""
  tokens = res.get("greedy", {})
  if not tokens:
    return 0
  ref_name = next(iter(tokens))
  failures = 0
  for v, t in tokens.items():
    if v == "nocomm":
      print("greedy: nocomm not compared (no communication: wrong on purpose)")
      continue
    ref = tokens[ref_name]
    first = [next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), None)
             for x, y in zip(t, ref)]
    differ = [j for j in first if j is not None]
    failures += bool(differ)
    where = f"; the others first differ at token {sorted(differ)}" if differ else ""
    print(f"greedy: {v}: {len(t) - len(differ)}/{len(t)} prompts equal {ref_name}'s 16 "
          f"tokens{where}")
  return failures


def dry_args(args, tp: int) -> argparse.Namespace:
  """The tiny CPU workload of ``--dry-run`` at ``tp``: buckets of 16 and 32 tokens, woven
  variants weave the 32-token one, so that woven, unsplit and decode steps all run."""
  return argparse.Namespace(**{
      **vars(args), "preset": "tiny", "layers": 2, "tp": tp, "num_prompts": 6,
      "input_lens": [40], "output_len": 6, "chunk": 32, "max_num_seqs": 8, "num_pages": 64,
      "decode_batches": [1, 4], "decode_context": 48, "decode_iters": 2,
      "weave_min_tokens": 32, "greedy_prompts": max(args.greedy_prompts, 4),
      "hf_batches": [1, 2]})


def write_results(res: dict, json_path: str | None, png_path: str | None) -> None:
  from weave_jax.bench import write_json
  if json_path:
    write_json(res, json_path)
  if png_path:
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
  if png_path and plot(res, png_path):
    _log(f"chart written to {png_path}")


def _suffixed(path: str | None, suffix: str) -> str | None:
  if not path:
    return None
  stem, ext = os.path.splitext(path)
  return stem + suffix + ext


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.hf_child:
    hf_reference_child(args.hf_child)
    return 0
  failures = 0
  if args.dry_run:
    for tp in args.dry_tps:
      res = run(dry_args(args, tp), on_gpu=False)
      print(table(res), flush=True)
      failures += greedy_verdict(res) + len(res["errors"])
      write_results(res, _suffixed(args.json, f"_tp{tp}"), _suffixed(args.png, f"_tp{tp}"))
    verdict = "ok" if not failures else f"{failures} variant(s) failed or differ"
    print(f"[dry-run] {verdict}", flush=True)
    return 1 if failures else 0
  # transformers first, in a child process: once JAX starts it holds most of the GPU memory
  hf = hf_reference(model_config(args), args, "cuda", *HF_SCALE_GPU) if args.hf_reference else None
  import jax
  if jax.default_backend() != "gpu":
    raise SystemExit("bench_serve: JAX sees no GPU; install JAX's CUDA plugin (run/bench.sh), "
                     "or use --dry-run for the CPU check")
  res = run(args, on_gpu=True, hf=hf)
  print(table(res), flush=True)
  failures = greedy_verdict(res) + len(res["errors"])
  out = args.json or os.path.join(RESULTS, f"serve_{res['preset']}_"
                                  f"{res['device'].replace(' ', '_')}_tp{res['tp']}.json")
  write_results(res, out, args.png or os.path.splitext(out)[0] + ".png")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())

#!/usr/bin/env python3
"""Generate text (or token ids) with weave_jax's serving engine: ``LLM.generate`` / ``LLM.stream``.

    python run/generate.py --model /path/to/Llama-3.1-8B-Instruct --prompt "Hello" --prompt "Hi"
    python run/generate.py --model /path/to/hf_dir --prompt "Once upon" --stream --temperature 0.8
    python run/generate.py --model tiny --num-random 8 --input-len 32     # preset: random ids
    python run/generate.py --model llama-3.1-8b --layers 2 --num-random 4 --tp 1

A Hugging Face directory brings its tokenizer and EOS; a preset has random weights and no
tokenizer, so its prompts are random token ids (``--num-random`` prompts of ``--input-len``
tokens) or ``--ids 1,2,3``.  Without a GPU the engine runs on 8 virtual CPU devices.
"""
from __future__ import annotations

import argparse
import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from weave_jax import PRESETS, preset  # noqa: E402
from weave_jax.serve import LLM, SamplingParams  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True,
                 help=f"a Hugging Face directory or a preset ({', '.join(PRESETS)})")
  p.add_argument("--layers", type=int, default=None, help="preset only: keep N layers")
  p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
  p.add_argument("--ids", action="append", default=[],
                 help="a prompt as comma-separated token ids (repeatable)")
  p.add_argument("--num-random", type=int, default=0, help="add N prompts of random token ids")
  p.add_argument("--input-len", type=int, default=16, help="length of the random prompts")
  p.add_argument("--max-tokens", type=int, default=32)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=-1)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=None, help="sampling seed (per request: seed + i)")
  p.add_argument("--ignore-eos", action="store_true")
  p.add_argument("--stream", action="store_true", help="print tokens as they come")
  p.add_argument("--tp", type=int, default=None, help="default: all local devices")
  p.add_argument("--backend", default=None, help="communication backend (default: LLM's)")
  p.add_argument("--no-weave", action="store_true", help="never split steps")
  p.add_argument("--dtype", default=None)
  p.add_argument("--max-model-len", type=int, default=None)
  p.add_argument("--max-num-batched-tokens", type=int, default=2048)
  p.add_argument("--max-num-seqs", type=int, default=256)
  p.add_argument("--num-pages", type=int, default=None,
                 help="KV cache pages (default: from --memory-fraction; required on CPU)")
  p.add_argument("--memory-fraction", type=float, default=0.9)
  args = p.parse_args(argv)
  if not (args.prompt or args.ids or args.num_random):
    p.error("give at least one --prompt, --ids or --num-random")
  if args.layers is not None and args.model not in PRESETS:
    p.error("--layers applies to presets only")
  return args


def build(args) -> LLM:
  import jax
  model = args.model
  if model in PRESETS:
    model = preset(model, **({"num_layers": args.layers} if args.layers else {}))
    if args.dtype:
      model = model.replace(dtype=args.dtype)
  num_pages = args.num_pages
  if num_pages is None and jax.default_backend() == "cpu":
    num_pages = 512
  return LLM(model, tp=args.tp, backend=args.backend, weave=not args.no_weave, dtype=args.dtype,
             max_model_len=args.max_model_len, num_pages=num_pages,
             memory_fraction=args.memory_fraction,
             max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)


def prompts_of(args, vocab: int) -> list:
  out: list = list(args.prompt)
  out += [[int(t) for t in ids.split(",")] for ids in args.ids]
  rng = np.random.RandomState(0)
  out += [rng.randint(0, vocab, args.input_len).tolist() for _ in range(args.num_random)]
  return out


def params_of(args, n: int) -> list[SamplingParams]:
  return [SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         seed=None if args.seed is None else args.seed + i,
                         max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
          for i in range(n)]


def show(delta_or_output, has_text: bool) -> str:
  return delta_or_output.text if has_text else " ".join(map(str, delta_or_output.token_ids))


def main(argv=None) -> int:
  args = parse_args(argv)
  llm = build(args)
  prompts = prompts_of(args, llm.cfg.vocab_size)
  params = params_of(args, len(prompts))
  has_text = llm.tokenizer is not None
  if args.stream:
    for d in llm.stream(prompts, params):
      end = f"  [{d.finish_reason}]\n" if d.finished else "\n"
      print(f"[{d.index}] {show(d, has_text)}", end=end, flush=True)
    return 0
  for i, out in enumerate(llm.generate(prompts, params)):
    m = out.metrics
    tpot = f"{m.tpot * 1e3:.1f} ms" if m.tpot is not None else "-"
    print(f"--- request {i}: {len(out.prompt_token_ids)} prompt tokens, {len(out.token_ids)} "
          f"generated ({out.finish_reason}), TTFT {m.ttft * 1e3:.1f} ms, TPOT {tpot}")
    print(show(out, has_text))
  return 0


if __name__ == "__main__":
  sys.exit(main())

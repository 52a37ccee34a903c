"""``LLM``'s API on a tiny Hugging Face Llama with a tokenizer: text prompts, EOS from
generation_config.json, streaming, the add_request/step loop, bad input, sampling with seeds."""
import json
import os
import pathlib

import numpy as np
import pytest

pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

from conftest import ROOT, load_module  # noqa: E402
from test_serve_parity import VOCAB, hf_greedy, prompts, save_family  # noqa: E402

from weave_jax import make_mesh  # noqa: E402
from weave_jax.serve.llm import LLM  # noqa: E402
from weave_jax.serve.sampling_params import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def write_word_tokenizer(directory: str) -> None:
  """tokenizer.json: word "w<i>" is token i, words split on whitespace."""
  vocab = {f"w{i}": i for i in range(VOCAB)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(os.path.join(directory, "tokenizer.json"))


def as_text(ids) -> str:
  return " ".join(f"w{t}" for t in ids)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """(llm, references of prompts(1) at 8 tokens, eos id, model directory).  EOS is a token
  that greedy decoding of prompt 0 reaches at its 6th step."""
  directory = str(tmp_path_factory.mktemp("llama_tok"))
  model = save_family("llama", directory)
  write_word_tokenizer(directory)
  refs = [hf_greedy(model, p, 8) for p in prompts(1)]
  eos = next(t for i, t in enumerate(refs[0]) if i >= 5 and t not in refs[0][:i])
  with open(os.path.join(directory, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [eos], "bos_token_id": 1}, f)
  llm = LLM(directory, tp=2, backend="rs_ag", weave=True, weave_min_tokens=2, dtype="float32",
            max_model_len=64, page_size=4, num_pages=48, max_num_batched_tokens=16,
            max_num_seqs=8, compile_ahead=False)
  return llm, refs, eos, directory


def test_text_prompts_use_the_tokenizer(served):
  llm, refs, *_ = served
  ps = prompts(1)
  outs = llm.generate([as_text(p) for p in ps], GREEDY, progress=False)
  for o, p, r in zip(outs, ps, refs):
    assert o.prompt_token_ids == p and o.prompt == as_text(p)
    assert o.token_ids == r
    assert o.text == as_text(r)
    assert o.metrics.ttft > 0 and o.metrics.tpot > 0


def test_eos_from_generation_config(served):
  llm, refs, eos, _ = served
  assert llm.eos_token_ids == (eos,)
  out = llm.generate(prompts(1)[0], SamplingParams(temperature=0, max_tokens=8),
                     progress=False)[0]
  cut = refs[0].index(eos) + 1
  assert out.token_ids == refs[0][:cut] and out.finish_reason == "stop"


def test_stream_yields_the_same_tokens_and_text(served):
  llm, refs, *_ = served
  ps = [as_text(p) for p in prompts(1)]
  got = {i: [] for i in range(len(ps))}
  text = {i: "" for i in range(len(ps))}
  finished = []
  for delta in llm.stream(ps, GREEDY):
    assert delta.index not in finished and delta.token_ids
    got[delta.index] += delta.token_ids
    text[delta.index] += delta.text
    if delta.finished:
      finished.append(delta.index)
      assert delta.finish_reason == "length"
  assert sorted(finished) == list(range(len(ps)))
  assert [got[i] for i in range(len(ps))] == refs
  assert [text[i] for i in range(len(ps))] == [as_text(r) for r in refs]


def test_closing_a_stream_aborts_its_requests(served):
  llm, *_ = served
  stream = llm.stream(prompts(1), GREEDY)
  first = next(stream)
  assert len(first.token_ids) == 1 and not first.finished
  stream.close()
  assert not llm.has_unfinished
  assert llm.scheduler.blocks.num_free_pages == llm.runner.num_pages


@pytest.mark.parametrize("prompt,params,match", [
    ([], GREEDY, "empty prompt"),
    ("", GREEDY, "empty prompt"),
    ([1] * 65, GREEDY, "longer than max_model_len"),
    ([1, VOCAB + 3], GREEDY, "outside the vocabulary"),
    ([1, 2], 1, "SamplingParams"),
])
def test_bad_request_in_generate_raises_before_anything_runs(served, prompt, params, match):
  llm, *_ = served
  steps = len(llm.step_log)
  good = SamplingParams(max_tokens=2)
  with pytest.raises((ValueError, TypeError), match=f"request 1: .*{match}"):
    llm.generate([[3, 4], prompt, [5]], [good, params, good], progress=False)
  assert len(llm.step_log) == steps and not llm.has_unfinished


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -1.0),
                                         ("top_p", 0.0), ("top_p", 1.01)])
def test_bad_sampling_params_name_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    SamplingParams(**{field: value})


def test_bad_add_request_leaves_others_running(served):
  llm, refs, *_ = served
  ps = prompts(1)
  first = llm.add_request(ps[0], GREEDY)
  llm.step()
  with pytest.raises(ValueError, match="outside the vocabulary"):
    llm.add_request([2, -5], GREEDY)
  with pytest.raises(ValueError, match="max_tokens"):
    llm.add_request(ps[1], SamplingParams(max_tokens=-1))
  second = llm.add_request(ps[1], GREEDY)
  while llm.has_unfinished:
    llm.step()
  assert llm.output(first).token_ids == refs[0]
  assert llm.output(second).token_ids == refs[1]


def test_more_requests_than_fit_queue(served):
  llm, refs, *_ = served
  ps = prompts(1) * 5                                  # 40 requests, 8 run at a time
  outs = llm.generate(ps, GREEDY, progress=False)
  assert [o.token_ids for o in outs] == refs * 5
  assert llm.scheduler.blocks.num_free_pages == llm.runner.num_pages


def test_sampling_is_seeded(served):
  llm, refs, *_ = served
  ps = prompts(1)[:4]
  seeded = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=8, ignore_eos=True,
                           logprobs=True) for i in range(4)]
  a = llm.generate(ps, seeded, progress=False)
  b = llm.generate(ps[::-1], seeded[::-1], progress=False)[::-1]   # other neighbours
  assert [o.token_ids for o in a] == [o.token_ids for o in b]
  assert [o.token_ids for o in a] != refs[:4]
  for o in a:
    assert len(o.logprobs) == len(o.token_ids) and all(lp <= 0 for lp in o.logprobs)
  other = llm.generate(ps, [SamplingParams(temperature=1.0, seed=7 + i, max_tokens=8,
                                           ignore_eos=True) for i in range(4)], progress=False)
  assert [o.token_ids for o in other] != [o.token_ids for o in a]
  top1 = llm.generate(ps, SamplingParams(temperature=0.8, top_k=1, max_tokens=8, ignore_eos=True),
                      progress=False)
  assert [o.token_ids for o in top1] == refs[:4]
  tiny_p = llm.generate(ps, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=8,
                                           ignore_eos=True), progress=False)
  assert [o.token_ids for o in tiny_p] == refs[:4]


def test_random_weights_take_token_ids_only():
  from test_serve_soak import CFG, numpy_random_model      # random weights, no tokenizer
  llm = LLM(numpy_random_model(CFG, make_mesh(1)), tp=1, max_model_len=32, num_pages=8,
            max_num_batched_tokens=16, max_num_seqs=4, compile_ahead=False)
  assert llm.tokenizer is None and llm.eos_token_ids == ()
  with pytest.raises(ValueError, match="request 0: a text prompt needs a tokenizer"):
    llm.generate("hello", progress=False)
  with pytest.raises(ValueError, match="neither a directory nor a preset"):
    LLM("no-such-model")


def _run_script(name: str):
  return load_module(ROOT / "run" / f"{name}.py", f"run_{name}")


def test_generate_script_streams_text(served, capsys):
  _, refs, _, directory = served
  text = as_text(prompts(1)[0])
  code = _run_script("generate").main([
      "--model", directory, "--prompt", text, "--max-tokens", "8", "--ignore-eos", "--stream",
      "--tp", "1", "--dtype", "float32", "--num-pages", "32", "--max-model-len", "64",
      "--max-num-batched-tokens", "16", "--max-num-seqs", "4"])
  assert code == 0
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[0] ")]
  assert " ".join(line[4:].split("  [")[0] for line in lines).split() == as_text(refs[0]).split()
  assert lines[-1].endswith("[length]")


def test_bench_serve_dry_run_at_tp2(tmp_path, capsys):
  out = tmp_path / "serve.json"
  code = _run_script("bench_serve").main([
      "--dry-run", "--dry-tps", "2", "--variants", "baseline", "fused+weave", "--sync-too",
      "--profile", str(tmp_path / "traces"), "--json", str(out)])
  assert code == 0                                   # greedy tokens agree across variants
  res = json.loads((tmp_path / "serve_tp2.json").read_text())
  # --profile: one traced step per kind, each summarized (where the time goes, collectives)
  assert set(res["profiles"]["baseline"]) == {"mixed:unsplit", "decode:decode"}
  assert set(res["profiles"]["fused+weave"]) == {"mixed:woven", "decode:decode"}
  assert all(pathlib.Path(p).is_file() for v in res["profiles"].values() for p in v.values())
  printed = capsys.readouterr().out
  assert printed.count("### trace:") == 4 and "exposed ms" in printed
  assert res["tp"] == 2 and set(res["throughput"]["40"]) == {"baseline", "fused+weave"}
  steps = {v: r["steps"] for v, r in res["throughput"]["40"].items()}
  assert steps["fused+weave"]["woven"]["steps"] > 0 and "woven" not in steps["baseline"]
  assert all(s["decode"]["steps"] > 0 for s in steps.values())
  assert "rs_ag" in res["notes"]["fused+weave"]
  assert all("ms" in r for r in res["decode_ms"]["baseline"].values())
  sync = res["throughput_sync"]["40"]                # the same workloads, step-by-step loop
  assert set(sync) == {"baseline", "fused+weave"}
  assert all(sync[v]["output_tokens"] == res["throughput"]["40"][v]["output_tokens"]
             for v in sync)


def test_bench_serve_refuses_a_profile_path_that_is_a_file(tmp_path, capsys):
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("")
  with pytest.raises(SystemExit):
    _run_script("bench_serve").parse_args(["--dry-run", "--profile", str(not_a_dir)])
  assert "is not a directory" in capsys.readouterr().err


def test_async_and_sync_scheduling_agree(served):
  """Planning a step before the last one's tokens return (placeholders read on device) gives
  the tokens of the step-by-step loop, EOS stops included."""
  llm, refs, eos, _ = served
  params = SamplingParams(temperature=0, max_tokens=8)
  got = {}
  try:
    for mode in (True, False):
      llm.async_scheduling = mode
      got[mode] = [o.token_ids for o in llm.generate(prompts(1), params, progress=False)]
  finally:
    llm.async_scheduling = True
  assert got[True] == got[False]
  assert got[True][0] == refs[0][:refs[0].index(eos) + 1]
  assert llm.scheduler.blocks.num_free_pages == llm.runner.num_pages


def test_async_scheduling_must_be_a_bool():
  with pytest.raises(TypeError, match="async_scheduling"):
    LLM("tiny", async_scheduling="yes")

"""Greedy generations of ``LLM`` equal Hugging Face transformers' ``generate`` token for token.

Tiny float32 models built by transformers (Llama with GQA and llama3 RoPE, Qwen2 with biases and
tied embeddings, Mixtral), saved to a temp dir and served at TP 1/2/4/8 with the chunk budget
forced small (16 tokens: prompts span several steps and share them with decodes), weaving on
with a threshold low enough that every mixed step is split, and a page pool too small for all
requests at once (preemption by recompute).  Eight prompts of different lengths, 16 new tokens
each.
"""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_hf_parity import LLAMA3_ROPE, VOCAB, _build, tiny_hf  # noqa: E402

from weave_jax.serve.llm import LLM  # noqa: E402
from weave_jax.serve.sampling_params import SamplingParams  # noqa: E402

NEW_TOKENS = 16
LENGTHS = (1, 3, 7, 12, 17, 23, 31, 40)
SIZES = dict(intermediate_size=128, max_position_embeddings=128)


def tiny_llama():
  # 8 KV heads: TP 8 divides them
  return tiny_hf("llama", **SIZES, num_attention_heads=16, num_key_value_heads=8, head_dim=8,
                 rope_parameters=LLAMA3_ROPE)


def tiny_qwen2():
  return tiny_hf("qwen2", **SIZES, num_attention_heads=4, num_key_value_heads=2,
                 tie_word_embeddings=True)


def tiny_mixtral():
  return tiny_hf("mixtral", **SIZES, num_attention_heads=8, num_key_value_heads=4,
                 num_local_experts=4, num_experts_per_tok=2)


FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mixtral": tiny_mixtral}


def save_family(name: str, directory: str):
  """Build the family's tiny model (fixed seed), save it; returns the torch model."""
  model = _build(FAMILIES[name])
  model.save_pretrained(directory)
  return model


def prompts(seed: int = 0, lengths=LENGTHS):
  rng = np.random.RandomState(seed)
  return [rng.randint(0, VOCAB, n).tolist() for n in lengths]


def hf_greedy(model, prompt, new_tokens=NEW_TOKENS):
  """transformers' greedy continuation of one prompt, EOS ignored."""
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                         do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         eos_token_id=None, pad_token_id=0)
  return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def families(tmp_path_factory):
  """family -> (directory, greedy references of ``prompts()``); built once per module."""
  out = {}
  for name in FAMILIES:
    directory = str(tmp_path_factory.mktemp(name))
    model = save_family(name, directory)
    out[name] = (directory, [hf_greedy(model, p) for p in prompts()])
  return out


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)

# (family, tp, backend, woven, pages): pages=None: enough for all; else a pool that forces
# preemption.  Woven cases weave every mixed step (threshold 2 tokens).
CASES = [
    ("llama", 1, "psum", False, 24),
    ("llama", 2, "rs_ag", True, 24),
    ("llama", 4, "psum", True, None),
    ("llama", 8, "rs_ag", True, 24),
    ("qwen2", 2, "rs_ag", True, 24),
    ("qwen2", 1, "psum", True, None),
    ("mixtral", 2, "rs_ag", True, 24),
    ("mixtral", 4, "psum", False, 24),
]


def make_llm(directory, tp, backend, woven, pages, **kw):
  opts = dict(tp=tp, backend=backend, weave=woven, weave_min_tokens=2 if woven else None,
              dtype="float32", max_model_len=64, page_size=4, num_pages=pages or 128,
              max_num_batched_tokens=16, max_num_seqs=8, compile_ahead=False)
  opts.update(kw)
  return LLM(directory, **opts)


@pytest.mark.parametrize("family,tp,backend,woven,pages", CASES,
                         ids=[f"{c[0]}-tp{c[1]}-{c[2]}-{'woven' if c[3] else 'unsplit'}"
                              f"{'-preempt' if c[4] else ''}" for c in CASES])
def test_greedy_matches_transformers(families, family, tp, backend, woven, pages):
  directory, refs = families[family]
  llm = make_llm(directory, tp, backend, woven, pages)
  outs = llm.generate(prompts(), GREEDY, progress=False)
  got = [o.token_ids for o in outs]
  for i, (g, r) in enumerate(zip(got, refs)):
    assert g == r, f"prompt {i} (length {LENGTHS[i]}): {g} != transformers {r}"
  assert all(o.finish_reason == "length" for o in outs)
  stats = llm.stats()
  assert stats.get("decode", {}).get("steps", 0) > 0
  mixed = "woven" if woven else "unsplit"
  assert stats[mixed]["steps"] > 0, stats
  if woven:
    assert "unsplit" not in stats, stats          # every mixed step was split
  if pages:
    assert stats["preemptions"] > 0
  assert llm.scheduler.blocks.num_free_pages == llm.runner.num_pages

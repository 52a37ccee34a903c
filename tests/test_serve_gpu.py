"""The serving path on a GPU, bf16: woven steps generate what unsplit steps generate.

Weaving changes the order of the bf16 arithmetic (two halves, each with its own GEMMs and
attention calls), so logits differ in the last bits, and a greedy choice between two nearly tied
tokens may flip, the first new token (the woven prefill step's) included. The tolerance, stated
once: the two runs' tokens agree up to the first position where they differ, and there the
log-probabilities of the two chosen tokens differ by less than ``TIE_LOGPROB`` (a near tie).
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from weave_jax import LLM, SamplingParams, preset

#: Largest log-probability gap between the two runs' chosen tokens where greedy may flip.
TIE_LOGPROB = 0.05

#: Small bf16 models of the three families with GPU-kernel shapes (head dim 64, GQA 4).
FAMILIES = {
    "llama": preset("tiny", dtype="bfloat16", num_heads=8, num_kv_heads=2, head_dim=64),
    "qwen2": preset("tiny", family="qwen2", dtype="bfloat16", num_heads=8, num_kv_heads=2,
                    head_dim=64, qkv_bias=True, rms_norm_eps=1e-6),
    "mixtral": preset("tiny", family="mixtral", dtype="bfloat16", num_heads=8, num_kv_heads=2,
                      head_dim=64, num_experts=4, experts_per_token=2),
}


def prompts(vocab: int, n: int = 8, seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(1, vocab, size=int(rng.integers(5, 41))).tolist() for _ in range(n)]


def generate(cfg, weave: bool, attention: str):
  """Greedy, 16 new tokens each, 64-token steps (woven at >= 32 tokens when ``weave``)."""
  llm = LLM(cfg, tp=1, backend="psum", weave=weave, weave_min_tokens=32, paged_attention=attention,
            max_model_len=128, num_pages=64, max_num_batched_tokens=64, max_num_seqs=8,
            compile_ahead=False)
  params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=True)
  outs = llm.generate(prompts(cfg.vocab_size), params)
  kinds = {kind for kind, *_ in llm.step_log}
  return outs, kinds


def check_agree(woven, unsplit) -> None:
  for i, (w, u) in enumerate(zip(woven, unsplit)):
    for j, (tw, tu) in enumerate(zip(w.token_ids, u.token_ids)):
      if tw != tu:
        gap = abs(w.logprobs[j] - u.logprobs[j])
        assert gap < TIE_LOGPROB, (f"prompt {i}, token {j}: woven {tw} / unsplit {tu}, "
                                   f"log-prob gap {gap:.3f} >= {TIE_LOGPROB}: not a near tie")
        break


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_woven_greedy_equals_unsplit_bf16(family):
  attention = "auto" if jax.default_backend() == "gpu" else "reference"
  woven, kinds = generate(FAMILIES[family], True, attention)
  assert "woven" in kinds, f"no step was woven ({kinds})"
  unsplit, kinds = generate(FAMILIES[family], False, attention)
  assert "woven" not in kinds
  check_agree(woven, unsplit)

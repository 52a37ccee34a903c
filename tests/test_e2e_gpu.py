"""GPU, end to end: the woven model (every backend that runs here) gives the baseline's logits
within bf16 tolerance, for each model family, on random token ids in several packed prompts."""
import numpy as np
import pytest

from conftest import gpu_count
from weave_jax import Engine, ModelConfig, RunConfig, init_random, make_mesh
from weave_jax.comm import fused_available

pytestmark = pytest.mark.gpu

FAMILIES = {
    "llama": ModelConfig("llama", 4096, 1024, 2816, 2, 16, 4, 64, 1e-5, 500000.0),
    "qwen2": ModelConfig("qwen2", 4096, 1024, 2816, 2, 16, 4, 64, 1e-6, 1e6, qkv_bias=True,
                         tie_embeddings=True),
    "mixtral": ModelConfig("mixtral", 4096, 1024, 1408, 2, 16, 4, 64, 1e-5, 1e6,
                           num_experts=4, experts_per_token=2),
}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def mesh():
  if gpu_count() < 2:
    pytest.skip("needs 2 GPUs")
  return make_mesh(2)


def _variants():
  out = [("rs_ag", True), ("psum", True)]
  if gpu_count() >= 2 and fused_available()[0]:
    out += [("fused_p2p", False), ("fused_p2p", True)]
  return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_woven_equals_baseline(mesh, family):
  cfg = FAMILIES[family]
  model = init_random(cfg, mesh, seed=1)
  rng = np.random.default_rng(2)
  lengths = [700, 1300, 1, 2047]                         # 4 packed prompts, one straddles the split
  tokens = rng.integers(0, cfg.vocab_size, sum(lengths))
  segments = np.repeat(np.arange(len(lengths)), lengths)
  ref = np.asarray(Engine(model, mesh, RunConfig(backend="psum"))(tokens, segment_ids=segments))
  assert np.isfinite(ref).all()
  for backend, weave in _variants():
    eng = Engine(model, mesh, RunConfig(backend=backend, weave=weave, weave_min_tokens=1024))
    out = np.asarray(eng(tokens, segment_ids=segments))
    err = rel_err(out, ref)
    assert np.isfinite(out).all() and err < 2e-2, (backend, weave, err)
    # Single-sequence (cuDNN causal) path as well.
    ref1 = np.asarray(Engine(model, mesh, RunConfig(backend="psum"))(tokens[:3000]))
    out1 = np.asarray(eng(tokens[:3000]))
    assert rel_err(out1, ref1) < 2e-2, (backend, weave, "single sequence", rel_err(out1, ref1))

"""Logits of checkpoints loaded by ``weights.load_hf_checkpoint`` match Hugging Face transformers.

For each family a tiny random model is built by transformers (float32, fixed seed), written with
``save_pretrained`` and loaded sharded at TP 1/2 (4 for Llama).  Norm weights and biases are
randomised too, so a swapped or dropped tensor cannot hide behind an identity initialisation.
TP sizes above the KV-head count (Llama with 2 KV heads at TP 4 and 8, Qwen2 with its biases at
TP 4) run with the KV heads replicated (``ModelConfig.for_tp``).
"""
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from conftest import rel_err  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from weave_jax import Engine, RunConfig, make_mesh  # noqa: E402
from weave_jax.weights import load_hf_checkpoint  # noqa: E402

VOCAB = 250          # not a multiple of 8: exercises the padded vocab rows
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              initializer_range=0.1, attn_implementation="eager")
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=16)
HF_CLASSES = {"llama": ("LlamaForCausalLM", "LlamaConfig"),
              "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
              "mixtral": ("MixtralForCausalLM", "MixtralConfig")}


def tiny_hf(family: str, **config):
  """A randomly initialised transformers model of ``family`` ("llama", "qwen2", "mixtral"):
  ``COMMON`` sizes, overridden and extended by ``config``."""
  model_class, config_class = HF_CLASSES[family]
  hf_config = getattr(transformers, config_class)(**{**COMMON, **config})
  return getattr(transformers, model_class)(hf_config)


def _llama():
  return tiny_hf("llama", num_attention_heads=8, num_key_value_heads=4,
                 rope_parameters=LLAMA3_ROPE)


def _llama_kv2():
  return tiny_hf("llama", num_attention_heads=8, num_key_value_heads=2)


def _qwen2():
  return tiny_hf("qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def _mixtral():
  return tiny_hf("mixtral", num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                 num_experts_per_tok=2)


# name -> (builder, how it is written, TP sizes)
CASES = {
    "llama": (_llama, "single", (1, 2, 4)),
    "llama_sharded": (_llama, "sharded", (2,)),
    "llama_kv2": (_llama_kv2, "single", (4, 8)),                  # KV heads replicated 2x, 4x
    "qwen2_tied_bias": (_qwen2, "single", (1, 2, 4)),
    # per-expert w1/w2/w3: what save_pretrained writes
    "mixtral": (_mixtral, "single", (1, 2)),
    "mixtral_fused": (_mixtral, "fused", (2,)),       # v5 in-memory names: mlp.experts.gate_up_proj
}
PARAMS = [(case, tp) for case, (_, _, tps) in CASES.items() for tp in tps]


def _build(builder):
  torch.manual_seed(0)
  model = builder().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.2 * torch.randn_like(p))
  return model


def _write(model, directory, how):
  if how == "fused":
    # The tensor names transformers 5 holds in memory (fused experts), written as-is.
    model.config.save_pretrained(directory)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    safetensors_torch.save_file(state, os.path.join(directory, "model.safetensors"))
  else:
    model.save_pretrained(directory, max_shard_size="40KB" if how == "sharded" else "5GB")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """case -> (directory, torch model); built once per module."""
  out = {}
  for case, (builder, how, _) in CASES.items():
    model = _build(builder)
    directory = str(tmp_path_factory.mktemp(case))
    _write(model, directory, how)
    out[case] = (directory, model)
  return out


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))[None]).logits[0].float().numpy()


TOKENS = np.random.RandomState(0).randint(0, VOCAB, 29)


def test_sharded_checkpoint_is_sharded(checkpoints):
  directory, _ = checkpoints["llama_sharded"]
  with open(os.path.join(directory, "model.safetensors.index.json")) as f:
    files = set(json.load(f)["weight_map"].values())
  assert len(files) > 1


@pytest.mark.parametrize("case,tp", PARAMS)
def test_logits_match_transformers(checkpoints, case, tp):
  directory, hf = checkpoints[case]
  mesh = make_mesh(tp)
  model = load_hf_checkpoint(directory, mesh, dtype="float32")
  ref = _hf_logits(hf, TOKENS)
  assert model.cfg.num_kv_heads == max(tp, hf.config.num_key_value_heads)
  out = Engine(model, mesh, RunConfig())(TOKENS)
  assert out.shape == ref.shape
  assert rel_err(out, ref) < 1e-4
  if tp > 1:                        # the woven reduce-scatter path on the same weights
    woven = Engine(model, mesh, RunConfig(backend="rs_ag", weave=True, weave_min_tokens=2))(TOKENS)
    assert rel_err(woven, ref) < 1e-4


@pytest.mark.parametrize("case,tp", [("llama", 2), ("qwen2_tied_bias", 2), ("mixtral", 2)])
def test_packed_matches_separate_prompts(checkpoints, case, tp):
  directory, hf = checkpoints[case]
  mesh = make_mesh(tp)
  model = load_hf_checkpoint(directory, mesh, dtype="float32")
  lengths = (13, 20)
  prompts = np.split(np.random.RandomState(1).randint(0, VOCAB, sum(lengths)), [lengths[0]])
  segments = np.repeat(np.arange(len(lengths)), lengths)
  ref = np.concatenate([_hf_logits(hf, p) for p in prompts])
  out = Engine(model, mesh, RunConfig())(np.concatenate(prompts), segment_ids=segments)
  assert rel_err(out, ref) < 1e-4


def test_loaded_shardings(checkpoints):
  directory, _ = checkpoints["mixtral"]
  mesh = make_mesh(2)
  model = load_hf_checkpoint(directory, mesh, dtype="float32")
  layer = model.layers[0]
  assert layer.attn.qkv[...].sharding.spec == P(None, "tp", None, None)
  assert layer.mlp.gate_up[...].sharding.spec == P("tp", None, None, None)
  shard = layer.attn.qkv[...].addressable_shards[0].data
  assert shard.shape == (64, 1, 4, 16)          # (H, KV/tp, G+2, D)
  table = np.asarray(model.embed.table[...])
  assert table.shape[0] % 8 == 0 and not table[VOCAB:].any()


@pytest.mark.parametrize("memmap", [False, True], ids=["safetensors_np", "bf16_memmap"])
def test_bf16_checkpoint(tmp_path, monkeypatch, memmap):
  """A bfloat16 checkpoint (as published) loads, through safetensors or the memory-map
  fallback for old safetensors, and matches transformers run on the same rounded weights."""
  from weave_jax import weights
  monkeypatch.setattr(weights._Safetensors, "force_bf16_map", memmap)
  _build(_llama).to(torch.bfloat16).save_pretrained(str(tmp_path))
  hf = _build(_llama)              # same seed; float32 RoPE buffers, bf16-rounded weights
  with torch.no_grad():
    for p in hf.parameters():
      p.copy_(p.bfloat16().float())
  ref = _hf_logits(hf, TOKENS)
  mesh = make_mesh(2)
  model = load_hf_checkpoint(str(tmp_path), mesh, dtype="float32")
  assert rel_err(Engine(model, mesh, RunConfig())(TOKENS), ref) < 1e-4
  model16 = load_hf_checkpoint(str(tmp_path), mesh, dtype="bfloat16")
  assert model16.layers[0].mlp.down[...].dtype == jax.numpy.bfloat16
  np.testing.assert_array_equal(np.asarray(model16.layers[0].mlp.down[...], np.float32),
                                np.asarray(model.layers[0].mlp.down[...]))

"""Bad configs, checkpoints and batches fail early, with an error that names the problem."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from weave_jax import Engine, RunConfig, abstract_model, from_hf_config, init_random, make_mesh
from weave_jax import preset
from weave_jax.weights import load_hf_checkpoint

# --- config.json -----------------------------------------------------------------------------

HF_LLAMA = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                rms_norm_eps=1e-5, tie_word_embeddings=False)


def test_unknown_model_type():
  with pytest.raises(ValueError, match="unknown or missing model_type 'gpt2'"):
    from_hf_config({**HF_LLAMA, "model_type": "gpt2"})


def test_missing_model_type():
  cfg = dict(HF_LLAMA)
  del cfg["model_type"]
  with pytest.raises(ValueError, match="model_type None"):
    from_hf_config(cfg)


def test_missing_config_key():
  cfg = dict(HF_LLAMA)
  del cfg["intermediate_size"]
  with pytest.raises(ValueError, match=r"missing required key\(s\) \['intermediate_size'\]"):
    from_hf_config(cfg)


def test_unsupported_rope_type():
  cfg = {**HF_LLAMA, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}
  with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported"):
    from_hf_config(cfg)


def test_llama3_rope_missing_key():
  cfg = {**HF_LLAMA, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}
  with pytest.raises(ValueError, match="llama3 rope scaling is missing key"):
    from_hf_config(cfg)


# --- safetensors checkpoints -------------------------------------------------------------------

def _llama_tensors(cfg=HF_LLAMA):
  """A consistent tiny Llama checkpoint as numpy arrays (HF names and layouts)."""
  rng = np.random.RandomState(0)
  v, h, f = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
  n, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  d = h // n
  t = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "model.norm.weight": (h,)}
  p = "model.layers.0"
  t.update({f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (n * d, h), f"{p}.self_attn.k_proj.weight": (kv * d, h),
            f"{p}.self_attn.v_proj.weight": (kv * d, h), f"{p}.self_attn.o_proj.weight": (h, n * d),
            f"{p}.mlp.gate_proj.weight": (f, h), f"{p}.mlp.up_proj.weight": (f, h),
            f"{p}.mlp.down_proj.weight": (h, f)})
  return {k: rng.randn(*s).astype(np.float32) for k, s in t.items()}


def _write(directory, tensors, cfg=HF_LLAMA):
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg, f)
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  return str(directory)


def test_good_checkpoint_loads(tmp_path):
  model = load_hf_checkpoint(_write(tmp_path, _llama_tensors()), make_mesh(2), dtype="float32")
  assert model.layers[0].attn.qkv[...].shape == (32, 2, 4, 8)


def test_missing_tensor(tmp_path):
  tensors = _llama_tensors()
  del tensors["model.layers.0.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match="'model.layers.0.mlp.up_proj.weight' is missing"):
    load_hf_checkpoint(_write(tmp_path, tensors), make_mesh(2), dtype="float32")


def test_missing_lm_head_when_untied(tmp_path):
  tensors = _llama_tensors()
  del tensors["lm_head.weight"]
  with pytest.raises(ValueError, match="'lm_head.weight' is missing"):
    load_hf_checkpoint(_write(tmp_path, tensors), make_mesh(1), dtype="float32")


def test_shape_mismatch(tmp_path):
  tensors = _llama_tensors()
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
  with pytest.raises(ValueError, match=r"k_proj.weight' in model.safetensors has shape \(8, 32\), "
                                       r"expected \(16, 32\)"):
    load_hf_checkpoint(_write(tmp_path, tensors), make_mesh(2), dtype="float32")


def test_uncastable_dtype(tmp_path):
  tensors = _llama_tensors()
  tensors["model.norm.weight"] = np.ones(32, np.int32)
  with pytest.raises(ValueError, match="'model.norm.weight' .* has dtype I32"):
    load_hf_checkpoint(_write(tmp_path, tensors), make_mesh(1), dtype="float32")


def test_no_safetensors(tmp_path):
  with open(tmp_path / "config.json", "w") as f:
    json.dump(HF_LLAMA, f)
  with pytest.raises(ValueError, match="neither model.safetensors nor"):
    load_hf_checkpoint(str(tmp_path), make_mesh(1))


def test_index_names_missing_file(tmp_path):
  with open(tmp_path / "config.json", "w") as f:
    json.dump(HF_LLAMA, f)
  with open(tmp_path / "model.safetensors.index.json", "w") as f:
    json.dump({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}, f)
  with pytest.raises(ValueError, match="names model-00001-of-00002.safetensors, which is missing"):
    load_hf_checkpoint(str(tmp_path), make_mesh(1))


def test_bad_config_in_checkpoint_dir(tmp_path):
  cfg = dict(HF_LLAMA)
  del cfg["vocab_size"]
  with pytest.raises(ValueError, match=r"missing required key\(s\) \['vocab_size'\]"):
    load_hf_checkpoint(_write(tmp_path, _llama_tensors(), cfg), make_mesh(1))


# --- TP sizes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,tp,what", [
    (dict(num_heads=12, num_kv_heads=4), 8, "num_heads=12"),
    (dict(num_heads=16, num_kv_heads=2), 4, "num_kv_heads=2"),
    (dict(intermediate_size=100), 8, r"intermediate_size \(FFN\)=100"),
    (dict(family="mixtral", num_experts=4), 8, "num_experts=4"),
])
def test_tp_does_not_divide(overrides, tp, what):
  cfg = preset("tiny", **overrides)
  with pytest.raises(ValueError, match=f"TP size {tp} does not divide {what}"):
    Engine(abstract_model(cfg), make_mesh(tp))


# --- batches and parameters --------------------------------------------------------------

@pytest.fixture(scope="module")
def engine():
  mesh = make_mesh(2)
  return Engine(init_random(preset("tiny", num_layers=1), mesh), mesh)


def test_empty_batch(engine):
  with pytest.raises(ValueError, match="empty batch"):
    engine(np.zeros(0, np.int32))


def test_float_tokens(engine):
  with pytest.raises(TypeError, match="tokens must be integers, got float32"):
    engine(np.zeros(4, np.float32))


def test_tokens_not_1d(engine):
  with pytest.raises(ValueError, match=r"tokens must be 1-D \(T,\), got shape \(2, 3\)"):
    engine(np.zeros((2, 3), np.int32))


@pytest.mark.parametrize("bad", [-1, 512, 10_000])
def test_token_out_of_range(engine, bad):
  with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
    engine(np.array([1, 2, bad, 3]))


def test_positions_shape_mismatch(engine):
  with pytest.raises(ValueError, match=r"positions shape \(3,\) != tokens shape \(4,\)"):
    engine(np.arange(4), positions=np.arange(3))


def test_segments_shape_mismatch(engine):
  with pytest.raises(ValueError, match=r"segment_ids shape \(5,\) != tokens shape \(4,\)"):
    engine(np.arange(4), segment_ids=np.zeros(5, np.int32))


def test_float_positions(engine):
  with pytest.raises(TypeError, match="positions must be integers"):
    engine(np.arange(4), positions=np.arange(4, dtype=np.float32))


def test_params_of_wrong_dtype():
  mesh = make_mesh(2)
  model = init_random(preset("tiny", num_layers=1), mesh)          # float32 config
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)
  with pytest.raises(TypeError, match="has dtype bfloat16, config says float32"):
    Engine(nnx.merge(graphdef, state), mesh)


def test_bad_split(engine):
  mesh = make_mesh(2)
  run = RunConfig(weave=True, weave_min_tokens=2, split=3)
  eng = Engine(nnx.merge(engine.graphdef, engine.state), mesh, run)
  with pytest.raises(ValueError, match="RunConfig.split=3 must be a multiple of TP=2"):
    eng(np.arange(16))


def test_unknown_backend():
  with pytest.raises(ValueError, match="RunConfig: backend must be one of .* got 'nccl'"):
    RunConfig(backend="nccl")

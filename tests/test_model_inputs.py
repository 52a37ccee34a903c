"""The model entry points (from_hf_config, preset, make_mesh, init_random, load_hf_checkpoint,
save_checkpoint, restore_checkpoint) refuse bad input with a ValueError/TypeError naming the
argument, file or tensor, before any parameter is created or read.

The engine's own checks (batches, TP of an already-built model): tests/test_bad_input.py.
"""
import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from safetensors.numpy import save_file

from weave_jax import abstract_model, from_hf_config, init_random, make_mesh, preset
from weave_jax.weights import load_hf_checkpoint, restore_checkpoint, save_checkpoint

HF = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
TINY = preset("tiny", num_layers=1)


def _tensors(cfg=HF):
  """A consistent checkpoint of ``cfg`` (HF names and shapes), float32."""
  v, h, f = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
  n, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  d, p = h // n, "model.layers.0"
  shapes = {"model.embed_tokens.weight": (v, h), "lm_head.weight": (v, h),
            "model.norm.weight": (h,), f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (n * d, h), f"{p}.self_attn.k_proj.weight": (kv * d, h),
            f"{p}.self_attn.v_proj.weight": (kv * d, h), f"{p}.self_attn.o_proj.weight": (h, n * d),
            f"{p}.mlp.gate_proj.weight": (f, h), f"{p}.mlp.up_proj.weight": (f, h),
            f"{p}.mlp.down_proj.weight": (h, f)}
  return {k: np.ones(s, np.float32) for k, s in shapes.items()}


def _write_config(directory, cfg=HF):
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg, f)
  return str(directory)


def _write_sharded(directory, tensors, index_override=None, cfg=HF):
  """Two safetensors files (attention and the rest) and their index."""
  files = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
  weight_map = {}
  for name, value in tensors.items():
    file = sorted(files)["self_attn" not in name]
    files[file][name] = value
    weight_map[name] = file
  for file, held in files.items():
    save_file(held, os.path.join(directory, file))
  weight_map.update(index_override or {})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": weight_map}, f)
  return _write_config(directory, cfg)


# --- from_hf_config ---------------------------------------------------------------------------

@pytest.mark.parametrize("change,error,says", [
    (dict(hidden_size="32"), ValueError, "hidden_size must be an integer, got '32'"),
    (dict(intermediate_size=48.5), ValueError, "intermediate_size must be an integer, got 48.5"),
    (dict(num_hidden_layers=True), ValueError, "num_hidden_layers must be an integer, got True"),
    (dict(num_attention_heads=0), ValueError, "num_attention_heads must be positive, got 0"),
    (dict(vocab_size=-3), ValueError, "vocab_size must be positive, got -3"),
    (dict(num_key_value_heads=3), ValueError, "num_heads=4 is not a multiple of num_kv_heads=3"),
    (dict(rms_norm_eps="tiny"), ValueError, "rms_norm_eps must be a number, got 'tiny'"),
    (dict(rope_parameters=[1, 2]), ValueError, r"rope_parameters must be an object, got \[1, 2\]"),
    (dict(head_dim=7), ValueError, "head_dim=7 must be even"),
])
def test_from_hf_config_bad_values(change, error, says):
  with pytest.raises(error, match=says):
    from_hf_config({**HF, **change})


def test_from_hf_config_bad_sources(tmp_path):
  with pytest.raises(TypeError, match="source must be a dict, a path or a directory, got int"):
    from_hf_config(42)
  with pytest.raises(ValueError, match="no config file at .*nowhere"):
    from_hf_config(tmp_path / "nowhere")
  with pytest.raises(ValueError, match=r"no config file at .*config\.json"):
    from_hf_config(tmp_path)                                  # a directory without config.json
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(TypeError, match=r"config\.json holds a JSON list, expected an object"):
    from_hf_config(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
    from_hf_config(tmp_path / "config.json")
  with pytest.raises(ValueError, match=r"dtype must be one of .*got 'int8'"):
    from_hf_config(HF, dtype="int8")


def test_model_config_field_types():
  with pytest.raises(TypeError, match="num_heads must be an int, got '16'"):
    TINY.replace(num_heads="16")
  with pytest.raises(ValueError, match="rms_norm_eps must be a positive number, got 0"):
    TINY.replace(rms_norm_eps=0)
  with pytest.raises(ValueError, match="kv_replicas must be positive, got 0"):
    TINY.replace(kv_replicas=0)


# --- preset, make_mesh ------------------------------------------------------------------------

def test_preset_bad_input():
  with pytest.raises(TypeError, match="preset: name must be a str, got int"):
    preset(3)
  with pytest.raises(ValueError, match="unknown preset 'llama-9000'"):
    preset("llama-9000")
  with pytest.raises(TypeError, match=r"unknown field\(s\) \['layers'\]"):
    preset("tiny", layers=2)
  with pytest.raises(TypeError, match="hidden_size must be an int, got 64.0"):
    preset("tiny", hidden_size=64.0)


@pytest.mark.parametrize("tp", [0, -2, 2.0, True, "2"])
def test_make_mesh_bad_tp(tp):
  with pytest.raises(ValueError, match=f"make_mesh: tp must be a positive int or None, got {tp!r}"):
    make_mesh(tp)


def test_make_mesh_bad_devices():
  with pytest.raises(ValueError, match="TP size 9 exceeds the 8 available devices"):
    make_mesh(9)
  with pytest.raises(ValueError, match="make_mesh: devices is empty"):
    make_mesh(devices=[])
  with pytest.raises(TypeError, match="make_mesh: devices must be jax devices, got 'cpu:0'"):
    make_mesh(devices=["cpu:0"])
  with pytest.raises(TypeError, match="devices must be a sequence of jax devices, got str"):
    make_mesh(devices="cpu")
  assert make_mesh(2, devices=jax.devices()[2:]).devices.tolist() == jax.devices()[2:4]


# --- init_random ------------------------------------------------------------------------------

def test_init_random_bad_input():
  mesh = make_mesh(2)
  with pytest.raises(TypeError, match="init_random: cfg must be a ModelConfig, got dict"):
    init_random(HF, mesh)
  with pytest.raises(TypeError, match="init_random: seed must be an int, got '0'"):
    init_random(TINY, mesh, seed="0")
  with pytest.raises(TypeError, match="init_random: mesh must be a jax.sharding.Mesh"):
    init_random(TINY, jax.devices())
  with pytest.raises(ValueError, match=r"init_random: mesh has axes \('x',\), expected one "
                                       "named 'tp'"):
    init_random(TINY, Mesh(np.array(jax.devices()[:2]), ("x",)))
  with pytest.raises(ValueError, match="init_random: .*TP size 8 does not divide "
                                       r"intermediate_size \(FFN\)=100"):
    init_random(TINY.replace(intermediate_size=100), make_mesh(8))


# --- load_hf_checkpoint -----------------------------------------------------------------------

def test_load_bad_arguments(tmp_path):
  directory = _write_config(tmp_path)
  save_file(_tensors(), os.path.join(directory, "model.safetensors"))
  mesh = make_mesh(2)
  with pytest.raises(TypeError, match="load_hf_checkpoint: path must be a str or os.PathLike, "
                                      "got int"):
    load_hf_checkpoint(3, mesh)
  with pytest.raises(ValueError, match="load_hf_checkpoint: path .*missing is not a directory"):
    load_hf_checkpoint(tmp_path / "missing", mesh)
  with pytest.raises(ValueError, match=r"load_hf_checkpoint: dtype must be one of .*'float64'"):
    load_hf_checkpoint(directory, mesh, dtype="float64")
  with pytest.raises(TypeError, match="load_hf_checkpoint: mesh must be a jax.sharding.Mesh"):
    load_hf_checkpoint(directory, "tp=2")


@pytest.mark.parametrize("heads,kv,tp,says", [
    (12, 6, 4, "TP size 4 does not divide num_kv_heads=6"),
    (12, 3, 4, "TP size 4 is larger than num_kv_heads=3 but not a multiple of it"),
    (4, 2, 8, "TP size 8 does not divide num_heads=4"),
])
def test_load_tp_that_cannot_shard(tmp_path, heads, kv, tp, says):
  cfg = {**HF, "num_attention_heads": heads, "num_key_value_heads": kv, "hidden_size": 8 * heads}
  directory = _write_config(tmp_path, cfg)
  save_file(_tensors(cfg), os.path.join(directory, "model.safetensors"))
  with pytest.raises(ValueError, match="load_hf_checkpoint: .* cannot run on this mesh: " + says):
    load_hf_checkpoint(directory, make_mesh(tp))


def test_index_names_tensor_its_file_lacks(tmp_path):
  """The index puts k_proj in the second file; only the first holds it."""
  name = "model.layers.0.self_attn.k_proj.weight"
  directory = _write_sharded(tmp_path, _tensors(),
                             {name: "model-00002-of-00002.safetensors"})
  with pytest.raises(ValueError, match=f"puts tensor '{name}' in model-00002-of-00002.safetensors, "
                                       "which does not hold it"):
    load_hf_checkpoint(directory, make_mesh(2))


def test_sharded_checkpoint_loads(tmp_path):
  """The control for the index tests: the same writer, nothing changed, loads."""
  model = load_hf_checkpoint(_write_sharded(tmp_path, _tensors()), make_mesh(2), "float32")
  np.testing.assert_array_equal(np.asarray(model.final_norm.weight[...]), np.ones(32))


@pytest.mark.parametrize("index,says", [
    ("[]", "has no 'weight_map'"),
    ("{oops", "is not valid JSON"),
    ('{"weight_map": {"model.norm.weight": 3}}', "maps tensor 'model.norm.weight' to 3, not a "
                                                 "file name"),
])
def test_bad_index_file(tmp_path, index, says):
  directory = _write_sharded(tmp_path, _tensors())
  (tmp_path / "model.safetensors.index.json").write_text(index)
  with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json " + says):
    load_hf_checkpoint(directory, make_mesh(2))


def test_corrupt_safetensors_file(tmp_path):
  directory = _write_sharded(tmp_path, _tensors())
  (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"garbage!")
  with pytest.raises(ValueError, match="model-00002-of-00002.safetensors is not a readable "
                                       "safetensors file"):
    load_hf_checkpoint(directory, make_mesh(2))


@pytest.mark.parametrize("name,value,says", [
    ("model.layers.0.self_attn.q_proj.weight", np.ones((32, 32), np.int64), "has dtype I64"),
    ("model.layers.0.mlp.down_proj.weight", np.ones((32, 48), bool), "has dtype BOOL"),
    ("model.layers.0.self_attn.o_proj.weight", np.ones((32, 16), np.float32),
     r"has shape \(32, 16\), expected \(32, 32\)"),
])
def test_bad_tensor_in_sharded_checkpoint(tmp_path, name, value, says):
  tensors = {**_tensors(), name: value}
  directory = _write_sharded(tmp_path, tensors)
  with pytest.raises(ValueError, match=f"tensor '{name}' in model-0000[12]-of-00002.safetensors "
                                       + says):
    load_hf_checkpoint(directory, make_mesh(2))


# --- save_checkpoint / restore_checkpoint -------------------------------------------------------

def test_save_bad_input(tmp_path):
  model = abstract_model(TINY)           # refused before any array is touched
  with pytest.raises(TypeError, match="save_checkpoint: model must be a weave_jax Transformer, "
                                      "got dict"):
    save_checkpoint({}, tmp_path / "a")
  with pytest.raises(TypeError, match="save_checkpoint: path must be a str or os.PathLike, "
                                      "got int"):
    save_checkpoint(model, 7)
  with pytest.raises(ValueError, match="save_checkpoint: .* already exists"):
    save_checkpoint(model, tmp_path)
  with pytest.raises(ValueError, match="save_checkpoint: the parent directory of .*b does not "
                                       "exist"):
    save_checkpoint(model, tmp_path / "no" / "b")
  assert os.listdir(tmp_path) == []


def test_restore_bad_input(tmp_path):
  mesh = make_mesh(2)
  with pytest.raises(TypeError, match="restore_checkpoint: path must be a str or os.PathLike, "
                                      "got list"):
    restore_checkpoint([str(tmp_path)], TINY, mesh)
  with pytest.raises(TypeError, match="restore_checkpoint: cfg must be a ModelConfig, got dict"):
    restore_checkpoint(tmp_path, HF, mesh)
  with pytest.raises(TypeError, match="restore_checkpoint: mesh must be a jax.sharding.Mesh"):
    restore_checkpoint(tmp_path, TINY, None)
  with pytest.raises(ValueError, match="restore_checkpoint: .* is not an orbax checkpoint"):
    restore_checkpoint(tmp_path, TINY, mesh)                   # an empty directory
  (tmp_path / "file").write_text("x")
  with pytest.raises(FileNotFoundError, match="no checkpoint directory at .*file"):
    restore_checkpoint(tmp_path / "file", TINY, mesh)

"""KV heads replicated when TP exceeds them (``ModelConfig.for_tp``): the relayout is exact, every
entry point builds it, and each device still reads only its own KV head of a checkpoint.

Logits against Hugging Face at such TP sizes: tests/test_hf_parity.py.
"""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from weave_jax import init_random, make_mesh, preset
from weave_jax.sharding import relayout_o, relayout_qkv
from weave_jax.weights import _Safetensors, load_hf_checkpoint, restore_checkpoint, save_checkpoint

KV2 = preset("tiny", num_layers=1, num_kv_heads=2)        # 16 query heads, 2 KV heads


def _attention_reference(qkv, o, x):
  """Per query head n: the scores q_n . k_kv(n) (N, T, T), and the o-projection of v_kv(n)
  (T, H), what replication must preserve.  qkv (H, KV, G+2, D), o (KV, G, D, H)."""
  kv, g = qkv.shape[1], qkv.shape[2] - 2
  y = np.einsum("th,hkgd->tkgd", x, qkv)
  q = y[:, :, :g].reshape(len(x), kv * g, -1)                    # (T, N, D)
  k = np.repeat(y[:, :, g], g, axis=1)                           # (T, N, D): the head's k
  v = np.repeat(y[:, :, g + 1], g, axis=1)
  scores = np.einsum("tnd,snd->nts", q, k)
  out = np.einsum("tnd,ndh->th", v, o.reshape(kv * g, o.shape[2], -1))
  return scores, out


@pytest.mark.parametrize("replicas", [2, 4, 8])
def test_relayout_keeps_every_query_head_with_its_kv_head(replicas):
  rng = np.random.RandomState(0)
  qkv, o, x = (rng.randn(*s).astype(np.float32) for s in ((6, 2, 10, 4), (2, 8, 4, 6), (5, 6)))
  rep_qkv, rep_o = relayout_qkv(qkv, 1, replicas), relayout_o(o, 1, replicas)
  assert rep_qkv.shape == (6, 2 * replicas, 8 // replicas + 2, 4)
  assert rep_o.shape == (2 * replicas, 8 // replicas, 4, 6)
  for a, b in zip(_attention_reference(qkv, o, x),
                  _attention_reference(np.asarray(rep_qkv), np.asarray(rep_o), x)):
    np.testing.assert_allclose(b, a, rtol=1e-6)
  # Back to fewer replicas (a checkpoint restored at a smaller TP) and to none.
  np.testing.assert_array_equal(relayout_qkv(rep_qkv, replicas, 2), relayout_qkv(qkv, 1, 2))
  np.testing.assert_array_equal(relayout_qkv(rep_qkv, replicas, 1), qkv)
  np.testing.assert_array_equal(relayout_o(rep_o, replicas, 1), o)


@pytest.mark.parametrize("overrides,tp,says", [
    (dict(num_heads=12, num_kv_heads=3), 4, "TP size 4 is larger than num_kv_heads=3 but not a "
                                            "multiple of it"),
    (dict(num_heads=12, num_kv_heads=6), 4, "TP size 4 does not divide num_kv_heads=6"),
    (dict(num_heads=4, num_kv_heads=2), 8, "TP size 8 does not divide num_heads=4"),
])
def test_for_tp_refuses(overrides, tp, says):
  cfg = preset("tiny", **overrides)
  with pytest.raises(ValueError, match=says):
    cfg.for_tp(tp)
  with pytest.raises(ValueError, match="init_random: .*" + says):
    init_random(cfg, make_mesh(tp))


def test_for_tp_layouts():
  assert (KV2.for_tp(2).num_kv_heads, KV2.for_tp(2).kv_replicas) == (2, 1)
  rep = KV2.for_tp(8)
  assert (rep.num_kv_heads, rep.kv_replicas, rep.q_per_kv, rep.checkpoint_kv_heads) == (8, 4, 2, 2)
  assert rep.for_tp(4) == KV2.for_tp(4)                # from the checkpoint's heads, not rep's
  assert rep.params_per_layer() == KV2.params_per_layer()


def _unreplicated_state(model):
  """{path: array} of the model's parameters, attention weights relaid to one copy per KV head."""
  out, replicas = {}, model.cfg.kv_replicas
  for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(model)):
    key = jax.tree_util.keystr(path)
    if "['attn']" in key:
      x = (relayout_o if "['o']" in key else relayout_qkv)(x, replicas, 1)
    out[key] = np.asarray(x)
  return out


@pytest.fixture(scope="module")
def random_models():
  """TP -> init_random(KV2) on that many devices; one seed."""
  return {tp: init_random(KV2, make_mesh(tp), seed=5) for tp in (2, 8)}


def _assert_same(got: dict, want: dict):
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_init_random_is_one_model_at_every_tp(random_models):
  small, big = random_models[2], random_models[8]
  assert big.cfg == KV2.for_tp(8) and small.cfg == KV2.for_tp(2)
  qkv = big.layers[0].attn.qkv[...]
  assert qkv.shape == (256, 8, 4, 16)
  assert qkv.addressable_shards[0].data.shape == (256, 1, 4, 16)   # one KV head per rank
  _assert_same(_unreplicated_state(big), _unreplicated_state(small))


def test_init_random_repeats_per_seed_and_draws_every_layer_apart(random_models):
  small = random_models[2]
  _assert_same(_unreplicated_state(init_random(KV2, make_mesh(2), seed=5)),
               _unreplicated_state(small))
  two = init_random(preset("tiny", num_layers=2), make_mesh(2), seed=5)
  first, second = (jax.tree.leaves(nnx.state(layer)) for layer in two.layers)
  assert len(first) == len(second) > 0
  for a, b in zip(first, second):
    assert not np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("save_tp,restore_tp", [(8, 2), (2, 4)])
def test_checkpoint_across_replica_counts(tmp_path, random_models, save_tp, restore_tp):
  save_checkpoint(random_models[save_tp], tmp_path / "ckpt")
  restored = restore_checkpoint(tmp_path / "ckpt", KV2, make_mesh(restore_tp))
  assert restored.cfg == KV2.for_tp(restore_tp)
  qkv = restored.layers[0].attn.qkv[...]
  assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "tp", None, None)
  assert qkv.shape[1] == restored.cfg.num_kv_heads
  _assert_same(_unreplicated_state(restored), _unreplicated_state(random_models[2]))


def _write_qwen2(directory, heads=8, kv=2, h=32, f=48, v=64):
  """A one-layer Qwen2 checkpoint (biases included) of random float32 tensors; returns them."""
  d = h // heads
  cfg = dict(model_type="qwen2", vocab_size=v, hidden_size=h, intermediate_size=f,
             num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv,
             tie_word_embeddings=True)
  rng = np.random.RandomState(0)
  p = "model.layers.0"
  shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
            f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (heads * d, h),
            f"{p}.self_attn.q_proj.bias": (heads * d,),
            f"{p}.self_attn.k_proj.weight": (kv * d, h), f"{p}.self_attn.k_proj.bias": (kv * d,),
            f"{p}.self_attn.v_proj.weight": (kv * d, h), f"{p}.self_attn.v_proj.bias": (kv * d,),
            f"{p}.self_attn.o_proj.weight": (h, heads * d), f"{p}.mlp.gate_proj.weight": (f, h),
            f"{p}.mlp.up_proj.weight": (f, h), f"{p}.mlp.down_proj.weight": (h, f)}
  tensors = {k: rng.randn(*s).astype(np.float32) for k, s in shapes.items()}
  with open(os.path.join(directory, "config.json"), "w") as fh:
    json.dump(cfg, fh)
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  return tensors


def test_each_device_reads_only_its_kv_head(tmp_path, monkeypatch):
  """At TP 8 over 2 KV heads, a device reads D rows of k_proj (its head) and of q_proj (its one
  query head), and the loaded qkv / bias hold each k/v head 4 times."""
  tensors = _write_qwen2(tmp_path)
  reads = []
  original = _Safetensors.read
  monkeypatch.setattr(_Safetensors, "read",
                      lambda self, name, *spans: reads.append((name, spans)) or
                      original(self, name, *spans))
  model = load_hf_checkpoint(tmp_path, make_mesh(8), dtype="float32")
  d = 4
  for name, spans in reads:
    if "k_proj" in name or "v_proj" in name or "q_proj" in name:
      assert spans[0][1] - spans[0][0] == d, (name, spans)        # one head of D rows
  qkv = np.asarray(model.layers[0].attn.qkv[...])                 # (H, 8, 1 + 2, D)
  k = tensors["model.layers.0.self_attn.k_proj.weight"].reshape(2, d, -1)
  q = tensors["model.layers.0.self_attn.q_proj.weight"].reshape(8, d, -1)
  for head in range(8):
    np.testing.assert_array_equal(qkv[:, head, 0], q[head].T)
    np.testing.assert_array_equal(qkv[:, head, 1], k[head // 4].T)
  bias = np.asarray(model.layers[0].attn.qkv_bias[...])            # (8, 3, D)
  vb = tensors["model.layers.0.self_attn.v_proj.bias"].reshape(2, d)
  np.testing.assert_array_equal(bias[:, 2], np.repeat(vb, 4, axis=0))

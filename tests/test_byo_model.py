"""examples/byo_llama.py, a Llama of plain JAX functions made fast with the public op and
schedule, computes our model's logits on the same weights: TP 2 and 4, woven and unsplit, over
the psum and rs_ag backends."""
import ast
import os

import jax
import numpy as np
import pytest
from conftest import load_module
from flax import nnx
from jax.sharding import Mesh

from weave_jax import Engine, RunConfig, init_random, make_mesh, preset

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "byo_llama.py")
CFG = preset("tiny", num_layers=2, vocab_size=128, hidden_size=64, intermediate_size=128,
             num_heads=8, num_kv_heads=4, head_dim=8)
TOKENS = np.random.RandomState(0).randint(0, CFG.vocab_size, 32)


def _load_example():
  return load_module(EXAMPLE, "byo_llama")


byo = _load_example()


def to_example_weights(model) -> dict:
  """Our nnx parameters (layouts in weave_jax.model) -> the example's dict (byo.param_specs)."""
  cfg, n, g, d = model.cfg, model.cfg.num_heads, model.cfg.q_per_kv, model.cfg.head_dim
  a = lambda x: np.asarray(x[...])
  layers = []
  for layer in model.layers:
    qkv, gate_up = a(layer.attn.qkv), a(layer.mlp.gate_up)        # (H, K, G+2, D), (H, 2, F)
    h = qkv.shape[0]
    layers.append({"attn_norm": a(layer.attn_norm.weight), "mlp_norm": a(layer.mlp_norm.weight),
                   "wq": qkv[:, :, :g].reshape(h, n, d), "wk": qkv[:, :, g], "wv": qkv[:, :, g + 1],
                   "wo": a(layer.attn.o).reshape(n, d, h), "w_gate": gate_up[:, 0],
                   "w_up": gate_up[:, 1], "w_down": a(layer.mlp.down)})
  return {"embed": a(model.embed.table)[:cfg.vocab_size], "layers": layers,
          "final_norm": a(model.final_norm.weight),
          "lm_head": a(model.lm_head.weight)[:cfg.vocab_size].T}


@pytest.fixture(scope="module")
def reference():
  """(example weights, our Engine's logits) for one random model."""
  mesh = make_mesh(2)
  model = init_random(CFG, mesh, seed=3)
  logits = np.asarray(Engine(model, mesh, RunConfig(backend="psum"))(TOKENS))
  return to_example_weights(model), logits


def _example_config():
  c = CFG
  return byo.Config(vocab=c.vocab_size, hidden=c.hidden_size, ffn=c.intermediate_size,
                    layers=c.num_layers, heads=c.num_heads, kv_heads=c.num_kv_heads,
                    head_dim=c.head_dim, eps=c.rms_norm_eps, rope_theta=c.rope_theta)


@pytest.mark.parametrize("tp,backend,woven", [(2, "psum", False), (2, "rs_ag", True),
                                              (4, "rs_ag", False), (4, "psum", True)])
def test_example_logits_match_our_model(reference, tp, backend, woven):
  weights, want = reference
  mesh = Mesh(np.array(jax.devices()[:tp]), (byo.AXIS,))
  got = byo.forward(weights, TOKENS, _example_config(), mesh, backend=backend, woven=woven)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_example_uses_only_the_public_api():
  """The example imports weave_jax.ops, weave_jax.weave and the fused Workspace, nothing else
  of ours."""
  tree = ast.parse(open(EXAMPLE).read())
  ours = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("weave_jax"):
      ours |= {f"{node.module}.{a.name}" for a in node.names}
    elif isinstance(node, ast.Import):
      ours |= {a.name for a in node.names if a.name.startswith("weave_jax")}
  assert ours == {"weave_jax.ops", "weave_jax.weave", "weave_jax.fused.Workspace"}


def test_example_refuses_uneven_halves(reference):
  weights, _ = reference
  mesh = Mesh(np.array(jax.devices()[:4]), (byo.AXIS,))
  with pytest.raises(ValueError, match="12 tokens do not split evenly over TP=4 in two halves"):
    byo.forward(weights, TOKENS[:12], _example_config(), mesh, woven=True)


@pytest.mark.gpu
def test_example_fused_on_gpu():
  """The example's woven fused_p2p forward against its unsplit psum one, bf16, TP $WEAVE_TEST_TP."""
  import jax.numpy as jnp
  from conftest import gpu_count, gpu_tp
  from weave_jax.fused import Workspace
  tp = gpu_tp()
  if gpu_count() < max(2, tp):
    pytest.skip(f"needs {max(2, tp)} GPUs")
  cfg = byo.Config(vocab=256, hidden=128, ffn=256, layers=2, heads=8, kv_heads=8, head_dim=16)
  mesh = Mesh(np.array(jax.devices("gpu")[:tp]), (byo.AXIS,))
  weights = byo.init(cfg, jax.random.key(0), jnp.bfloat16)
  tokens = jnp.arange(128) % cfg.vocab
  base = np.asarray(byo.forward(weights, tokens, cfg, mesh, backend="psum", woven=False))
  with Workspace(mesh, max_tokens=128, hidden=cfg.hidden, dtype=jnp.bfloat16,
                 axis_name=byo.AXIS) as ws:
    fast = np.asarray(byo.forward(weights, tokens, cfg, mesh, backend="fused_p2p", woven=True,
                                  workspace=ws))
  assert np.linalg.norm(fast - base) / np.linalg.norm(base) < 3e-2

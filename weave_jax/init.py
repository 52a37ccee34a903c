"""Create a model's parameters directly on the mesh, already sharded (no host copy)."""
from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from weave_jax.config import ModelConfig
from weave_jax.model import DecoderLayer, Embedding, LMHead, RMSNorm, Transformer
from weave_jax.sharding import check_mesh, relayout_kv_state, state_shardings


def abstract_model(cfg: ModelConfig) -> Transformer:
  """The model with ShapeDtypeStructs instead of arrays (costs no memory)."""
  if not isinstance(cfg, ModelConfig):
    raise TypeError(f"abstract_model: cfg must be a ModelConfig, got {type(cfg).__name__}")
  return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))


def unreplicated(cfg: ModelConfig) -> ModelConfig:
  """``cfg`` with the checkpoint's KV heads (no replicas)."""
  return cfg.replace(num_kv_heads=cfg.checkpoint_kv_heads, kv_replicas=1)


def init_random(cfg: ModelConfig, mesh: Mesh, seed: int = 0) -> Transformer:
  """Random weights, generated on device, each shard where it lives.

  One jitted program draws a decoder layer from its own key and runs once per layer (compiled
  once: compiling the whole model as one program grows with the layer count, 17 s for 32
  Llama-3.1-8B layers on CPU), and one more draws the embedding, final norm and head.

  The model is laid out for the mesh's TP size (``cfg.for_tp``: KV heads replicated when TP
  exceeds them); the weights are drawn for the unreplicated model, so one seed gives the same
  model at every TP size.  ``model.cfg`` is the laid-out config.
  """
  if not isinstance(cfg, ModelConfig):
    raise TypeError(f"init_random: cfg must be a ModelConfig, got {type(cfg).__name__}")
  if not isinstance(seed, int) or isinstance(seed, bool):
    raise TypeError(f"init_random: seed must be an int, got {seed!r}")
  tp = check_mesh(mesh, "init_random")
  try:
    target = cfg.for_tp(tp)
  except ValueError as e:
    raise ValueError(f"init_random: this model cannot run on this mesh: {e}") from None
  graphdef, state = nnx.split(abstract_model(target))
  shardings = state_shardings(state, mesh)
  source = unreplicated(target)
  outer = [name for name in ("embed", "final_norm", "lm_head") if name in state]

  def make_outer(key):
    rngs = nnx.Rngs(key)
    modules = {"embed": Embedding(source, rngs), "final_norm": RMSNorm(source, rngs)}
    if "lm_head" in outer:
      modules["lm_head"] = LMHead(source, rngs)
    return {name: nnx.state(modules[name]) for name in outer}

  def make_layer(key):
    layer = nnx.state(DecoderLayer(source, nnx.Rngs(key)))
    return relayout_kv_state(layer, 1, target.kv_replicas)

  outer_key, layers_key = jax.random.split(jax.random.key(seed))
  drawn = jax.jit(make_outer, out_shardings={name: shardings[name] for name in outer})(outer_key)
  for name in outer:
    state[name] = drawn[name]
  draw_layer = jax.jit(make_layer, out_shardings=shardings["layers"][0])
  for i, key in enumerate(jax.random.split(layers_key, target.num_layers)):
    state["layers"][i] = draw_layer(key)
  return nnx.merge(graphdef, state)

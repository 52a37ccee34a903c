"""Create a model's parameters directly on the mesh, already sharded (no host copy)."""
from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from weave_jax.config import ModelConfig
from weave_jax.model import Transformer
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
  """Random weights, generated on device by one jitted program, each shard where it lives.

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
  graphdef, abstract_state = nnx.split(abstract_model(target))
  shardings = state_shardings(abstract_state, mesh)

  def make():
    state = nnx.state(Transformer(unreplicated(target), nnx.Rngs(seed)))
    return relayout_kv_state(state, 1, target.kv_replicas)

  state = jax.jit(make, out_shardings=shardings)()
  return nnx.merge(graphdef, state)

"""Create a model's parameters directly on the mesh, already sharded (no host copy)."""
from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from weave_jax.config import ModelConfig
from weave_jax.model import Transformer
from weave_jax.sharding import state_shardings


def abstract_model(cfg: ModelConfig) -> Transformer:
  """The model with ShapeDtypeStructs instead of arrays (costs no memory)."""
  return nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))


def init_random(cfg: ModelConfig, mesh: Mesh, seed: int = 0) -> Transformer:
  """Random weights, generated on device by one jitted program, each shard where it lives."""
  graphdef, abstract_state = nnx.split(abstract_model(cfg))
  shardings = state_shardings(abstract_state, mesh)

  @jax.jit
  def make():
    return nnx.state(Transformer(cfg, nnx.Rngs(seed)))

  state = jax.jit(make, out_shardings=shardings)()
  return nnx.merge(graphdef, state)

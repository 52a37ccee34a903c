"""The one source of truth for sharding: logical axes -> the mesh axis ``tp``.

Parameters name their logical axes (``nnx.Param(..., axes=...)``); this table maps them to the
mesh.  Parameter PartitionSpecs, shard_map ``in_specs`` and ``out_specs`` all derive from it.
"""
from __future__ import annotations

import numpy as np
import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from weave_jax.comm.base import AXIS

# Column-parallel outputs (kv heads, FFN), vocab and experts are split across ranks; the model
# dimension ("embed") and within-head dimensions are replicated.
LOGICAL_TO_MESH: dict[str, str | None] = {
    "vocab": AXIS,
    "kv_heads": AXIS,
    "ffn": AXIS,
    "experts": AXIS,
    "embed": None,
}


def make_mesh(tp: int | None = None, devices=None) -> Mesh:
  """A 1-D mesh with axis ``tp`` over ``tp`` devices (default: all local devices)."""
  devices = list(devices if devices is not None else jax.local_devices())
  tp = tp or len(devices)
  if tp > len(devices):
    raise ValueError(f"TP size {tp} exceeds the {len(devices)} available devices")
  return Mesh(np.array(devices[:tp]), (AXIS,))


def logical_to_spec(axes) -> P:
  return P(*(LOGICAL_TO_MESH[a] if a is not None else None for a in axes))


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_specs(state: nnx.State):
  """PartitionSpec for every parameter of an (abstract or concrete) NNX state."""
  return jax.tree.map(lambda v: logical_to_spec(v.get_metadata()["axes"]), state, is_leaf=_is_var)


def state_shardings(state: nnx.State, mesh: Mesh):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state),
                      is_leaf=lambda x: isinstance(x, P))


def shard_state(state: nnx.State, mesh: Mesh) -> nnx.State:
  """Place a host/unsharded state onto the mesh."""
  return jax.device_put(state, state_shardings(state, mesh))

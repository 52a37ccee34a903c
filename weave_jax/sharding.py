"""The one source of truth for sharding: logical axes -> the mesh axis ``tp``.

Parameters name their logical axes (``nnx.Param(..., axes=...)``); this table maps them to the
mesh.  Parameter PartitionSpecs, shard_map ``in_specs`` and ``out_specs`` all derive from it.

KV heads are sharded over ``tp`` whole.  When TP exceeds the checkpoint's KV heads, each KV head
is replicated r = TP / KV times (``ModelConfig.for_tp``), a relayout of the attention weights:

  qkv (H, KV, G+2, D)  -> (H, KV*r, G/r+2, D)   q of group j cut into r sub-groups, k_j, v_j copied
  qkv_bias (KV, G+2, D) -> (KV*r, G/r+2, D)     the same
  o   (KV, G, D, H)    -> (KV*r, G/r, D, H)     a reshape

Query head n keeps its index (replicated head j*r+s holds heads j*G + s*G/r ...), so the model
computes the same function at every replica count.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import jax
import jax.numpy as jnp
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


def make_mesh(tp: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis ``tp`` over ``tp`` devices (default: all local devices)."""
  if tp is not None and (not isinstance(tp, int) or isinstance(tp, bool) or tp <= 0):
    raise ValueError(f"make_mesh: tp must be a positive int or None, got {tp!r}")
  if devices is None:
    devices = jax.local_devices()
  elif isinstance(devices, (str, bytes)) or not hasattr(devices, "__iter__"):
    raise TypeError(f"make_mesh: devices must be a sequence of jax devices, got "
                    f"{type(devices).__name__}")
  devices = list(devices)
  if not devices:
    raise ValueError("make_mesh: devices is empty")
  bad = [d for d in devices if not isinstance(d, jax.Device)]
  if bad:
    raise TypeError(f"make_mesh: devices must be jax devices, got {bad[0]!r}")
  tp = tp or len(devices)
  if tp > len(devices):
    raise ValueError(f"make_mesh: TP size {tp} exceeds the {len(devices)} available devices")
  return Mesh(np.array(devices[:tp]), (AXIS,))


def check_mesh(mesh, where: str) -> int:
  """The TP size of ``mesh``; a TypeError/ValueError naming ``where`` unless it has a ``tp``
  axis."""
  if not isinstance(mesh, Mesh):
    raise TypeError(f"{where}: mesh must be a jax.sharding.Mesh (weave_jax.make_mesh), got "
                    f"{type(mesh).__name__}")
  if AXIS not in mesh.axis_names:
    raise ValueError(f"{where}: mesh has axes {mesh.axis_names}, expected one named {AXIS!r}")
  return mesh.shape[AXIS]


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


def state_key(path) -> tuple:
  """A state path as plain keys, e.g. ('layers', 0, 'attn', 'qkv') (list indices as ints)."""
  keys = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
  return tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in keys)


# --- KV-head replication (module docstring) ---------------------------------------------------

def relayout_qkv(w: jax.Array, replicas_from: int, replicas_to: int) -> jax.Array:
  """(..., KV*a, G/a + 2, D) -> (..., KV*b, G/b + 2, D) for a, b the replica counts."""
  *lead, heads, width, d = w.shape
  kv, g = heads // replicas_from, (width - 2) * replicas_from
  w = w.reshape(*lead, kv, replicas_from, width, d)
  q = w[..., :width - 2, :].reshape(*lead, kv, replicas_to, g // replicas_to, d)
  kv_pair = jnp.broadcast_to(w[..., :1, width - 2:, :], (*lead, kv, replicas_to, 2, d))
  return jnp.concatenate([q, kv_pair], axis=-2).reshape(
      *lead, kv * replicas_to, g // replicas_to + 2, d)


def relayout_o(w: jax.Array, replicas_from: int, replicas_to: int) -> jax.Array:
  """(KV*a, G/a, D, H) -> (KV*b, G/b, D, H): a reshape (query heads keep their order)."""
  heads, g, d, h = w.shape
  kv = heads // replicas_from
  return w.reshape(kv * replicas_to, g * replicas_from // replicas_to, d, h)


_RELAYOUT = {"qkv": relayout_qkv, "qkv_bias": relayout_qkv, "o": relayout_o}


def relayout_kv_state(state: nnx.State, replicas_from: int, replicas_to: int) -> nnx.State:
  """Every layer's attention weights taken from ``replicas_from`` to ``replicas_to`` copies of
  each KV head; other parameters pass through."""
  if replicas_from == replicas_to:
    return state

  def fix(path, var):
    key = state_key(path)
    if len(key) < 2 or key[-2] != "attn" or key[-1] not in _RELAYOUT:
      return var
    return var.replace(_RELAYOUT[key[-1]](var.get_value(), replicas_from, replicas_to))

  return jax.tree_util.tree_map_with_path(fix, state, is_leaf=_is_var)

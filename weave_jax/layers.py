"""Pure per-rank math: RoPE, causal attention over packed tokens, SwiGLU, top-k MoE.

Everything here works on local (per-rank) shapes and never communicates.  Shapes use
T = tokens of the chunk at hand, S = key/value tokens, H = hidden, N = local query heads,
K = local kv heads, D = head_dim, F = local FFN width, E = local experts.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from weave_jax.config import ModelConfig


# --- RoPE ------------------------------------------------------------------------------------

def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies (D/2,), with Llama 3.1 scaling when configured."""
  d = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  sc = cfg.rope_scaling
  if sc is None:
    return inv
  low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
  high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = jnp.where(wavelen > low_wavelen, inv / sc.factor, inv)
  smooth = ((sc.original_max_position_embeddings / wavelen - sc.low_freq_factor)
            / (sc.high_freq_factor - sc.low_freq_factor))
  smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape (T, D/2) in float32 for integer positions (T,)."""
  angles = positions.astype(jnp.float32)[:, None] * rope_inv_freq(cfg)[None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE (the Hugging Face layout).  x: (T, heads, D); cos/sin: (T, D/2)."""
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  c, s = cos[:, None, :], sin[:, None, :]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


# --- Attention ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TokenInfo:
  """Where a chunk of tokens sits in the (padded) batch.

  positions: (T,) RoPE positions.  segments: (T,) packed-prompt ids, or None when the batch is one
  causal sequence (enables the fused cuDNN causal path).  index: (T,) the token's index in the
  batch (attention is causal in batch order within a segment).
  """
  positions: jax.Array
  segments: jax.Array | None
  index: jax.Array

  def tree_flatten(self):
    return (self.positions, self.segments, self.index), None

  @classmethod
  def tree_unflatten(cls, _, children):
    return cls(*children)


jax.tree_util.register_pytree_node(TokenInfo, TokenInfo.tree_flatten, TokenInfo.tree_unflatten)


@dataclasses.dataclass(frozen=True)
class KVPrefix:
  """Keys/values of earlier tokens of the same batch (the first half when weaving)."""
  k: jax.Array       # (S, K, D)
  v: jax.Array       # (S, K, D)
  info: TokenInfo


jax.tree_util.register_pytree_node(
    KVPrefix, lambda p: ((p.k, p.v, p.info), None), lambda _, c: KVPrefix(*c))


def _sdpa(q, k, v, *, mask=None, is_causal=False, impl=None, lse=False):
  """jax.nn.dot_product_attention on (T, N, D) / (S, K, D).

  Returns out (T, N, D), and with ``lse`` also the log-sum-exp of the scores (T, N).
  """
  res = jax.nn.dot_product_attention(
      q[None], k[None], v[None], mask=None if mask is None else mask[None, None],
      is_causal=is_causal, implementation=impl, return_residual=lse)
  return (res[0][0], res[1][0]) if lse else res[0]


def _merge(o1, l1, o2, l2):
  """Combine two partial softmax-attentions over disjoint key sets via their log-sum-exps."""
  m = jnp.maximum(l1, l2)
  w1, w2 = jnp.exp(l1 - m)[..., None], jnp.exp(l2 - m)[..., None]
  out = (o1.astype(jnp.float32) * w1 + o2.astype(jnp.float32) * w2) / (w1 + w2)
  return out.astype(o1.dtype)


def causal_attention(q, k, v, info: TokenInfo, prefix: KVPrefix | None = None,
                     impl: str | None = None) -> jax.Array:
  """Causal GQA attention of the chunk's queries over prefix + own keys.  Returns (T, N, D).

  Without segments (one sequence) this uses the causal kernel (cuDNN on GPU) and, given a
  prefix, merges a full attention over the prefix with the causal one over the chunk by their
  log-sum-exps: the same FLOPs as the unsplit batch.  With segments it builds a dense mask.
  """
  if info.segments is None:
    if prefix is None:
      return _sdpa(q, k, v, is_causal=True, impl=impl)
    out, lse = _sdpa(q, k, v, is_causal=True, impl=impl, lse=True)
    out_p, lse_p = _sdpa(q, prefix.k, prefix.v, impl=impl, lse=True)
    return _merge(out_p, lse_p, out, lse)
  k_all, v_all, seg_k, idx_k = k, v, info.segments, info.index
  if prefix is not None:
    k_all = jnp.concatenate([prefix.k, k], axis=0)
    v_all = jnp.concatenate([prefix.v, v], axis=0)
    seg_k = jnp.concatenate([prefix.info.segments, seg_k])
    idx_k = jnp.concatenate([prefix.info.index, idx_k])
  mask = (info.segments[:, None] == seg_k[None, :]) & (idx_k[None, :] <= info.index[:, None])
  return _sdpa(q, k_all, v_all, mask=mask, impl="xla")


# --- MLPs --------------------------------------------------------------------------------------

def swiglu(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """x: (T, H); w_gate_up: (H, 2, F); w_down: (F, H).  Returns the partial sum (T, H)."""
  gu = jnp.einsum("th,hcf->tcf", x, w_gate_up)                 # (T, 2, F)
  act = jax.nn.silu(gu[:, 0].astype(jnp.float32)) * gu[:, 1].astype(jnp.float32)
  return act.astype(x.dtype) @ w_down


def route_top_k(x: jax.Array, w_router: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Mixtral routing: softmax over all experts, top-k, renormalise.  Returns (ids, weights) (T, k)."""
  logits = (x @ w_router).astype(jnp.float32)                   # (T, E_total)
  probs = jax.nn.softmax(logits, axis=-1)
  weights, ids = jax.lax.top_k(probs, k)
  weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return ids, weights.astype(x.dtype)


def moe(x: jax.Array, w_router: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, *,
        k: int, first_expert: jax.Array) -> jax.Array:
  """Top-k MoE over this rank's experts [first_expert, first_expert + E).  Returns (T, H) partial.

  x: (T, H); w_router: (H, E_total) replicated; w_gate_up: (E, H, 2, F); w_down: (E, F, H).
  Assignments to other ranks' experts are sorted to the end and get zero weight; the grouped
  GEMM (ragged_dot) runs over this rank's groups only.
  """
  t, h = x.shape
  e_local = w_gate_up.shape[0]
  ids, weights = route_top_k(x, w_router, k)
  flat_ids = ids.reshape(-1) - first_expert                      # (T*k,)
  local = (flat_ids >= 0) & (flat_ids < e_local)
  sort_key = jnp.where(local, flat_ids, e_local)
  order = jnp.argsort(sort_key, stable=True)
  token = (jnp.arange(t * k) // k)[order]
  group_sizes = jnp.bincount(sort_key, length=e_local + 1)[:e_local].astype(jnp.int32)
  xs = x[token]                                                   # (T*k, H)
  gu = jax.lax.ragged_dot(xs, w_gate_up.reshape(e_local, h, -1), group_sizes)
  f = w_down.shape[1]
  act = jax.nn.silu(gu[:, :f].astype(jnp.float32)) * gu[:, f:].astype(jnp.float32)
  y = jax.lax.ragged_dot(act.astype(x.dtype), w_down, group_sizes)  # (T*k, H)
  scale = jnp.where(local[order], weights.reshape(-1)[order], 0).astype(jnp.float32)
  out = jnp.zeros((t, h), jnp.float32).at[token].add(y.astype(jnp.float32) * scale[:, None])
  return out.astype(x.dtype)

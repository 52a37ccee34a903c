"""The decoder-only transformer (Llama / Qwen2 / Mixtral) as Flax NNX modules of pure math.

Parameters are created at their global shapes, each ``nnx.Param`` carrying its logical axes
(``axes=...``); ``weave_jax.sharding`` maps those to the mesh.  Every ``__call__`` runs inside
``shard_map`` on local shards and returns *partial sums* for row-parallel outputs: no module
ever calls a collective.  Communication happens only in ``comm.reduce_add_norm``, driven by
``weave_jax.schedule``.

Weight layouts (global shapes; KV = kv heads, G = q heads per kv head):
  embed.table      (V_pad, H)            ('vocab', 'embed')
  attn.qkv         (H, KV, G + 2, D)     q heads of group j, then k_j, v_j: one column-parallel GEMM
  attn.qkv_bias    (KV, G + 2, D)        Qwen2 only
  attn.o           (KV, G, D, H)         row-parallel
  mlp.gate_up      (H, 2, F)             column-parallel (gate, up)
  mlp.down         (F, H)                row-parallel
  moe.router       (H, E)                replicated
  moe.gate_up      (E, H, 2, F), moe.down (E, F, H)   sharded by expert
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from weave_jax import layers
from weave_jax.comm.base import AXIS
from weave_jax.config import ModelConfig


def padded_vocab(cfg: ModelConfig, multiple: int = 8) -> int:
  """Vocab rounded up so that any TP size in {1,2,4,8} divides it (extra rows are zero)."""
  return -(-cfg.vocab_size // multiple) * multiple


def _param(rngs: nnx.Rngs, shape, axes, dtype, scale: float | None = None, value=None):
  if value is None:
    std = scale if scale is not None else shape[0] ** -0.5
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    h = cfg.hidden_size
    noise = 1.0 + 0.1 * jax.random.normal(rngs.params(), (h,), jnp.float32)
    self.weight = _param(rngs, (h,), ("embed",), cfg.dtype, value=noise.astype(cfg.dtype))


class Embedding(nnx.Module):
  """Vocab-parallel embedding; also the LM head when embeddings are tied."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    v = padded_vocab(cfg)
    table = jax.random.normal(rngs.params(), (v, cfg.hidden_size), jnp.float32) * 0.02
    table = jnp.where(jnp.arange(v)[:, None] < cfg.vocab_size, table, 0.0)
    self.table = _param(rngs, table.shape, ("vocab", "embed"), cfg.dtype,
                        value=table.astype(cfg.dtype))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens (T,) -> partial embeddings (T, H): rows owned by other ranks are zero."""
    rows = self.table.shape[0]                                    # local vocab rows
    local = tokens - jax.lax.axis_index(AXIS) * rows
    owned = (local >= 0) & (local < rows)
    emb = jnp.take(self.table[...], jnp.clip(local, 0, rows - 1), axis=0)
    return jnp.where(owned[:, None], emb, jnp.zeros_like(emb))


class LMHead(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.weight = _param(rngs, (padded_vocab(cfg), cfg.hidden_size), ("vocab", "embed"),
                         cfg.dtype, scale=cfg.hidden_size ** -0.5)


def lm_logits(head_table: jax.Array, x: jax.Array) -> jax.Array:
  """x (T, H) @ local vocab rows (V_l, H)^T -> this rank's logits (T, V_l), float32."""
  return jnp.einsum("th,vh->tv", x, head_table, preferred_element_type=jnp.float32)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    h, kv, g, d = cfg.hidden_size, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
    self.cfg = cfg
    self.qkv = _param(rngs, (h, kv, g + 2, d), ("embed", "kv_heads", None, None), cfg.dtype)
    self.qkv_bias = (_param(rngs, (kv, g + 2, d), ("kv_heads", None, None), cfg.dtype, 0.1)
                     if cfg.qkv_bias else None)
    self.o = _param(rngs, (kv, g, d, h), ("kv_heads", None, None, "embed"), cfg.dtype,
                    scale=(cfg.num_heads * d) ** -0.5)

  def project_qkv(self, x, rope):
    """x (T, H) normed -> q (T, N, D), k (T, K, D) with RoPE applied, v (T, K, D) (local heads)."""
    t = x.shape[0]
    qkv = jnp.einsum("th,hkgd->tkgd", x, self.qkv[...])          # (T, K, G+2, D)
    if self.qkv_bias is not None:
      qkv = qkv + self.qkv_bias[...]
    kv_heads, g = qkv.shape[1], qkv.shape[2] - 2
    cos, sin = rope
    q = layers.apply_rope(qkv[:, :, :g].reshape(t, kv_heads * g, -1), cos, sin)  # (T, N, D)
    k = layers.apply_rope(qkv[:, :, g], cos, sin)                                # (T, K, D)
    return q, k, qkv[:, :, g + 1]

  def project_out(self, o):
    """Attention output o (T, N, D) -> this rank's row-parallel partial sum (T, H)."""
    kv_heads = self.o.shape[0]
    out = o.reshape(o.shape[0], kv_heads, -1, o.shape[-1])        # (T, K, G, D)
    return jnp.einsum("tkgd,kgdh->th", out, self.o[...])

  def __call__(self, x, rope, info: layers.TokenInfo, prefix: layers.KVPrefix | None = None,
               impl: str | None = None):
    """x (T, H) normed -> (partial (T, H), KVPrefix of this chunk for later chunks)."""
    q, k, v = self.project_qkv(x, rope)
    out = layers.causal_attention(q, k, v, info, prefix, impl)   # (T, N, D)
    return self.project_out(out), layers.KVPrefix(k, v, info)


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    h, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_up = _param(rngs, (h, 2, f), ("embed", None, "ffn"), cfg.dtype)
    self.down = _param(rngs, (f, h), ("ffn", "embed"), cfg.dtype)

  def __call__(self, x):
    return layers.swiglu(x, self.gate_up[...], self.down[...])


class MoE(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    h, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    self.k = cfg.experts_per_token
    self.router = _param(rngs, (h, e), ("embed", None), cfg.dtype)
    self.gate_up = _param(rngs, (e, h, 2, f), ("experts", "embed", None, None), cfg.dtype,
                          scale=h ** -0.5)
    self.down = _param(rngs, (e, f, h), ("experts", None, "embed"), cfg.dtype, scale=f ** -0.5)

  def __call__(self, x):
    e_local = self.gate_up.shape[0]
    first = jax.lax.axis_index(AXIS) * e_local
    return layers.moe(x, self.router[...], self.gate_up[...], self.down[...], k=self.k,
                      first_expert=first)


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg, rngs)
    self.mlp = MoE(cfg, rngs) if cfg.is_moe else MLP(cfg, rngs)


class Transformer(nnx.Module):
  """Parameters of the whole model.  The forward pass lives in ``weave_jax.schedule``."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embedding(cfg, rngs)
    self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg, rngs)
    self.lm_head = None if cfg.tie_embeddings else LMHead(cfg, rngs)

  def head_table(self) -> jax.Array:
    return (self.embed.table if self.lm_head is None else self.lm_head.weight)[...]

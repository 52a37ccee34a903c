"""The per-rank forward pass: embedding -> layers -> final norm -> LM head, as a chain of stages.

Runs inside ``shard_map``; every stage returns a partial sum that the communication backend
reduces (``reduce_add_norm``).  The chain is the same for the unsplit and the woven schedule.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from weave_jax import layers, weave
from weave_jax.comm.base import CommBackend
from weave_jax.config import ModelConfig
from weave_jax.model import Transformer, lm_logits
from weave_jax.weave import Stage


@dataclasses.dataclass(frozen=True)
class Half:
  """A contiguous chunk of the (padded) batch: its token ids, positions and RoPE tables."""
  tokens: jax.Array                      # (T,)
  info: layers.TokenInfo
  rope: tuple[jax.Array, jax.Array]      # cos, sin (T, D/2)


def make_half(cfg: ModelConfig, tokens, positions, segments, start: int, stop: int) -> Half:
  info = layers.TokenInfo(positions[start:stop],
                          None if segments is None else segments[start:stop],
                          jnp.arange(start, stop, dtype=jnp.int32))
  return Half(tokens[start:stop], info, layers.rope_tables(cfg, info.positions))


def chain_stages(model: Transformer, attention_stage) -> list[Stage]:
  """[embed, (attention, mlp) per layer]; each with the norm weight that follows it.

  ``attention_stage(i, layer)`` returns layer ``i``'s attention stage ``(n, h, ctx) -> (out,
  ctx)``: the prefill's (``build_stages``) or the serving step's over KV pages.
  """
  stages: list[Stage] = []
  embed = model.embed
  stages.append((lambda n, h, ctx: (embed(h.tokens), None),
                 model.layers[0].attn_norm.weight[...], "embed"))
  n_layers = len(model.layers)
  for i, layer in enumerate(model.layers):
    nxt = (model.layers[i + 1].attn_norm if i + 1 < n_layers else model.final_norm).weight[...]

    def mlp(n, h, ctx, layer=layer):
      return layer.mlp(n), None

    stages.append((attention_stage(i, layer), layer.mlp_norm.weight[...], f"layer_{i}/attn"))
    stages.append((mlp, nxt, f"layer_{i}/mlp"))
  return stages


def build_stages(model: Transformer, attn_impl: str | None) -> list[Stage]:
  """The prefill chain (``chain_stages``): each attention over its half's own tokens."""
  def attention_stage(i, layer):
    def attn(n, h, ctx):
      return layer.attn(n, h.rope, h.info, ctx, attn_impl)
    return attn
  return chain_stages(model, attention_stage)


def forward_rank(model: Transformer, tokens, positions, segments, *, backend: CommBackend,
                 split: int | None, tp: int, attn_impl: str | None, logits_at: int | None):
  """Per-rank forward on padded inputs (T,).  ``split``: first token of half B, or None.

  ``logits_at``: compute logits only for this token index (prefill), or None for all tokens.
  Returns this rank's logits shard (T, or 1 / 2 rows with ``logits_at``, V_local) in float32;
  with ``logits_at`` the last row is the requested token.
  """
  cfg = model.cfg
  t, h, eps = tokens.shape[0], cfg.hidden_size, cfg.rms_norm_eps
  stages = build_stages(model, attn_impl)
  if split is None:
    half = make_half(cfg, tokens, positions, segments, 0, t)
    residual = jnp.zeros(backend.residual_shape(t, h, tp), cfg.dtype)
    normed = weave.run(stages, (half,), (residual,), backend, eps=eps).normed[0]
    if logits_at is not None:
      normed = normed[logits_at:logits_at + 1]
  else:
    halves = (make_half(cfg, tokens, positions, segments, 0, split),
              make_half(cfg, tokens, positions, segments, split, t))
    residuals = tuple(jnp.zeros(backend.residual_shape(x.tokens.shape[0], h, tp), cfg.dtype)
                      for x in halves)
    n_a, n_b = weave.run(stages, halves, residuals, backend, eps=eps).normed
    if logits_at is None:
      normed = jnp.concatenate([n_a, n_b], axis=0)
    else:
      # Keep half A's last row too, so that XLA cannot drop A's final reduce_add_norm as dead
      # code: the woven and unsplit programs then do the same communication.  The engine
      # returns only the last row.
      normed = jnp.concatenate([n_a[-1:], n_b[logits_at - split:logits_at - split + 1]])
  with jax.named_scope("lm_head"):
    return lm_logits(model.head_table(), normed)

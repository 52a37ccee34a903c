"""Token sampling on device: greedy, temperature, top-k, top-p, one random stream per request.

Rows are the requests that sample this step.  Row r draws with the key
``fold_in(key(seed[r]), step[r])`` (``step``: tokens the request has sampled so far), so a
request's tokens depend on its seed and its own history only, never on what else shares the
batch.  Filters apply in vLLM's order: temperature, then top-k, then top-p over the softmax of
what top-k kept.  The log-probability returned is that of the chosen token under
``log_softmax(logits / T)`` before any filter (raw logits for greedy rows).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from weave_jax.serve.sampling_params import SamplingParams


MODES = ("greedy", "sample", "filtered")


def sample(logits, temperature, top_k, top_p, seeds, steps, *, mode: str = "filtered"):
  """Draw one token per row.

  Args:
    logits: (R, V) float32.
    temperature: (R,) float32; <= 0 means greedy.
    top_k: (R,) int32; <= 0 (or >= V) keeps every token.
    top_p: (R,) float32 in (0, 1]; 1 keeps every token.
    seeds: (R,) uint32 per-request seeds.
    steps: (R,) int32 tokens each request has sampled so far.
    mode: what the batch needs (``mode_for``; each mode is exact for the batches it is chosen
      for): "filtered" draws with top-k / top-p (a (R, V) sort), "sample" draws without them,
      "greedy" draws nothing (every row greedy).
  Returns:
    tokens (R,) int32 and logprobs (R,) float32.
  """
  if mode not in MODES:
    raise ValueError(f"sample: mode={mode!r} is not one of {MODES}")
  logits = logits.astype(jnp.float32)
  greedy = temperature <= 0
  scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
  tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if mode != "greedy":
    masked = _filter_top_k_top_p(scaled, top_k, top_p) if mode == "filtered" else scaled
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, steps)
    drawn = jax.vmap(jax.random.categorical)(keys, masked)
    tokens = jnp.where(greedy, tokens, drawn.astype(jnp.int32))
  logp = jax.nn.log_softmax(scaled, axis=-1)
  chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
  return tokens, chosen


def _filter_top_k_top_p(scaled, top_k, top_p):
  """Logits (R, V) with every token outside the row's top-k / top-p set at -inf."""
  vocab = scaled.shape[-1]
  ordered = -jnp.sort(-scaled, axis=-1)                          # (R, V) descending
  k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
  rank = jnp.arange(vocab)[None, :]
  in_k = rank < k[:, None]
  probs = jax.nn.softmax(jnp.where(in_k, ordered, -jnp.inf), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs                     # mass of better tokens
  keep = in_k & ((before < top_p[:, None]) | (rank == 0))
  n_keep = jnp.sum(keep, axis=-1)                                 # >= 1
  threshold = jnp.take_along_axis(ordered, (n_keep - 1)[:, None], axis=-1)
  return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def mode_for(params: Sequence[SamplingParams], vocab_size: int) -> str:
  """The cheapest ``sample`` mode exact for these rows: "greedy" when every row is greedy,
  "filtered" when a sampling row asks for top-k or top-p, else "sample"."""
  drawing = [p for p in params if p.temperature > 0]
  if not drawing:
    return "greedy"
  if any(0 < p.top_k < vocab_size or p.top_p < 1 for p in drawing):
    return "filtered"
  return "sample"


def default_seed(base_seed: int, request_id: int) -> int:
  """The seed of a request that gave none: fixed by the runner's seed and the request id."""
  return (base_seed * 0x9E3779B1 + request_id * 0x85EBCA77 + 1) & 0xFFFFFFFF


def param_arrays(params: Sequence[SamplingParams], seeds: Sequence[int], rows: int):
  """Host arrays for ``sample`` padded to ``rows``: temperature, top_k, top_p (float32/int32),
  seeds (uint32), in that order.  Padding rows are greedy."""
  n = len(params)
  temperature = np.zeros(rows, np.float32)
  top_k = np.full(rows, -1, np.int32)
  top_p = np.ones(rows, np.float32)
  seed = np.zeros(rows, np.uint32)
  if n:
    temperature[:n] = [p.temperature for p in params]
    top_k[:n] = [p.top_k for p in params]
    top_p[:n] = [p.top_p for p in params]
    seed[:n] = np.asarray(seeds, np.uint64) & 0xFFFFFFFF
  return temperature, top_k, top_p, seed

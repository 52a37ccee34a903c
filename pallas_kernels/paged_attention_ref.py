"""Ragged paged attention: the layout, the input checks, and the ``jnp`` reference.

One step of a serving engine attends a flat batch of query tokens from many requests over a
paged KV cache.  The names are vLLM V1's:

    q                (T, N, D)       this step's query tokens; request i's tokens are the rows
                                     query_start_loc[i] : query_start_loc[i + 1]
    k_pages, v_pages (P, page, K, D) the cache: P pages of ``page`` token slots, K kv heads
    kv_lens          (S,) int32      tokens of request i in the cache *including* this step's
                                     (vLLM's ``seq_lens``)
    block_tables     (S, M) int32    page ids of request i; token slot s of request i lives in
                                     page block_tables[i, s // page], row s % page
    query_start_loc  (S + 1,) int32  where each request's queries start; non-decreasing
    num_seqs         int32 scalar    requests actually present (rows >= num_seqs are padding)

Query row j of request i (q_len = query_start_loc[i + 1] - query_start_loc[i] new tokens) sits
at position ``kv_lens[i] - q_len + j`` and attends causally to cache positions 0..that position
of its own request.  Query rows at or after ``query_start_loc[num_seqs]`` are padding; their
output is zero.  GQA: query head n reads kv head ``n // (N // K)``.

The reference gathers each request's pages, zeroes every slot at or beyond its ``kv_lens`` (so
that poisoned, unused slots cannot leak NaN into the result), and computes softmax attention in
float32.  It is the CPU path of the engine and the yardstick of the GPU kernels.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_OP = "ragged_paged_attention"
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def check_shapes(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc) -> None:
  """Shape and dtype checks (work on tracers too).  Raises ValueError / TypeError naming the
  argument."""
  if q.ndim != 3:
    raise ValueError(f"{_OP}: q must be (T, N, D), got shape {q.shape}")
  if k_pages.ndim != 4:
    raise ValueError(f"{_OP}: k_pages must be (P, page, K, D), got shape {k_pages.shape}")
  if v_pages.shape != k_pages.shape:
    raise ValueError(f"{_OP}: v_pages shape {v_pages.shape} != k_pages shape {k_pages.shape}")
  _, n, d = q.shape
  _, _, k, dk = k_pages.shape
  if dk != d:
    raise ValueError(f"{_OP}: head dim of q ({d}) != head dim of k_pages ({dk})")
  if n % k:
    raise ValueError(f"{_OP}: query heads N={n} are not a multiple of kv heads K={k}")
  if jnp.dtype(q.dtype) not in DTYPES:
    raise TypeError(f"{_OP}: q dtype {q.dtype} not one of bfloat16/float16/float32")
  for name, arr in (("k_pages", k_pages), ("v_pages", v_pages)):
    if arr.dtype != q.dtype:
      raise TypeError(f"{_OP}: {name} dtype {arr.dtype} != q dtype {q.dtype}")
  if block_tables.ndim != 2:
    raise ValueError(f"{_OP}: block_tables must be (S, M), got shape {block_tables.shape}")
  s = block_tables.shape[0]
  if kv_lens.shape != (s,):
    raise ValueError(f"{_OP}: kv_lens shape {kv_lens.shape} != ({s},) (one per block_tables row)")
  if query_start_loc.shape != (s + 1,):
    raise ValueError(f"{_OP}: query_start_loc shape {query_start_loc.shape} != ({s + 1},)")
  for name, arr in (("kv_lens", kv_lens), ("block_tables", block_tables),
                    ("query_start_loc", query_start_loc)):
    if not jnp.issubdtype(arr.dtype, jnp.integer):
      raise TypeError(f"{_OP}: {name} must be integers, got {arr.dtype}")


def check_metadata(kv_lens, block_tables, query_start_loc, num_seqs: int, *, num_pages: int,
                   page_size: int, num_tokens: int) -> None:
  """Value checks on host (numpy) metadata, before anything launches.  Raises ValueError naming
  the argument and the first offending request."""
  kv_lens, block_tables = np.asarray(kv_lens), np.asarray(block_tables)
  qsl = np.asarray(query_start_loc)
  s, m = block_tables.shape
  if not 0 <= num_seqs <= s:
    raise ValueError(f"{_OP}: num_seqs={num_seqs} outside 0..{s} (rows of block_tables)")
  if qsl[0] != 0 or np.any(np.diff(qsl) < 0):
    raise ValueError(f"{_OP}: query_start_loc must start at 0 and be non-decreasing, got {qsl}")
  if qsl[num_seqs] > num_tokens:
    raise ValueError(f"{_OP}: query_start_loc[num_seqs]={qsl[num_seqs]} exceeds the "
                     f"{num_tokens} query rows")
  q_lens = np.diff(qsl)[:num_seqs]
  live = kv_lens[:num_seqs]
  bad = np.flatnonzero(live < q_lens)
  if bad.size:
    i = bad[0]
    raise ValueError(f"{_OP}: kv_lens[{i}]={live[i]} is shorter than the request's "
                     f"{q_lens[i]} query tokens")
  bad = np.flatnonzero(live > m * page_size)
  if bad.size:
    i = bad[0]
    raise ValueError(f"{_OP}: kv_lens[{i}]={live[i]} exceeds its block table "
                     f"({m} pages x {page_size} tokens)")
  used = -(-live // page_size)                                   # pages each request reads
  for i in range(num_seqs):
    pages = block_tables[i, :used[i]]
    if pages.size and (pages.min() < 0 or pages.max() >= num_pages):
      raise ValueError(f"{_OP}: block_tables[{i}] holds page ids outside the pool 0..{num_pages - 1}: "
                       f"{pages[(pages < 0) | (pages >= num_pages)][:4].tolist()}")


def searchsorted_right(sorted_values, x):
  """``jnp.searchsorted(sorted_values, x, side="right")`` as one comparison fusion.

  The default method is a binary search in a loop, which XLA on GPU runs as a while loop that
  reads each trip's predicate back on the host: tens of microseconds per call inside every
  attention layer.  Here the operands are request or tile counts (at most a few hundred
  thousand comparisons)."""
  return jnp.searchsorted(sorted_values, x, side="right", method="compare_all").astype(jnp.int32)


def token_requests(query_start_loc, num_seqs, num_tokens: int):
  """(request of each query row, its position offset j within the request, valid) (T,) each."""
  tok = jnp.arange(num_tokens, dtype=jnp.int32)
  s = query_start_loc.shape[0] - 1
  req = jnp.clip(searchsorted_right(query_start_loc[1:], tok), 0, s - 1)
  valid = tok < query_start_loc[num_seqs]
  return req.astype(jnp.int32), tok - query_start_loc[req], valid


#: Float32 bytes of the keys one block of query rows gathers (values as many again): bounds the
#: reference's memory at long contexts and large batches.
BLOCK_BYTES = 256 << 20


def ragged_paged_attention_reference(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc,
                                     num_seqs, *, sm_scale: float | None = None) -> jax.Array:
  """Float32 softmax attention on gathered pages.  Returns (T, N, D) in ``q.dtype``.

  Query rows run in blocks (``lax.map``); each row gathers its own request's pages, so memory
  is about 2 x ``BLOCK_BYTES`` whatever T, S and the context: meant for tests and CPU serving,
  not for speed (every row of a prefill chunk gathers its request's pages again).
  """
  check_shapes(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc)
  t, n, d = q.shape
  _, page, k, _ = k_pages.shape
  m = block_tables.shape[1]
  g = n // k
  scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
  length = m * page                                              # L: key slots per request
  kv_lens, block_tables, query_start_loc = (jnp.asarray(a) for a in
                                            (kv_lens, block_tables, query_start_loc))
  req, offset, valid = token_requests(query_start_loc, num_seqs, t)
  q_len = query_start_loc[req + 1] - query_start_loc[req]
  pos = kv_lens[req] - q_len + offset                            # (T,) query positions
  qf = q.astype(jnp.float32).reshape(t, k, g, d) * scale
  rows = max(1, min(t, BLOCK_BYTES // (length * k * d * 4)))
  blocks = -(-t // rows)
  pad = blocks * rows - t
  def blocked(x):                                                # (T, ...) -> (blocks, rows, ...)
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(blocks, rows, *x.shape[1:])
  # HIGHEST: float32 products on GPUs too (their default float32 dot may round inputs to TF32)
  hi = jax.lax.Precision.HIGHEST
  slot = jnp.arange(length)

  def block(args):
    qb, rb, pb = args                                            # (R, K, G, D), (R,), (R,)
    live = slot[None, :] < kv_lens[rb][:, None]                  # (R, L): slots in the cache
    def gather(pages):                                           # (R, L, K, D), dead slots 0
      x = pages[block_tables[rb]].reshape(rows, length, k, d).astype(jnp.float32)
      return jnp.where(live[..., None, None], x, 0.0)
    scores = jnp.einsum("rkgd,rlkd->rkgl", qb, gather(k_pages), precision=hi)
    allowed = live & (slot[None, :] <= pb[:, None])              # causal within the request
    scores = jnp.where(allowed[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("rkgl,rlkd->rkgd", probs, gather(v_pages), precision=hi)

  out = jax.lax.map(block, (blocked(qf), blocked(req), blocked(pos)))
  out = out.reshape(blocks * rows, n, d)[:t]
  out = jnp.where(valid[:, None, None], out, 0.0)
  return out.astype(q.dtype)

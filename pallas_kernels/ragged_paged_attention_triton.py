"""Ragged paged attention as a Triton kernel, called from JAX through ``jax_triton.triton_call``.

Layout and semantics are the reference's (``pallas_kernels.paged_attention_ref``): a flat batch
of query tokens q (T, N, D) from up to S requests attends causally over a paged cache
k_pages/v_pages (P, page, K, D) through block_tables (S, M).

Kernel design (flash attention over gathered pages):

* One program owns a *query block* of one request and one kv head.  Its ``BLOCK_M`` rows are
  (token, query head) pairs: row r is token ``r // G`` of the block and query head
  ``kv_head * G + r % G`` (G = N // K).  All G query heads of a kv head share the block, so each
  K/V tile is loaded once for G heads, and GQA ratios need not be powers of two (rows beyond
  ``BLOCK_Q * G`` are idle).
* Keys come in tiles of ``BLOCK_N`` slots; slot n of the request lives in page
  ``block_tables[req, n // page]``, row ``n % page``: each key row is a gathered load of D
  contiguous values, so any page size works and a tile may span pages.  Tiles that every row of
  the block may see entirely are processed without masks; the tail (the causal diagonal and the
  end of the cache) is masked: loads beyond the key range use ``other=0`` and their scores are
  set to -inf before the softmax, so ``p`` is exactly 0 there and a NaN in an unused slot or an
  unused page can never reach the output (the GPU test poisons those with NaN).
* Softmax is online in float32 (base 2: the scale is folded with log2(e)), output normalised
  at the end.
* Two launches per call: a *decode* launch with a small block (``BLOCK_M`` = 16 rows, for
  requests of at most ``BLOCK_Q`` new tokens, one block each) and a *prefill* launch with a large
  block (128 rows) for longer requests.  A mixed batch thus wastes no tensor-core rows on its
  decodes.  The prefill launch writes its rows into the decode launch's output (aliased buffer).
* Split-KV (flash decoding) in the decode launch: grid axis 2 runs up to ``num_splits`` programs
  per (request, kv head) over disjoint key ranges, each writing a normalised partial output and
  its base-2 log-sum-exp; ``combine_splits`` (jnp) merges them.  The number of splits a request
  actually uses is chosen per step from its length and the live batch (``split_counts``), so a
  batch that already fills the GPU does not split.
* Query blocks map to requests through a per-step index built in jnp (``prefill_schedule``);
  its static length is ``ceil(T / BLOCK_Q) + min(S, T // (decode BLOCK_Q + 1))``.

Metadata values are trusted here (the kernel reads ``block_tables`` and the K/V slots they point
at without bounds checks): callers validate host metadata with ``check_metadata`` (the serving
engine builds its metadata on the host and does).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from pallas_kernels.paged_attention_ref import check_shapes, searchsorted_right

_OP = "ragged_paged_attention_triton"
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
HEAD_DIMS = (64, 128)
#: Keys per split below which splitting a request further costs more than it gains.
MIN_SPLIT_KEYS = 512
#: Cap on the float32 partial-output buffer of the split path (num_splits x T x N x D x 4 bytes).
MAX_SPLIT_BUFFER_BYTES = 16 << 20
_LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static launch parameters of one call (all Python ints: they key the compiled kernels)."""
  decode_block_m: int         # rows of a decode program (>= 16: tl.dot needs M >= 16)
  prefill_block_m: int        # rows of a prefill program
  block_n: int                # key slots per tile
  num_splits: int             # grid size of the split axis of the decode launch (1: no split)
  target_programs: int        # programs the decode launch aims for when splitting
  decode_warps: int
  prefill_warps: int
  num_stages: int

  def block_q(self, block_m: int, group: int) -> int:
    """Query tokens per block of ``block_m`` rows."""
    return block_m // group


def make_plan(num_tokens: int, max_seqs: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
              page_size: int, max_pages: int, *, num_sms: int = 132,
              compute_capability: int = 90, **overrides) -> Plan:
  """Block sizes and split count from the static shapes (``overrides`` replace any field)."""
  group = num_q_heads // num_kv_heads
  decode_block_m = max(16, triton.next_power_of_2(group))
  prefill_block_m = max(128, triton.next_power_of_2(group))
  block_n = 64
  # Split only up to what the partial buffer and the longest possible context allow.
  per_split = num_tokens * num_q_heads * head_dim * 4
  by_memory = max(1, MAX_SPLIT_BUFFER_BYTES // per_split)
  by_length = max(1, max_pages * page_size // MIN_SPLIT_KEYS)
  num_splits = 1 << (min(32, by_memory, by_length).bit_length() - 1)     # power of two
  plan = Plan(decode_block_m=decode_block_m, prefill_block_m=prefill_block_m, block_n=block_n,
              num_splits=num_splits, target_programs=2 * num_sms, decode_warps=4,
              prefill_warps=8 if head_dim >= 128 else 4,
              num_stages=3 if compute_capability in (80, 90, 100) else 2)
  return dataclasses.replace(plan, **overrides)


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def _attend_tile(q, acc, l_i, m_i, k_ptr, v_ptr, table_row, start, hi, pos, kv_head_off,
                 scale_log2, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                 BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
  """One key tile [start, start + BLOCK_N) of the online softmax; returns (acc, l_i, m_i)."""
  n = start + tl.arange(0, BLOCK_N)                                # (BLOCK_N,) key slots
  d = tl.arange(0, HEAD_DIM)
  if MASKED:
    live = n < hi
    page = tl.load(table_row + n // PAGE, mask=live, other=0)
  else:
    page = tl.load(table_row + n // PAGE)
  slot = page.to(tl.int64) * PAGE + n % PAGE                       # row of the flat cache
  offs = (slot * KV_HEADS * HEAD_DIM + kv_head_off)[:, None] + d[None, :]
  if MASKED:
    k = tl.load(k_ptr + offs, mask=live[:, None], other=0.0)       # (BLOCK_N, D)
    v = tl.load(v_ptr + offs, mask=live[:, None], other=0.0)
  else:
    k = tl.load(k_ptr + offs)
    v = tl.load(v_ptr + offs)
  s = tl.dot(q, tl.trans(k)) * scale_log2                          # (BLOCK_M, BLOCK_N) f32
  if MASKED:
    visible = live[None, :] & (n[None, :] <= pos[:, None])
    s = tl.where(visible, s, float("-inf"))
  m_new = tl.maximum(m_i, tl.max(s, 1))
  # A row that has seen no key yet keeps m = -inf; shifting by 0 keeps exp2 finite (p = 0).
  m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
  alpha = tl.exp2(m_i - m_safe)
  p = tl.exp2(s - m_safe[:, None])
  l_i = l_i * alpha + tl.sum(p, 1)
  acc = acc * alpha[:, None]
  acc = tl.dot(p.to(v.dtype), v, acc)
  return acc, l_i, m_new


@triton.jit
def _rpa_kernel(q_ptr, k_ptr, v_ptr, kv_lens_ptr, block_tables_ptr, qsl_ptr, blk_req_ptr,
                blk_qb_ptr, splits_ptr, o_init_ptr, num_tokens, max_pages, o_ptr, lse_ptr,
                scale_log2: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr):
  """Grid (query blocks, K, NUM_SPLITS).  Outputs: o (NUM_SPLITS, T, N, D) (q dtype when
  NUM_SPLITS == 1, else float32 partials), lse (NUM_SPLITS, T, N) float32, base 2.
  ``o_init_ptr`` is the aliased input of the prefill launch (never read).  T and M
  (``num_tokens``, ``max_pages``) are runtime scalars so that step buckets share one binary."""
  b = tl.program_id(0)
  kv_head = tl.program_id(1)
  split = tl.program_id(2)
  req = tl.load(blk_req_ptr + b)
  n_split = tl.load(splits_ptr + tl.maximum(req, 0))
  if (req >= 0) & (split < n_split):
    qb = tl.load(blk_qb_ptr + b)
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    kv_len = tl.load(kv_lens_ptr + req)
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    t_req = qb * BLOCK_Q + rows // GROUP                           # token index in the request
    row_ok = (rows < BLOCK_Q * GROUP) & (t_req < q_len)
    head = kv_head * GROUP + rows % GROUP
    row_off = ((q_start + t_req) * (KV_HEADS * GROUP) + head) * HEAD_DIM     # (BLOCK_M,)
    q = tl.load(q_ptr + row_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    pos = kv_len - q_len + t_req                                   # query positions
    pos_lo = kv_len - q_len + qb * BLOCK_Q                         # the block's first position
    kv_hi = tl.minimum(kv_len, pos_lo + BLOCK_Q)                   # keys any row may see
    chunk = tl.cdiv(tl.cdiv(kv_hi, n_split), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, kv_hi)
    # [lo, full_end): whole tiles that every row sees entirely (slot <= pos_lo): no masks.
    full_end = lo + tl.maximum(tl.minimum(hi, pos_lo + 1) - lo, 0) // BLOCK_N * BLOCK_N
    table_row = block_tables_ptr + req * max_pages
    kv_head_off = kv_head * HEAD_DIM
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    for start in range(lo, full_end, BLOCK_N):
      acc, l_i, m_i = _attend_tile(q, acc, l_i, m_i, k_ptr, v_ptr, table_row, start, hi, pos,
                                   kv_head_off, scale_log2, KV_HEADS, HEAD_DIM, PAGE, BLOCK_N,
                                   False)
    for start in range(full_end, hi, BLOCK_N):
      acc, l_i, m_i = _attend_tile(q, acc, l_i, m_i, k_ptr, v_ptr, table_row, start, hi, pos,
                                   kv_head_off, scale_log2, KV_HEADS, HEAD_DIM, PAGE, BLOCK_N,
                                   True)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    o_off = split * (num_tokens * KV_HEADS * GROUP * HEAD_DIM) + row_off
    tl.store(o_ptr + o_off[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    lse_off = (split * num_tokens + q_start + t_req) * (KV_HEADS * GROUP) + head
    tl.store(lse_ptr + lse_off, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Per-step schedules (jnp, traceable) and the split combine
# --------------------------------------------------------------------------------------------

def query_lens(query_start_loc, num_seqs):
  """(S,) new tokens of each request; 0 for padding requests (index >= num_seqs)."""
  s = query_start_loc.shape[0] - 1
  q_lens = (query_start_loc[1:] - query_start_loc[:-1]).astype(jnp.int32)
  return jnp.where(jnp.arange(s) < num_seqs, q_lens, 0)


def decode_schedule(q_lens, decode_block_q: int):
  """Request of each decode program (S,): i where 0 < q_lens[i] <= decode_block_q, else -1."""
  s = q_lens.shape[0]
  short = (q_lens > 0) & (q_lens <= decode_block_q)
  return jnp.where(short, jnp.arange(s, dtype=jnp.int32), -1), jnp.zeros((s,), jnp.int32)


def prefill_blocks_bound(num_tokens: int, max_seqs: int, prefill_block_q: int,
                         decode_block_q: int) -> int:
  """Static upper bound on the query blocks of the requests longer than ``decode_block_q``."""
  return -(-num_tokens // prefill_block_q) + min(max_seqs, num_tokens // (decode_block_q + 1))


def prefill_schedule(q_lens, decode_block_q: int, prefill_block_q: int, num_blocks: int):
  """(request, query block within it) of each prefill program, (num_blocks,) each; -1 = idle."""
  s = q_lens.shape[0]
  nb = jnp.where(q_lens > decode_block_q, -(-q_lens // prefill_block_q), 0)
  ends = jnp.cumsum(nb)
  b = jnp.arange(num_blocks, dtype=jnp.int32)
  req = jnp.minimum(searchsorted_right(ends, b), s - 1)
  busy = b < ends[-1]
  qb = b - (ends - nb)[req]
  return jnp.where(busy, req, -1), jnp.where(busy, qb, 0).astype(jnp.int32)


def split_counts(kv_lens, q_lens, num_seqs, num_kv_heads: int, plan: Plan):
  """(S,) key-range splits of each decode request: enough programs to fill the GPU, at least
  ``MIN_SPLIT_KEYS`` keys per split, at most ``plan.num_splits``."""
  live = jnp.maximum(jnp.sum(q_lens > 0), 1)
  want = -(-plan.target_programs // (live * num_kv_heads))
  by_length = -(-kv_lens // MIN_SPLIT_KEYS)
  return jnp.clip(jnp.minimum(want, by_length), 1, plan.num_splits).astype(jnp.int32)


def combine_splits(o_part, lse, tok_splits, tok_live, dtype):
  """Merge split partials: o_part (NS, T, N, D) f32, lse (NS, T, N) base 2, tok_splits (T,)
  splits of each token's request, tok_live (T,) rows the decode launch owns -> (T, N, D)."""
  ns = o_part.shape[0]
  used = (jnp.arange(ns)[:, None] < tok_splits[None, :])[..., None]         # (NS, T, 1)
  lse = jnp.where(used, lse, -jnp.inf)
  top = jnp.max(lse, axis=0)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  w = jnp.exp2(lse - top)                                                    # (NS, T, N)
  num = jnp.sum(jnp.where(used[..., None], o_part, 0.0) * w[..., None], axis=0)
  den = jnp.sum(w, axis=0)
  out = num / jnp.where(den > 0, den, 1.0)[..., None]
  return jnp.where(tok_live[:, None, None], out, 0.0).astype(dtype)


def token_owner(query_start_loc, num_tokens: int):
  """(T,) request of each query row (clipped into 0..S-1)."""
  s = query_start_loc.shape[0] - 1
  tok = jnp.arange(num_tokens, dtype=jnp.int32)
  return jnp.clip(searchsorted_right(query_start_loc[1:], tok), 0, s - 1)


# --------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------

def _jax_triton_launch(kernel, inputs, out_shapes, *, grid, num_warps, num_stages, alias, zeroed,
                       **constexprs):
  """Launch through jax_triton (imported here: CPU users never need it)."""
  try:
    import jax_triton
  except ImportError as err:
    raise ImportError(f"{_OP}: jax-triton is not importable ({err}); install it with "
                      "`pip install weave_jax[triton]` (jax-triton 0.3.1 for triton 3.6)") from err
  return jax_triton.triton_call(*inputs, kernel=kernel, out_shape=out_shapes, grid=grid,
                                num_warps=num_warps, num_stages=num_stages,
                                input_output_aliases=alias, zeroed_outputs=zeroed, **constexprs)


def _device_traits() -> tuple[int, int]:
  """(SM count, compute capability as 90/80/...) of the first device (defaults off GPU)."""
  dev = jax.devices()[0]
  cc = getattr(dev, "compute_capability", None)
  cc = int(float(cc) * 10) if cc else 90
  return int(getattr(dev, "core_count", 0) or 132), cc


def ragged_paged_attention_triton(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc,
                                  num_seqs, *, sm_scale: float | None = None, launch=None,
                                  **plan_overrides) -> jax.Array:
  """Ragged paged attention with the Triton kernel.  Same arguments and result as
  ``ragged_paged_attention_reference``: returns (T, N, D) in ``q.dtype``.

  Args:
    q: (T, N, D) bfloat16/float16, D in {64, 128}.
    k_pages, v_pages: (P, page, K, D), same dtype as q.
    kv_lens: (S,) int32; block_tables: (S, M) int32; query_start_loc: (S + 1,) int32;
    num_seqs: int32 scalar (traced or not).
    sm_scale: softmax scale (default 1/sqrt(D)).
    launch: kernel launcher (default: ``jax_triton.triton_call``); the CPU tests pass one that
      runs the same kernel in Triton's interpreter.
    plan_overrides: fields of ``Plan`` to override (benchmark sweeps).
  """
  check_shapes(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc)
  t, n, d = q.shape
  num_pages, page, k, _ = k_pages.shape
  s, m = block_tables.shape
  if jnp.dtype(q.dtype) not in DTYPES:
    raise TypeError(f"{_OP}: q dtype {q.dtype} not supported (bfloat16 or float16)")
  if d not in HEAD_DIMS:
    raise ValueError(f"{_OP}: head dim D={d} not supported (one of {HEAD_DIMS})")
  if page < 16 or page & (page - 1):
    raise ValueError(f"{_OP}: page size {page} not supported (a power of two >= 16)")
  if sm_scale is not None and not math.isfinite(sm_scale):
    raise ValueError(f"{_OP}: sm_scale={sm_scale} must be finite")
  if t == 0 or s == 0:
    return jnp.zeros_like(q)
  group = n // k
  num_sms, cc = _device_traits()
  plan = make_plan(t, s, n, k, d, page, m, num_sms=num_sms, compute_capability=cc,
                   **plan_overrides)
  launch = launch or _jax_triton_launch
  scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
  kv_lens = kv_lens.astype(jnp.int32)
  block_tables = block_tables.astype(jnp.int32)
  query_start_loc = query_start_loc.astype(jnp.int32)
  q_lens = query_lens(query_start_loc, num_seqs)
  consts = dict(scale_log2=float(scale * _LOG2E), KV_HEADS=k, GROUP=group, HEAD_DIM=d, PAGE=page,
                BLOCK_N=plan.block_n)
  meta = (kv_lens, block_tables, query_start_loc)

  dq = plan.block_q(plan.decode_block_m, group)
  d_req, d_qb = decode_schedule(q_lens, dq)
  splits = split_counts(kv_lens, q_lens, num_seqs, k, plan)
  ns = plan.num_splits
  part_dtype = q.dtype if ns == 1 else jnp.float32
  o_part, lse = launch(
      _rpa_kernel, [q, k_pages, v_pages, *meta, d_req, d_qb, splits, q, t, m],
      [jax.ShapeDtypeStruct((ns, t, n, d), part_dtype),
       jax.ShapeDtypeStruct((ns, t, n), jnp.float32)],
      grid=(s, k, ns), num_warps=plan.decode_warps, num_stages=plan.num_stages, alias=None,
      zeroed=(0,) if ns == 1 else (), BLOCK_M=plan.decode_block_m, BLOCK_Q=dq, NUM_SPLITS=ns,
      **consts)
  if ns > 1:
    owner = token_owner(query_start_loc, t)
    tok = jnp.arange(t)
    tok_live = ((d_req[owner] >= 0) & (tok >= query_start_loc[owner])
                & (tok < query_start_loc[owner + 1]))
    o_part = combine_splits(o_part, lse, splits[owner], tok_live, q.dtype)[None]
  if t <= dq:                                                      # no request can be longer
    return o_part[0]
  pq = plan.block_q(plan.prefill_block_m, group)
  nb = prefill_blocks_bound(t, s, pq, dq)
  p_req, p_qb = prefill_schedule(q_lens, dq, pq, nb)
  ones = jnp.ones((s,), jnp.int32)
  out, _ = launch(
      _rpa_kernel, [q, k_pages, v_pages, *meta, p_req, p_qb, ones, o_part, t, m],
      [jax.ShapeDtypeStruct((1, t, n, d), q.dtype), jax.ShapeDtypeStruct((1, t, n), jnp.float32)],
      grid=(nb, k, 1), num_warps=plan.prefill_warps, num_stages=plan.num_stages, alias={9: 0},
      zeroed=(), BLOCK_M=plan.prefill_block_m, BLOCK_Q=pq, NUM_SPLITS=1, **consts)
  return out[0]

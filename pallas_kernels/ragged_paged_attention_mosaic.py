"""Ragged paged attention as a Pallas Mosaic GPU kernel (Hopper: TMA + wgmma).

Same inputs, outputs and semantics as ``paged_attention_ref.ragged_paged_attention_reference``
(read its docstring for the layout).  Supported: head dim 64 or 128, page size 16/32/64/128,
bfloat16 or float16 (softmax in float32), any GQA ratio G = N / K.

Work decomposition.  For kv head ``h`` the query rows of request ``i`` are its tokens times the
G query heads that share ``h``, token-major: flat row ``R = t * G + g``.  Each request's rows
are cut into *tiles* of 64 x C rows (C compute warpgroups of 64 rows, the wgmma M), so all G
heads of a kv head, and C * 64 // G tokens, share every K/V page load.  A tile never straddles
two requests; the tile list is built on device by XLA from ``query_start_loc`` (at most
``cdiv(T*G, 64*C) + S`` tiles, a static bound; surplus tiles do no work).  The grid is
(tile, kv head, kv split); one CTA per grid point.

C = 1 (decode-heavy steps): one warpgroup does everything.
  1. TMA-copies the tile's 64 query rows (``q`` regrouped by XLA into (K, tiles*64, D)).
  2. Walks its share of the request's KV range in steps of ``BKV`` slots (``block_kv``: by
     default max(64, page); 128 is faster on prefill-only calls, slower with decodes): each
     step is ``BKV // page`` TMA page copies (page ids read from ``block_tables``) into one slot
     of a ring of ``stages`` (2-3) SMEM buffers; K and V of a slot have their own barrier, so
     QK^T starts while V still lands.  Step ``s + stages`` is issued once step ``s`` is done.
  3. Per step: S = Q K^T (wgmma, f32), mask, online softmax in f32 (exp2), O += P V (wgmma).
  4. Writes O / l (and, with several splits, the log2-sum-exp) of its 64 rows to its own rows
     of a (splits, K, tiles * 64, D) buffer.  XLA then combines the splits (flash-decoding) and
     gathers rows back to (T, N, D): no two CTAs ever write the same row.
C = 2 (prefill-heavy steps): 128-row tiles; two compute warpgroups do 1, 3 and 4 on their 64
  rows each, and a third warpgroup (40 registers) issues the page copies of step 2.  It refills
  a slot's K (V) once both compute warpgroups have arrived on that slot's K-free (V-free)
  barrier, as in jax's FlashAttention-3 example (attention_mgpu.py).

Masking, so that unused or poisoned (NaN) cache slots cannot reach the result:
  * only pages ``< cdiv(kv_len, page)`` of the request are ever read (later page indices of a
    step are clamped to the last used page);
  * a score is kept only where ``key position <= query position`` and ``key < kv_len``; the
    rest are set to -inf *and* their probabilities to 0;
  * on the step that contains ``kv_len``, V rows at positions ``>= kv_len`` are zeroed in SMEM
    before the P V wgmma (0 * NaN would still be NaN);
  * rows fully masked within a split get l = 0, O = 0 and lse = -inf (weight 0 in the combine).

Split-KV (flash-decoding): with fewer (tile, kv head) pairs than the device has SMs and long block
tables, each pair's KV range is cut into ``num_splits`` contiguous step ranges (decided per
tile at run time from its real length), combined afterwards in float32.
"""
from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from pallas_kernels import paged_attention_ref as ref
from pallas_kernels._mosaic_compat import pl, plgpu

_OP = "ragged_paged_attention_mosaic"
HEAD_DIMS = (64, 128)
PAGE_SIZES = (16, 32, 64, 128)
#: Cache slots per pipeline step that the kernel supports (``block_kv``).
BLOCK_KV = (64, 128)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
#: Query rows per compute warpgroup: the wgmma M.
WG_ROWS = 64
#: SMs assumed where the device does not say (H100 SXM and H200).
_DEFAULT_SMS = 132
#: Fewest KV steps a split should own, so that the combine does not dominate.
_MIN_STEPS_PER_SPLIT = 4
_MAX_SPLITS = 32
#: Rows of the tile metadata array (see ``_tile_metadata``).
_META_FIELDS = ("req", "row_off", "pos_base", "kv_len", "kv_end")
_LOG2E = math.log2(math.e)


def check_supported(q, k_pages) -> None:
  """What this kernel supports beyond the reference's checks.  Raises ValueError naming the
  argument."""
  d = q.shape[-1]
  if d not in HEAD_DIMS:
    raise ValueError(f"{_OP}: q head dim {d} not supported (one of {HEAD_DIMS})")
  page = k_pages.shape[1]
  if page not in PAGE_SIZES:
    raise ValueError(f"{_OP}: k_pages page size {page} not supported (one of {PAGE_SIZES})")
  if jnp.dtype(q.dtype) not in DTYPES:
    raise ValueError(f"{_OP}: q dtype {q.dtype} not supported (bfloat16 or float16)")


def _is_concrete(*arrays) -> bool:
  return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def ragged_paged_attention_mosaic(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc,
                                  num_seqs, *, sm_scale: float | None = None,
                                  num_splits: int | None = None,
                                  consumers: int | None = None,
                                  block_kv: int | None = None,
                                  interpret=False) -> jax.Array:
  """Ragged paged attention on Hopper.  Returns (T, N, D) in ``q.dtype``.

  Args:
    q: (T, N, D) bfloat16/float16 query tokens of all requests, request-major.
    k_pages, v_pages: (P, page, K, D) the paged cache, ``q.dtype``.
    kv_lens: (S,) int32 tokens of each request in the cache, this step's included.
    block_tables: (S, M) int32 page ids of each request.
    query_start_loc: (S + 1,) int32 where each request's queries start.
    num_seqs: int32 scalar, requests present (rows >= num_seqs are padding).
    sm_scale: softmax scale; default 1 / sqrt(D).
    num_splits: KV splits per (tile, kv head); None picks one from the static shapes.
    consumers: compute warpgroups per CTA, 1 (64-row tiles) or 2 (128-row tiles, plus a TMA
      producer warpgroup); None picks from the static shapes (``default_consumers``).
    block_kv: cache slots per pipeline step (the N of Q K^T), 64 or 128 and a multiple of the
      page size; None picks ``kv_step(page)``.
    interpret: False, True (run under the Mosaic GPU interpreter, any backend: CPU tests), or
      a ``plgpu.InterpretGPUParams`` with the interpreter's options.

  Metadata values are checked on the host (``check_metadata``) when they are concrete; under
  ``jit`` only shapes and dtypes are checked.
  """
  ref.check_shapes(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc)
  check_supported(q, k_pages)
  if num_splits is not None and (isinstance(num_splits, bool)
                                 or not isinstance(num_splits, (int, np.integer))
                                 or num_splits < 1):
    raise ValueError(f"{_OP}: num_splits={num_splits!r} must be an int >= 1")
  if consumers not in (None, 1, 2):
    raise ValueError(f"{_OP}: consumers={consumers!r} must be 1 or 2")
  page = k_pages.shape[1]
  if block_kv is not None and (block_kv not in BLOCK_KV or block_kv % page):
    raise ValueError(f"{_OP}: block_kv={block_kv!r} must be one of {BLOCK_KV} and a multiple "
                     f"of the page size {page}")
  if sm_scale is not None and not math.isfinite(sm_scale):
    raise ValueError(f"{_OP}: sm_scale={sm_scale} must be finite")
  if _is_concrete(kv_lens, block_tables, query_start_loc, num_seqs):
    ref.check_metadata(kv_lens, block_tables, query_start_loc, int(num_seqs),
                       num_pages=k_pages.shape[0], page_size=k_pages.shape[1],
                       num_tokens=q.shape[0])
  t, n, d = q.shape
  if t == 0 or block_tables.shape[0] == 0:
    return jnp.zeros_like(q)
  scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(d)
  group = n // k_pages.shape[2]
  consumers = consumers or default_consumers(t, block_tables.shape[0], group)
  bkv = int(block_kv) if block_kv is not None else kv_step(page)
  splits = int(num_splits) if num_splits is not None else default_num_splits(
      t, n, k_pages.shape[2], page, block_tables.shape, consumers, block_kv=bkv)
  return _attention(q, k_pages, v_pages, kv_lens.astype(jnp.int32),
                    block_tables.astype(jnp.int32), query_start_loc.astype(jnp.int32),
                    jnp.asarray(num_seqs, jnp.int32), sm_scale=scale, num_splits=splits,
                    consumers=int(consumers), block_kv=bkv, interpret=interpret)


def num_tiles(num_tokens: int, group: int, num_seqs_max: int, tile_rows: int) -> int:
  """Static bound on the tiles of a step: each request adds at most one partial tile."""
  return pl.cdiv(num_tokens * group, tile_rows) + min(num_seqs_max, num_tokens)


def kv_step(page: int) -> int:
  """Cache slots per pipeline step (the wgmma N of Q K^T): whole pages, at least 64."""
  return max(WG_ROWS, page)


def default_consumers(t: int, s: int, group: int) -> int:
  """Two compute warpgroups (128-row tiles sharing every K/V load) when the step averages at
  least 4 query tokens per request slot and fills 128-row tiles (prefill-heavy buckets); one
  otherwise (decode: a second warpgroup would only compute padding rows)."""
  return 2 if t >= 4 * s and t * group >= 4 * 2 * WG_ROWS else 1


def device_sms() -> int:
  """Streaming multiprocessors of the first device (``_DEFAULT_SMS`` where it does not say)."""
  return int(getattr(jax.devices()[0], "core_count", 0) or _DEFAULT_SMS)


def default_num_splits(t: int, n: int, k: int, page: int, block_tables_shape,
                       consumers: int, num_sms: int | None = None,
                       block_kv: int | None = None) -> int:
  """Enough splits to give every SM about two CTAs when the grid has fewer CTAs than SMs and
  the block table is long enough (measured against other split counts: BENCHMARKS.md, paged
  attention kernels)."""
  num_sms = num_sms or device_sms()
  s, m = block_tables_shape
  ctas = num_tiles(t, n // k, s, consumers * WG_ROWS) * k
  max_steps = pl.cdiv(m * page, block_kv or kv_step(page))
  if ctas >= num_sms or max_steps < 2 * _MIN_STEPS_PER_SPLIT:
    return 1
  want = pl.cdiv(2 * num_sms, ctas)
  return int(max(1, min(want, max_steps // _MIN_STEPS_PER_SPLIT, _MAX_SPLITS)))


def _tile_metadata(kv_lens, query_start_loc, num_seqs, *, group: int, tiles: int,
                   tile_rows: int):
  """Per tile (5, tiles) int32 rows ``_META_FIELDS``, and per request tile starts (S + 1,).

  req: the tile's request; row_off: its first row relative to the request's first row (rows
  are ``token * G + g``); pos_base: kv_len - q_len (position of the request's first query
  token); kv_len; kv_end: slots the tile reads (its last row's position + 1).  Tiles past the
  real ones get kv_len = kv_end = 0: they read nothing.
  """
  s = kv_lens.shape[0]
  q_lens = query_start_loc[1:] - query_start_loc[:-1]                       # (S,)
  q_lens = jnp.where(jnp.arange(s) < num_seqs, q_lens, 0)
  rows = q_lens * group
  tile_start = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                                jnp.cumsum(pl.cdiv(rows, tile_rows)).astype(jnp.int32)])
  tid = jnp.arange(tiles, dtype=jnp.int32)
  req = jnp.clip(ref.searchsorted_right(tile_start[1:], tid), 0, s - 1)
  live = tid < tile_start[s]
  row_off = (tid - tile_start[req]) * tile_rows
  pos_base = kv_lens[req] - q_lens[req]
  last_row = row_off + jnp.minimum(tile_rows, rows[req] - row_off) - 1
  kv_end = jnp.minimum(kv_lens[req], pos_base + last_row // group + 1)
  zero = jnp.zeros_like(tid)
  meta = jnp.stack([req, row_off, pos_base, jnp.where(live, kv_lens[req], zero),
                    jnp.where(live, kv_end, zero)])
  return meta.astype(jnp.int32), tile_start


def _num_stages(bkv: int, d: int) -> int:
  """Ring depth: 3 when K + V of three steps take <= 160 KiB of SMEM, else 2."""
  return 3 if 3 * 2 * bkv * d * 2 <= 160 * 1024 else 2


def _kernel(meta_ref, bt_ref, q_ref, k_ref, v_ref, o_ref, *rest, group, page, sm_scale,
            num_splits, stages, consumers):
  """One CTA: tile ``axis_index('tile')``, kv head ``axis_index('head')``, split
  ``axis_index('split')``.  See the module docstring for the protocol."""
  lse_ref = rest[0] if num_splits > 1 else None
  scratch = list(rest[1:] if num_splits > 1 else rest)
  q_smem, k_smem, v_smem = scratch[:3]
  lse_smem = scratch[3] if num_splits > 1 else None
  q_bar, k_bar, v_bar, *free_bars = scratch[4 if num_splits > 1 else 3:]
  tile, head, split = (lax.axis_index(a) for a in ("tile", "head", "split"))
  req, row_off, pos_base, kv_len, kv_end = (meta_ref[f, tile]
                                            for f in range(len(_META_FIELDS)))
  bkv, d = k_smem.shape[1], k_smem.shape[2]
  pages_per_step = bkv // page
  dtype = q_smem.dtype

  n_steps = pl.cdiv(kv_end, jnp.int32(bkv))
  per_split = pl.cdiv(n_steps, jnp.int32(num_splits))
  first = jnp.minimum(split * per_split, n_steps)
  last = jnp.minimum(first + per_split, n_steps)
  used_pages = pl.cdiv(kv_len, jnp.int32(page))

  def page_ids(step):
    """Step ``step``'s page ids (scalar GMEM loads); any step index is safe to read."""
    # Never past the request's last used page: later slots of the step are masked anyway.
    return [bt_ref[req, jnp.minimum(step * pages_per_step + p, used_pages - 1)]
            for p in range(pages_per_step)]

  def issue(step, slot, ids=None, parts=("k", "v")):
    """TMA copies of step ``step``'s pages (ids from ``page_ids``) into ring slot ``slot``."""
    ids = page_ids(step) if ids is None else ids
    for p, page_id in enumerate(ids):
      rows = pl.ds(p * page, page)
      if "k" in parts:
        plgpu.copy_gmem_to_smem(k_ref.at[page_id, :, head], k_smem.at[slot, rows],
                                k_bar.at[slot])
      if "v" in parts:
        plgpu.copy_gmem_to_smem(v_ref.at[page_id, :, head], v_smem.at[slot, rows],
                                v_bar.at[slot])

  def prologue():
    for i in range(stages):
      pl.when(first + i < last)(functools.partial(issue, first + i, i))

  compute = functools.partial(
      _compute_warpgroup, q_ref=q_ref, o_ref=o_ref, lse_ref=lse_ref, q_smem=q_smem,
      k_smem=k_smem, v_smem=v_smem, lse_smem=lse_smem, q_bar=q_bar, k_bar=k_bar, v_bar=v_bar,
      tile=tile, head=head, split=split, row_off=row_off, pos_base=pos_base, kv_len=kv_len,
      first=first, last=last, group=group, sm_scale=sm_scale, stages=stages,
      consumers=consumers, dtype=dtype)
  if consumers == 1:
    prologue()

    def refill(step, slot, ids):
      pl.when(step + stages < last)(functools.partial(issue, step + stages, slot, ids))
    # The refill's page ids are loaded at the top of the step, so their GMEM latency hides
    # behind the step's two wgmmas instead of delaying the refill.
    compute(0, lookahead=lambda step: page_ids(step + stages), release_k=None,
            release_v=refill)
    return

  k_free, v_free = free_bars
  wg = lax.axis_index("wg")

  @pl.when(wg == consumers)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    prologue()

    @pl.loop(first + stages, last)
    def _refill(step):
      slot = lax.rem(step - first, jnp.int32(stages))
      ids = page_ids(step)                      # loaded while the slot is still in use
      plgpu.barrier_wait(k_free.at[slot])       # every compute warpgroup is done with K
      issue(step, slot, ids, ("k",))
      plgpu.barrier_wait(v_free.at[slot])
      issue(step, slot, ids, ("v",))

  @pl.when(wg < consumers)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    compute(wg, lookahead=lambda step: None,
            release_k=lambda step, slot: plgpu.barrier_arrive(k_free.at[slot]),
            release_v=lambda step, slot, _: plgpu.barrier_arrive(v_free.at[slot]))


def _compute_warpgroup(wg, *, lookahead, release_k, release_v, q_ref, o_ref, lse_ref, q_smem,
                       k_smem, v_smem, lse_smem, q_bar, k_bar, v_bar, tile, head, split, row_off,
                       pos_base, kv_len, first, last, group, sm_scale, stages, consumers,
                       dtype):
  """Warpgroup ``wg``'s 64 query rows of the tile over KV steps [first, last): online softmax
  in float32.  Hooks: ``lookahead(step)`` runs at the top of each step; ``release_k(step,
  slot)`` and ``release_v(step, slot, lookahead's result)`` once the warpgroup no longer reads
  the slot's K, V."""
  bkv, d = k_smem.shape[1], k_smem.shape[2]
  q_sub = q_smem.at[wg]
  my_row_off = row_off + wg * WG_ROWS
  rows_out = pl.ds(tile * (consumers * WG_ROWS) + wg * WG_ROWS, WG_ROWS)
  plgpu.copy_gmem_to_smem(q_ref.at[head, rows_out], q_sub, q_bar.at[wg])
  plgpu.barrier_wait(q_bar.at[wg])

  def scores(slot):
    def qk(acc_ref):
      plgpu.wgmma(acc_ref, q_sub, k_smem.at[slot].transpose((1, 0)))
      return acc_ref[...]
    return pl.run_scoped(qk, plgpu.ACC((WG_ROWS, bkv), jnp.float32))

  def allowed(step):
    rows = plgpu.broadcasted_iota(jnp.int32, (WG_ROWS, bkv), 0, layout=plgpu.Layout.WGMMA)
    cols = plgpu.broadcasted_iota(jnp.int32, (WG_ROWS, bkv), 1, layout=plgpu.Layout.WGMMA)
    token = rows + my_row_off if group == 1 else lax.div(rows + my_row_off, jnp.int32(group))
    key = cols + step * bkv
    return (key <= token + pos_base) & (key < kv_len)

  def zero_dead_values(step, slot):
    # Slots >= kv_len may hold NaN; P is 0 there, but 0 * NaN is NaN inside the wgmma.  With
    # two compute warpgroups both rewrite the slot; each writes the same final values.
    v = v_smem.at[slot][...]
    rows = plgpu.broadcasted_iota(jnp.int32, (bkv, d), 0, layout=plgpu.Layout.WGMMA)
    v_smem.at[slot][...] = jnp.where(rows + step * bkv < kv_len, v, jnp.zeros_like(v))
    plgpu.commit_smem()

  def body(step, carry, *, masked: bool):
    acc, m_i, l_i = carry
    slot = lax.rem(step - first, jnp.int32(stages))
    ahead = lookahead(step)
    plgpu.barrier_wait(k_bar.at[slot])
    s = scores(slot) * (sm_scale * _LOG2E)                        # (64, BKV) log2 units
    if release_k is not None:
      release_k(step, slot)
    if masked:
      mask = allowed(step)
      s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m_i, s.max(axis=1))
    # A row with every key so far masked keeps m = -inf; exp2(-inf - -inf) would be NaN.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    alpha = jnp.exp2(m_i - m_safe)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
    if masked:
      p = jnp.where(mask, p, 0.0)
    l_i = l_i * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    plgpu.barrier_wait(v_bar.at[slot])
    if masked:
      pl.when((step + 1) * bkv > kv_len)(functools.partial(zero_dead_values, step, slot))

    def pv(acc_ref):
      plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])
    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    release_v(step, slot, ahead)
    return acc, m_new, l_i

  row_layout = plgpu.Layout.WGMMA.reduce(1)
  acc = plgpu.layout_cast(jnp.zeros((WG_ROWS, d), jnp.float32), plgpu.Layout.WGMMA)
  m_i = plgpu.layout_cast(jnp.full((WG_ROWS,), -jnp.inf, jnp.float32), row_layout)
  l_i = plgpu.layout_cast(jnp.zeros((WG_ROWS,), jnp.float32), row_layout)
  # Steps whose every key is <= this warpgroup's first query position (hence < kv_len) need
  # no mask.  Every warpgroup still consumes every step of [first, last).
  unmasked_end = jnp.clip(lax.div(pos_base + lax.div(my_row_off, jnp.int32(group)) + 1,
                                  jnp.int32(bkv)), first, last)
  carry = lax.fori_loop(first, unmasked_end, functools.partial(body, masked=False),
                        (acc, m_i, l_i))
  acc, m_i, l_i = lax.fori_loop(unmasked_end, last, functools.partial(body, masked=True), carry)

  empty = l_i == 0.0
  inv_l = 1.0 / jnp.where(empty, 1.0, l_i)
  q_sub[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
  if lse_smem is not None:
    lse_smem.at[wg][...] = jnp.where(empty, -jnp.inf,
                                     m_i + jnp.log2(jnp.where(empty, 1.0, l_i)))
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_sub, o_ref.at[split, head, rows_out])
  if lse_smem is not None:
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[split, head, rows_out])
  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("sm_scale", "num_splits", "consumers",
                                             "block_kv", "interpret"))
def _attention(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc, num_seqs, *,
               sm_scale: float, num_splits: int, consumers: int, block_kv: int, interpret):
  t, n, d = q.shape
  _, page, k, _ = k_pages.shape
  s = block_tables.shape[0]
  group = n // k
  tile_rows = consumers * WG_ROWS
  tiles = num_tiles(t, group, s, tile_rows)
  bkv = block_kv
  stages = _num_stages(bkv, d)
  meta, tile_start = _tile_metadata(kv_lens, query_start_loc, num_seqs, group=group,
                                    tiles=tiles, tile_rows=tile_rows)
  q_tiles = _tile_rows(q, meta, query_start_loc, group=group, tiles=tiles, tile_rows=tile_rows)

  swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  out_type = [jax.ShapeDtypeStruct((num_splits, k, tiles * tile_rows, d), q.dtype)]
  scratch = [plgpu.SMEM((consumers, WG_ROWS, d), q.dtype, transforms=swizzled),
             plgpu.SMEM((stages, bkv, d), q.dtype, transforms=swizzled),
             plgpu.SMEM((stages, bkv, d), q.dtype, transforms=swizzled)]
  if num_splits > 1:
    out_type.append(jax.ShapeDtypeStruct((num_splits, k, tiles * tile_rows), jnp.float32))
    scratch.append(plgpu.SMEM((consumers, WG_ROWS), jnp.float32))
  pages_per_step = bkv // page
  scratch += [plgpu.Barrier(num_arrivals=1, num_barriers=consumers),
              plgpu.Barrier(num_arrivals=pages_per_step, num_barriers=stages),
              plgpu.Barrier(num_arrivals=pages_per_step, num_barriers=stages)]
  threads = {}
  if consumers > 1:
    # Slot-free barriers: every compute warpgroup arrives once per step; one more warpgroup
    # issues the TMA copies.
    scratch += [plgpu.Barrier(num_arrivals=consumers, num_barriers=stages)] * 2
    threads = dict(num_threads=consumers + 1, thread_name="wg")
  kernel = functools.partial(_kernel, group=group, page=page, sm_scale=sm_scale,
                             num_splits=num_splits, stages=stages, consumers=consumers)
  outs = plgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch,
      grid=(tiles, k, num_splits), grid_names=("tile", "head", "split"), **threads,
      compiler_params=plgpu.CompilerParams(approx_math=True),
      # The Mosaic GPU interpreter (simulated SMEM, TMA and barriers); plain True would pick
      # the generic Pallas interpreter, which cannot run TMA copies.
      interpret=plgpu.InterpretGPUParams() if interpret is True else interpret,
  )(meta, block_tables, q_tiles, k_pages, v_pages)
  return _gather_rows(outs, tile_start, query_start_loc, num_seqs, q.shape,
                      tile_rows=tile_rows)


def _tile_rows(q, meta, query_start_loc, *, group: int, tiles: int, tile_rows: int):
  """(T, N, D) -> (K, tiles * tile_rows, D): row r of tile j holds query row ``row_off_j + r``
  of the tile's request (token ``(row_off_j + r) // G``, head ``(row_off_j + r) % G`` of each
  kv head); rows past the request are 0.  Every tile starts at a multiple of 64 rows, which
  the TMA copy into a swizzled (8, 64)-tiled SMEM tile needs."""
  t, n, d = q.shape
  k = n // group
  req, row_off = meta[0], meta[1]                                              # (tiles,)
  local = row_off[:, None] + jnp.arange(tile_rows)[None, :]                    # (tiles, rows)
  q_lens = query_start_loc[req + 1] - query_start_loc[req]
  live = (local < (q_lens * group)[:, None]) & (meta[3] > 0)[:, None]
  token = jnp.clip(query_start_loc[req][:, None] + local // group, 0, t - 1)
  g = local % group
  heads = jnp.arange(k)[:, None, None] * group + g[None]                       # (K, tiles, rows)
  rows = q[token[None], heads]                                                 # (K, tiles, rows, D)
  rows = jnp.where(live[None, :, :, None], rows, jnp.zeros((), q.dtype))
  return rows.reshape(k, tiles * tile_rows, d)


def _gather_rows(outs, tile_start, query_start_loc, num_seqs, q_shape, *, tile_rows: int):
  """(splits, K, tiles*rows, D) tile rows (+ (splits, K, tiles*rows) log2-sum-exp) ->
  (T, N, D), combining the splits in float32; padding tokens get 0."""
  t, n, d = q_shape
  o = outs[0]
  k = o.shape[1]
  group = n // k
  req, offset, valid = ref.token_requests(query_start_loc, num_seqs, t)     # (T,) each
  local = offset[:, None] * group + jnp.arange(group)[None, :]               # (T, G)
  row = tile_start[req][:, None] * tile_rows + local
  row = jnp.clip(row, 0, o.shape[2] - 1)
  heads = jnp.arange(k)[None, :, None]
  rows = row[:, None, :]                                                     # (T, 1, G)
  parts = o[:, heads, rows]                                                  # (splits, T, K, G, D)
  if len(outs) == 1:
    out = parts[0].astype(jnp.float32)
  else:
    lse = outs[1][:, heads, rows]                                            # (splits, T, K, G)
    top = jnp.max(lse, axis=0)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp2(lse - top)                                                  # -inf -> 0
    w = w / jnp.maximum(jnp.sum(w, axis=0), jnp.finfo(jnp.float32).tiny)
    out = jnp.sum(jnp.where(w[..., None] > 0, w[..., None] * parts.astype(jnp.float32), 0.0),
                  axis=0)
  out = jnp.where(valid[:, None, None, None], out, 0.0)
  return out.reshape(t, n, d).astype(o.dtype)


def _example_step(seed, q_lens, kv_lens, *, n, k, d, page, dtype=jnp.bfloat16):
  """Random (q, k_pages, v_pages, kv_lens, block_tables, query_start_loc, num_seqs): pages
  shuffled over a pool with 16 spare pages."""
  rng = np.random.default_rng(seed)
  kv = np.asarray(kv_lens, np.int32)
  used = -(-kv // page)
  width = int(used.max())
  pool = int(used.sum()) + 16
  perm = rng.permutation(pool).astype(np.int32)
  bt = np.zeros((len(kv), width), np.int32)
  ends = np.cumsum(used)
  for i, (u, e) in enumerate(zip(used, ends)):
    bt[i, :u] = perm[e - u:e]
  qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (int(qsl[-1]), n, d), dtype)
  kp = jax.random.normal(keys[1], (pool, page, k, d), dtype)
  vp = jax.random.normal(keys[2], (pool, page, k, d), dtype)
  return q, kp, vp, jnp.asarray(kv), jnp.asarray(bt), jnp.asarray(qsl), jnp.int32(len(kv))


def _run_example():
  """Times the kernel (whole call: XLA tile regrouping, kernel, split combine) on serving-like
  steps on the default GPU, and prints its max error against the float32 reference where the
  reference fits in memory."""
  if jax.default_backend() != "gpu":
    raise SystemExit(f"{_OP}: _run_example needs a GPU, default backend is "
                     f"{jax.default_backend()!r}")
  steps = [  # (name, q_lens, kv_lens, N, K, D, page, consumers)
      ("decode 64 x 1k, G8 d128 p16", [1] * 64, [1024] * 64, 32, 4, 128, 16, None),
      ("decode 8 x 8k, G8 d128 p16", [1] * 8, [8192] * 8, 32, 4, 128, 16, None),
      ("decode 8 x 8k, G4 d64 p64", [1] * 8, [8192] * 8, 16, 4, 64, 64, None),
      ("2k chunk + 32 decodes, 1 WG", [2048] + [1] * 32, [2048] + [700] * 32, 32, 4, 128, 16, 1),
      ("2k chunk + 32 decodes, 2 WG", [2048] + [1] * 32, [2048] + [700] * 32, 32, 4, 128, 16, 2),
      ("4 x 512 G1 d128 p128, 1 WG", [512] * 4, [1024] * 4, 8, 8, 128, 128, 1),
      ("4 x 512 G1 d128 p128, 2 WG", [512] * 4, [1024] * 4, 8, 8, 128, 128, 2),
  ]
  print(f"{_OP} on {jax.devices()[0].device_kind}")
  for name, q_lens, kv_lens, n, k, d, page, consumers in steps:
    fast = jax.jit(functools.partial(ragged_paged_attention_mosaic, consumers=consumers))
    args = _example_step(len(name), q_lens, kv_lens, n=n, k=k, d=d, page=page)
    out = jax.block_until_ready(fast(*args))
    t, width = args[0].shape[0], args[4].shape[1]
    if t * width * page * k * d * 4 * 2 <= 4 * 2 ** 30:        # the reference's gathered K, V
      want = ref.ragged_paged_attention_reference(*args)
      err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - want.astype(jnp.float32))))
      err_text = f"max|err| {err:.3g}"
    else:
      err_text = "max|err| n/a (reference too large)"
    # Each run enqueues `batch` calls and waits once, so host dispatch overlaps the GPU work.
    runs, batch, times = 20, 10, []
    for _ in range(runs):
      t0 = time.perf_counter()
      jax.block_until_ready([fast(*args) for _ in range(batch)])
      times.append((time.perf_counter() - t0) / batch)
    us = float(np.median(times)) * 1e6
    kv_bytes = 2 * sum(kv_lens) * k * d * args[0].dtype.itemsize
    print(f"  {name:<34} {us:9.1f} us  KV {kv_bytes / us / 1e3:7.1f} GB/s  {err_text}"
          f"  nan={bool(jnp.isnan(out).any())}")


if __name__ == "__main__":
  _run_example()

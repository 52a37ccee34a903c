"""Host side of a step: check the scheduled chunks, build the metadata with vectorised numpy and
pack everything into ONE int32 buffer (one ``device_put`` per step).

A step's real tokens are the chunks' ``token_ids`` back to back (n tokens, chunk order).  The
program sees them as one half (unsplit: rows [0, n) of T) or two (woven: real tokens [0, s) in
half A's rows [0, s), real tokens [s, n) in half B's rows [T_A, T_A + n - s)); every half is
padded to its static row count with tokens whose slot is -1 (they write nowhere).

Per half (vLLM V1 names; S_h = the half's sequence capacity, M = pages per block-table row)::

    tokens, positions, slots   (T_h,)       int32; slot = page * page_size + row, -1 padding;
                                            token -(r + 1): row r of the previous step's samples
    query_start_loc            (S_h + 1,)   int32
    kv_lens                    (S_h,)       int32  cached + new tokens seen by this half
    block_tables               (S_h, M)     int32
    num_seqs                   (1,)         int32

and for sampling (R rows = the chunks with ``sample``, padded)::

    sample_rows (R,) int32 (row of the program's concatenated halves), temperature (R,) f32,
    top_k (R,) int32, top_p (R,) f32, seeds (R,) uint32, steps (R,) int32

float32 / uint32 fields travel bit-cast inside the int32 buffer.  Every field starts at a
multiple of ``FIELD_ALIGN`` int32s (256 bytes): XLA may hand a field to a custom call as a view
into the buffer rather than a copy, and the Mosaic GPU attention kernel refuses inputs that are
not 256-byte aligned.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from weave_jax.serve import sampler

FIELD_ALIGN = 64            # int32s: 256 bytes
_HALF_FIELDS = ("tokens", "positions", "slots", "query_start_loc", "kv_lens", "block_tables",
                "num_seqs")
# The sampler's inputs (sampler.sample's arguments after the logits), in its argument order.
SAMPLING_FIELDS = (("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32),
                   ("seeds", np.uint32), ("steps", np.int32))
_SAMPLE_FIELDS = (("sample_rows", np.int32),) + SAMPLING_FIELDS


@dataclasses.dataclass(frozen=True)
class Limits:
  """What the runner was built for; every chunk is checked against it before launch."""
  vocab_size: int
  page_size: int
  num_pages: int
  max_model_len: int
  max_num_batched_tokens: int
  max_num_seqs: int

  @property
  def pages_per_seq(self) -> int:
    return math.ceil(self.max_model_len / self.page_size)


@dataclasses.dataclass(frozen=True)
class StepShape:
  """Static shapes of one compiled step program (its compile key)."""
  bucket: int              # T: padded token rows
  split: int | None        # rows of half A (woven), or None (unsplit)
  max_num_seqs: int
  pages_per_seq: int       # M

  @property
  def half_rows(self) -> tuple[int, ...]:
    return (self.bucket,) if self.split is None else (self.split, self.bucket - self.split)

  def half_seqs(self, rows: int) -> int:
    return min(rows, self.max_num_seqs)

  @property
  def sample_rows(self) -> int:
    return min(self.bucket, self.max_num_seqs)

  def fields(self) -> list[tuple[str, tuple[int, ...], type]]:
    """(name, shape, dtype) of every packed field, in buffer order."""
    out = []
    for h, rows in enumerate(self.half_rows):
      s, m = self.half_seqs(rows), self.pages_per_seq
      shapes = ((rows,), (rows,), (rows,), (s + 1,), (s,), (s, m), (1,))
      out += [(f"{name}{h}", shape, np.int32) for name, shape in zip(_HALF_FIELDS, shapes)]
    out += [(name, (self.sample_rows,), dt) for name, dt in _SAMPLE_FIELDS]
    return out

  @functools.cached_property
  def _layout(self) -> tuple[list[int], int]:
    """(offsets, size): where each field of ``fields()`` starts (multiples of FIELD_ALIGN) and
    the buffer's length.  Computed once per shape: ``pack`` asks for it every step."""
    offsets, off = [], 0
    for _, shape, _ in self.fields():
      offsets.append(off)
      end = off + math.prod(shape)
      off = -(-end // FIELD_ALIGN) * FIELD_ALIGN
    return offsets, end

  def offsets(self) -> list[int]:
    return self._layout[0]

  def size(self) -> int:
    return self._layout[1]


def unpack(shape: StepShape, buf: jax.Array) -> dict[str, jax.Array]:
  """Device side: the packed (size,) int32 buffer -> named fields (bit-cast back)."""
  out = {}
  for (name, shp, dt), off in zip(shape.fields(), shape.offsets()):
    x = buf[off:off + math.prod(shp)].reshape(shp)
    if dt != np.int32:
      x = jax.lax.bitcast_convert_type(x, jnp.dtype(dt))
    out[name] = x
  return out


@dataclasses.dataclass
class Batch:
  """A step's chunks as flat, checked arrays (C chunks, n real tokens)."""
  tokens: np.ndarray          # (n,)
  positions: np.ndarray       # (n,)
  slots: np.ndarray           # (n,)
  starts: np.ndarray          # (C,)
  cu: np.ndarray              # (C + 1,) cumulative q_lens
  block_tables: np.ndarray    # (C, M)
  sample: np.ndarray          # (C,) bool
  is_decode: bool             # every chunk is one token after a non-empty cache

  @property
  def num_tokens(self) -> int:
    return int(self.cu[-1])


def _first(mask: np.ndarray) -> int | None:
  bad = np.flatnonzero(mask)
  return int(bad[0]) if bad.size else None


def _name(chunks, i: int) -> str:
  return f"chunks[{i}] (request {chunks[i].request_id})"


def check_and_flatten(chunks: Sequence, limits: Limits, prev_rows: int = 0) -> Batch:
  """Validate the scheduled chunks (ValueError naming the chunk and the field) and flatten
  them.  Nothing has launched when this raises.

  A negative token id ``-(r + 1)`` is a placeholder: the token sampled in row ``r`` of the
  previous step submitted to the runner, which sampled ``prev_rows`` rows (the program reads
  it on device)."""
  if not chunks:
    raise ValueError("ModelRunner.execute: chunks is empty")
  c = len(chunks)
  if c > limits.max_num_seqs:
    raise ValueError(f"ModelRunner.execute: {c} chunks exceed max_num_seqs={limits.max_num_seqs}")
  token_ids = [np.asarray(ch.token_ids) for ch in chunks]
  # One pass over the chunks' Python attributes; everything after is vectorised.
  meta = np.array([(t.size, t.ndim, ch.start, len(ch.block_table), ch.request_id, ch.rng_step,
                    bool(ch.sample)) for t, ch in zip(token_ids, chunks)], np.int64)
  q_lens, ndims, starts, bt_lens, ids, rng_steps, sample = meta.T
  i = _first(ndims != 1)
  if i is not None:
    raise ValueError(f"ModelRunner.execute: {_name(chunks, i)}.token_ids must be 1-D, got shape "
                     f"{token_ids[i].shape}")
  n = int(q_lens.sum())
  if n > limits.max_num_batched_tokens:
    raise ValueError(f"ModelRunner.execute: {n} tokens exceed max_num_batched_tokens="
                     f"{limits.max_num_batched_tokens}")
  ends = starts + q_lens
  checks = (
      (q_lens < 1, lambda i: "token_ids is empty"),
      (starts < 0, lambda i: f"start={starts[i]} is negative"),
      (ends > limits.max_model_len,
       lambda i: f"start + q_len = {starts[i]} + {q_lens[i]} exceeds max_model_len="
                 f"{limits.max_model_len}"),
      (bt_lens * limits.page_size < ends,
       lambda i: f"block_table is too short: {bt_lens[i]} pages x {limits.page_size} < "
                 f"{ends[i]} tokens (start + q_len)"),
      (rng_steps < 0, lambda i: f"rng_step={rng_steps[i]} is negative"),
  )
  for mask, message in checks:
    i = _first(mask)
    if i is not None:
      raise ValueError(f"ModelRunner.execute: {_name(chunks, i)}: {message(i)}")
  if np.unique(ids).size != c:
    raise ValueError(f"ModelRunner.execute: a request appears twice in one step: ids "
                     f"{ids.tolist()}")
  tokens = np.concatenate(token_ids)
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"ModelRunner.execute: token_ids must be integers, got {tokens.dtype}")
  i = _first((tokens < -prev_rows) | (tokens >= limits.vocab_size))
  if i is not None:
    req = int(np.searchsorted(np.cumsum(q_lens), i, side="right"))
    if tokens[i] < 0:
      raise ValueError(f"ModelRunner.execute: {_name(chunks, req)}: placeholder token "
                       f"{tokens[i]} reads row {-tokens[i] - 1} of the previous step's samples, "
                       f"which had {prev_rows}")
    raise ValueError(f"ModelRunner.execute: {_name(chunks, req)}: token id {tokens[i]} outside "
                     f"the vocabulary [0, {limits.vocab_size})")
  block_tables = _block_table_matrix(chunks, bt_lens, limits)
  used = -(-ends // limits.page_size)
  cols = np.arange(block_tables.shape[1])[None, :]
  bad_page = (cols < used[:, None]) & ((block_tables < 0) | (block_tables >= limits.num_pages))
  i = _first(bad_page.any(axis=1))
  if i is not None:
    raise ValueError(f"ModelRunner.execute: {_name(chunks, i)}: block_table holds page ids "
                     f"outside the pool [0, {limits.num_pages}): "
                     f"{block_tables[i][bad_page[i]][:4].tolist()}")
  cu = np.zeros(c + 1, np.int64)
  np.cumsum(q_lens, out=cu[1:])
  req = np.repeat(np.arange(c), q_lens)
  positions = starts[req] + np.arange(n) - cu[req]
  page = block_tables[req, positions // limits.page_size]
  slots = page * limits.page_size + positions % limits.page_size
  if np.unique(slots).size != n:
    # Two tokens would overwrite each other's keys and values (the step's page writes are
    # declared unique to XLA, too).
    values, counts = np.unique(slots, return_counts=True)
    dup = int(values[counts > 1][0])
    owners = sorted({int(ids[r]) for r in req[slots == dup]})
    raise ValueError(f"ModelRunner.execute: two tokens write cache slot {dup} (page "
                     f"{dup // limits.page_size}, row {dup % limits.page_size}); requests "
                     f"{owners} share a page they both write")
  return Batch(tokens.astype(np.int32), positions.astype(np.int32), slots.astype(np.int32),
               starts.astype(np.int32), cu.astype(np.int32), block_tables, sample.astype(bool),
               bool(np.all(q_lens == 1) and np.all(starts > 0)))


def _block_table_matrix(chunks, bt_lens, limits: Limits) -> np.ndarray:
  """(C, M) int32: each chunk's block table, cut to M pages (the rest cannot be addressed under
  max_model_len), zero-padded (padding entries are never read: kv_lens masks them)."""
  m = limits.pages_per_seq
  flat = np.concatenate([ch.block_table for ch in chunks]).astype(np.int64)
  rows = np.repeat(np.arange(len(chunks)), bt_lens)
  offsets = np.zeros(len(chunks), np.int64)
  np.cumsum(bt_lens[:-1], out=offsets[1:])
  cols = np.arange(flat.size) - offsets[rows]
  keep = cols < m
  out = np.zeros((len(chunks), m), np.int64)
  out[rows[keep], cols[keep]] = flat[keep]
  return out.astype(np.int32)


def _half_fields(batch: Batch, lo: int, hi: int, rows: int, seqs: int, m: int) -> list:
  """The seven half fields for real tokens [lo, hi) padded to ``rows`` / ``seqs``."""
  cu = batch.cu
  first, last = np.clip(cu[:-1], lo, hi), np.clip(cu[1:], lo, hi)
  present = np.flatnonzero(last > first)
  used = present.size
  qsl = np.zeros(seqs + 1, np.int32)
  np.cumsum(last[present] - first[present], out=qsl[1:used + 1])
  qsl[used + 1:] = qsl[used]
  kv_lens = np.zeros(seqs, np.int32)
  kv_lens[:used] = batch.starts[present] + last[present] - cu[present]
  tables = np.zeros((seqs, m), np.int32)
  tables[:used] = batch.block_tables[present]
  tokens, positions = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
  slots = np.full(rows, -1, np.int32)
  tokens[:hi - lo] = batch.tokens[lo:hi]
  positions[:hi - lo] = batch.positions[lo:hi]
  slots[:hi - lo] = batch.slots[lo:hi]
  return [tokens, positions, slots, qsl, kv_lens, tables, np.array([used], np.int32)]


def pack(batch: Batch, shape: StepShape, real_split: int | None, chunks: Sequence,
         seeds: Sequence[int]) -> np.ndarray:
  """The step's packed (size,) int32 buffer.  ``real_split``: real tokens in half A (woven)."""
  n = batch.num_tokens
  bounds = [(0, n)] if shape.split is None else [(0, real_split), (real_split, n)]
  values = []
  for (lo, hi), rows in zip(bounds, shape.half_rows):
    if hi - lo > rows:
      raise ValueError(f"step_inputs.pack: {hi - lo} tokens do not fit a half of {rows} rows")
    values += _half_fields(batch, lo, hi, rows, shape.half_seqs(rows), shape.pages_per_seq)
  which = np.flatnonzero(batch.sample)
  last = batch.cu[which + 1] - 1                                  # real index of the last token
  if shape.split is not None:
    last = np.where(last < real_split, last, shape.split + last - real_split)
  rows = np.zeros(shape.sample_rows, np.int32)
  rows[:which.size] = last
  params = [chunks[i].params for i in which]
  temperature, top_k, top_p, seed = sampler.param_arrays(params, [seeds[i] for i in which],
                                                         shape.sample_rows)
  steps = np.zeros(shape.sample_rows, np.int32)
  steps[:which.size] = [chunks[i].rng_step for i in which]
  values += [rows, temperature, top_k, top_p, seed, steps]
  buf = np.zeros(shape.size(), np.int32)
  for v, off in zip(values, shape.offsets()):
    flat = v.reshape(-1).view(np.int32)
    buf[off:off + flat.size] = flat
  return buf


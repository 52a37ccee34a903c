"""Shared by the serving benchmarks in run/: the block tables of a made-up decode batch."""
from __future__ import annotations

import numpy as np


def decode_block_tables(batch: int, pages_per_seq: int, num_pages: int, extra_pages: int = 0):
  """Block tables of ``batch`` decode requests of ``pages_per_seq`` pages each, from page 0 up,
  leaving ``extra_pages`` for another chunk.  Each request gets its own consecutive pages when
  the pool holds them all; otherwise the requests share their prefix pages and only the last
  page, which the step writes, is per request.  Returns (tables (int32 arrays), the first page
  after them, shared); ValueError when even shared prefix pages do not fit."""
  shared = batch * pages_per_seq + extra_pages > num_pages
  if shared and pages_per_seq - 1 + batch + extra_pages > num_pages:
    raise ValueError(f"decode batch {batch} of {pages_per_seq} pages each: even with shared "
                     f"prefix pages it needs more than the {num_pages} pages of the cache")
  if shared:
    prefix = np.arange(pages_per_seq - 1)
    tables = [np.append(prefix, pages_per_seq - 1 + i) for i in range(batch)]
    next_page = pages_per_seq - 1 + batch
  else:
    tables = [np.arange(i * pages_per_seq, (i + 1) * pages_per_seq) for i in range(batch)]
    next_page = batch * pages_per_seq
  return [t.astype(np.int32) for t in tables], next_page, shared

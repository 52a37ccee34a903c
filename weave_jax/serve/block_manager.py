"""Page allocation for the paged KV cache: a free list of page ids, pages handed out as requests
grow and returned when they finish or are preempted.

Page ``p`` holds cache slots ``p * page_size .. p * page_size + page_size - 1``; a request's
token at position ``s`` lives in page ``block_table[s // page_size]``, row ``s % page_size``.
"""
from __future__ import annotations

import collections

from weave_jax.serve.sequence import Sequence


def pages_for(num_tokens: int, page_size: int) -> int:
  return -(-num_tokens // page_size)


class BlockManager:
  """``num_pages`` pages of ``page_size`` token slots."""

  def __init__(self, num_pages: int, page_size: int):
    if num_pages <= 0 or page_size <= 0:
      raise ValueError(f"BlockManager: num_pages={num_pages} and page_size={page_size} must be "
                       "positive")
    self.num_pages, self.page_size = num_pages, page_size
    self._free = collections.deque(range(num_pages))
    self._owner: dict[int, int] = {}            # page id -> request id (catches double use)

  @property
  def num_free_pages(self) -> int:
    return len(self._free)

  def pages_missing(self, seq: Sequence, num_tokens: int) -> int:
    """Pages ``seq`` still needs so that its block table covers ``num_tokens`` tokens."""
    return max(0, pages_for(num_tokens, self.page_size) - len(seq.block_table))

  def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
    return self.pages_missing(seq, num_tokens) <= len(self._free)

  def grow(self, seq: Sequence, num_tokens: int) -> None:
    """Append pages to ``seq.block_table`` until it covers ``num_tokens`` tokens."""
    missing = self.pages_missing(seq, num_tokens)
    if missing > len(self._free):
      raise RuntimeError(f"BlockManager: request {seq.request_id} needs {missing} pages, "
                         f"{len(self._free)} free (call can_grow first)")
    for _ in range(missing):
      page = self._free.popleft()
      self._owner[page] = seq.request_id
      seq.block_table.append(page)

  def free(self, seq: Sequence) -> None:
    """Return all of ``seq``'s pages to the free list."""
    for page in seq.block_table:
      if self._owner.pop(page, None) != seq.request_id:
        raise RuntimeError(f"BlockManager: page {page} freed by request {seq.request_id}, "
                           "which does not own it")
      self._free.append(page)
    seq.block_table = []
    seq._table_array = None

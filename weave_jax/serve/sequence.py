"""One request as the scheduler sees it: its tokens, how many of them the cache holds, its pages.

A request's tokens are its prompt followed by what it generated so far.  ``num_computed_tokens``
counts the leading tokens whose K/V are in the cache; the last generated token is never there
yet (the next decode step computes it).  While a step is in flight, its sampled token is a
placeholder at the end of ``output_token_ids`` (a negative id, ``Scheduler.reserve``), so that
the next step can be planned before the token is known; ``num_pending`` counts them.
Preemption by recompute sets ``num_computed_tokens`` back to 0 and frees the pages: the request
is then re-prefilled over prompt + output.
"""
from __future__ import annotations

import enum
import time

import numpy as np

from weave_jax.serve.sampling_params import SamplingParams


class Status(enum.Enum):
  WAITING = "waiting"
  RUNNING = "running"
  FINISHED = "finished"


class Sequence:
  """A request: ``prompt_token_ids`` + ``output_token_ids``, its page ids, timings."""

  def __init__(self, request_id: int, prompt_token_ids: list[int], params: SamplingParams):
    self.request_id = request_id
    self.prompt_token_ids = list(prompt_token_ids)
    self.output_token_ids: list[int] = []
    self.output_logprobs: list[float] = []
    self.params = params
    self.status = Status.WAITING
    self.num_computed_tokens = 0
    self.block_table: list[int] = []       # page ids, in token order
    self._table_array: np.ndarray | None = None
    self.num_pending = 0                   # trailing placeholder tokens (steps in flight)
    self.finishing = False                 # a step in flight ends it by length: plan no more
    self.finish_reason: str | None = None  # "stop" (EOS / stop token) or "length"
    self.num_preemptions = 0
    self.arrival_time = time.perf_counter()
    self.first_token_time: float | None = None
    self.finish_time: float | None = None

  def __repr__(self):
    return (f"Sequence(id={self.request_id}, {self.status.value}, prompt={self.num_prompt_tokens}, "
            f"out={len(self.output_token_ids)}, computed={self.num_computed_tokens}, "
            f"pages={len(self.block_table)})")

  @property
  def num_prompt_tokens(self) -> int:
    return len(self.prompt_token_ids)

  @property
  def num_tokens(self) -> int:
    return len(self.prompt_token_ids) + len(self.output_token_ids)

  @property
  def sampled_token_ids(self) -> list[int]:
    """The generated tokens known so far (placeholders of steps in flight left out)."""
    return self.output_token_ids[:len(self.output_token_ids) - self.num_pending]

  @property
  def num_uncomputed_tokens(self) -> int:
    """Tokens whose K/V the next steps must compute (1 for a decode)."""
    return self.num_tokens - self.num_computed_tokens

  @property
  def is_decode(self) -> bool:
    return bool(self.output_token_ids) and self.num_uncomputed_tokens == 1

  def token_slice(self, start: int, stop: int) -> list[int]:
    """Tokens [start, stop) of prompt + output (without building the whole list: a decode
    reads one token of a long sequence every step)."""
    p = len(self.prompt_token_ids)
    if stop <= p:
      return self.prompt_token_ids[start:stop]
    if start >= p:
      return self.output_token_ids[start - p:stop - p]
    return self.prompt_token_ids[start:] + self.output_token_ids[:stop - p]

  def block_table_array(self) -> np.ndarray:
    """``block_table`` as int32, rebuilt only when pages were added or freed since."""
    if self._table_array is None or self._table_array.size != len(self.block_table):
      self._table_array = np.asarray(self.block_table, np.int32)
    return self._table_array

  @property
  def is_finished(self) -> bool:
    return self.status is Status.FINISHED

  def ttft(self) -> float | None:
    """Seconds from arrival to the first generated token."""
    return None if self.first_token_time is None else self.first_token_time - self.arrival_time

  def tpot(self) -> float | None:
    """Mean seconds per output token after the first (None with fewer than two tokens)."""
    n = len(self.output_token_ids)
    if n < 2 or self.finish_time is None or self.first_token_time is None:
      return None
    return (self.finish_time - self.first_token_time) / (n - 1)

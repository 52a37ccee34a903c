"""Which requests run in the next step, as vLLM V1 decides it: continuous batching over a token
budget, with chunked prefill and preemption by recompute.

Each step has ``max_num_batched_tokens`` tokens to give out:

1. Running requests first, decodes before partial prefills (each in admission order): a decode
   takes 1 token, a prefill the rest of its uncomputed tokens, cut to what the budget has left.
   A request whose new tokens need a page when none is free preempts the newest running request
   (its pages freed, its chunk of this step dropped, back to the head of the waiting queue; it is
   later re-prefilled over prompt + output: recompute), until the page fits or it has preempted
   itself.
2. Then, unless something was preempted this step, waiting requests in arrival order while the
   budget lasts, fewer than ``max_num_seqs`` run and the pages of their first chunk are free.

No deadlock: a request that could not fit the whole cache alone is refused when it is added, and
the oldest running request can always preempt every newer one.

Steps may be planned one ahead (asynchronous scheduling, as vLLM's): ``reserve`` advances the
requests of a submitted step before its tokens are known, each sampling request getting a
placeholder token that the next step's program reads from this step's samples on device;
``update`` later puts the real tokens in place and finishes what is done.  A request that the
step in flight ends by length is not planned again; one that it ends by EOS or a stop token
may be (its extra token is dropped).
"""
from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np

from weave_jax.checks import positive_int
from weave_jax.serve.block_manager import BlockManager, pages_for
from weave_jax.serve.runner import ScheduledChunk
from weave_jax.serve.sampling_params import SamplingParams
from weave_jax.serve.sequence import Sequence, Status


@dataclasses.dataclass
class SchedulerOutput:
  chunks: list[ScheduledChunk]
  seqs: list[Sequence]         # the request of each chunk
  preempted: list[Sequence]    # requests sent back to waiting in this step
  # Per chunk, where ``reserve`` put its placeholder in the request's output (None: the chunk
  # does not sample); None until reserved.
  placeholders: list[int | None] | None = None

  @property
  def num_tokens(self) -> int:
    return sum(c.token_ids.size for c in self.chunks)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  num_pages: int
  page_size: int
  max_model_len: int
  max_num_batched_tokens: int = 2048
  max_num_seqs: int = 256

  def __post_init__(self):
    for name in ("num_pages", "page_size", "max_model_len", "max_num_batched_tokens",
                 "max_num_seqs"):
      positive_int("SchedulerConfig", name, getattr(self, name))


class Scheduler:
  """Requests (``Sequence``) move waiting -> running -> finished; ``schedule`` plans a step,
  ``update`` applies what the step sampled."""

  def __init__(self, config: SchedulerConfig, *, vocab_size: int, eos_token_ids=()):
    self.config = config
    self.vocab_size = vocab_size
    self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
    self.blocks = BlockManager(config.num_pages, config.page_size)
    self.waiting: collections.deque[Sequence] = collections.deque()
    self.running: list[Sequence] = []       # admission order: the last is the newest
    self.num_preemptions = 0

  # --- admission -----------------------------------------------------------------------------

  def check_request(self, prompt_token_ids, params) -> list[int]:
    """The prompt as a list of ints, or ValueError/TypeError naming what is wrong."""
    if not isinstance(params, SamplingParams):
      raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
    ids = np.asarray(prompt_token_ids)
    if ids.ndim != 1:
      raise ValueError(f"prompt token ids must be a flat list, got shape {ids.shape}")
    if ids.size == 0:
      raise ValueError("empty prompt (0 tokens)")
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"prompt token ids must be integers, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= self.vocab_size)
    if bad.any():
      i = int(np.argmax(bad))
      raise ValueError(f"prompt token id {int(ids[i])} at position {i} is outside the "
                       f"vocabulary [0, {self.vocab_size})")
    cfg = self.config
    if ids.size > cfg.max_model_len:
      raise ValueError(f"prompt of {ids.size} tokens is longer than max_model_len="
                       f"{cfg.max_model_len}")
    bad_stop = [t for t in params.stop_token_ids if t >= self.vocab_size]
    if bad_stop:
      raise ValueError(f"stop_token_ids {bad_stop} are outside the vocabulary "
                       f"[0, {self.vocab_size})")
    # The last sampled token never enters the cache: the request finishes on it.
    kv_tokens = min(ids.size + params.max_tokens - 1, cfg.max_model_len)
    need = pages_for(kv_tokens, cfg.page_size)
    if need > cfg.num_pages:
      raise ValueError(f"request needs {need} pages ({kv_tokens} tokens of cache: prompt "
                       f"{ids.size} + max_tokens {params.max_tokens} - 1) but the cache has "
                       f"{cfg.num_pages} pages of {cfg.page_size} tokens; it could never run")
    return ids.astype(np.int64).tolist()

  def add(self, seq: Sequence) -> None:
    """Queue a request (``check_request`` has accepted its prompt and params)."""
    seq.status = Status.WAITING
    self.waiting.append(seq)

  @property
  def has_unfinished(self) -> bool:
    return bool(self.waiting or self.running)

  # --- one step ------------------------------------------------------------------------------

  def schedule(self) -> SchedulerOutput:
    """Plan the next step (module docstring).  Pages are allocated here; ``update`` must follow
    with the step's result before the next ``schedule``."""
    budget = self.config.max_num_batched_tokens
    planned: dict[int, tuple[Sequence, int]] = {}     # request id -> (seq, q_len), in order
    preempted: list[Sequence] = []
    decode = [s.is_decode for s in self.running]
    order = ([s for s, d in zip(self.running, decode) if d]
             + [s for s, d in zip(self.running, decode) if not d])
    for seq in order:
      if seq.status is not Status.RUNNING or seq.finishing:   # preempted earlier in this step,
        continue                                              # or ended by the step in flight
      if budget == 0:
        break
      n = min(seq.num_uncomputed_tokens, budget)
      while not self.blocks.can_grow(seq, seq.num_computed_tokens + n):
        victim = self.running[-1]
        entry = planned.pop(victim.request_id, None)
        if entry is not None:
          budget += entry[1]
        self._preempt(victim)
        preempted.append(victim)
        if victim is seq:
          break
      if seq.status is not Status.RUNNING:
        continue
      self.blocks.grow(seq, seq.num_computed_tokens + n)
      planned[seq.request_id] = (seq, n)
      budget -= n
    if not preempted:
      budget = self._admit(budget, planned)
    return self._output(planned, preempted)

  def _admit(self, budget: int, planned: dict) -> int:
    while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
      seq = self.waiting[0]
      n = min(seq.num_uncomputed_tokens, budget)
      if not self.blocks.can_grow(seq, n):
        break
      self.waiting.popleft()
      self.blocks.grow(seq, n)
      seq.status = Status.RUNNING
      self.running.append(seq)
      planned[seq.request_id] = (seq, n)
      budget -= n
    return budget

  def _preempt(self, seq: Sequence) -> None:
    self.running.remove(seq)
    self.blocks.free(seq)
    seq.num_computed_tokens = 0
    seq.status = Status.WAITING
    seq.num_preemptions += 1
    self.num_preemptions += 1
    self.waiting.appendleft(seq)

  def _output(self, planned: dict, preempted: list[Sequence]) -> SchedulerOutput:
    entries = [(seq, n, n == 1 and seq.is_decode) for seq, n in planned.values()]
    entries = [e for e in entries if e[2]] + [e for e in entries if not e[2]]
    chunks, seqs = [], []
    for seq, n, _ in entries:
      start = seq.num_computed_tokens
      chunks.append(ScheduledChunk(
          request_id=seq.request_id,
          token_ids=np.asarray(seq.token_slice(start, start + n), np.int32),
          start=start,
          block_table=seq.block_table_array(),
          sample=start + n == seq.num_tokens,
          params=seq.params,
          rng_step=len(seq.output_token_ids)))
      seqs.append(seq)
    return SchedulerOutput(chunks, seqs, preempted)

  def reserve(self, out: SchedulerOutput) -> None:
    """Advance the requests of a submitted step before its result is known: each chunk's
    tokens count as computed, and each sampling chunk's request gets a placeholder token,
    ``-(row + 1)`` with ``row`` its rank among the step's sampling chunks (the row of the
    step's samples that the next step's program reads it from).  A request whose placeholder
    reaches ``max_tokens`` or ``max_model_len`` is marked ``finishing``: nothing more is
    planned for it."""
    if out.placeholders is not None:
      raise RuntimeError("Scheduler.reserve: this step is already reserved")
    out.placeholders = []
    row = 0
    for chunk, seq in zip(out.chunks, out.seqs):
      seq.num_computed_tokens = chunk.start + chunk.token_ids.size
      if not chunk.sample:
        out.placeholders.append(None)
        continue
      seq.output_token_ids.append(-(row + 1))
      seq.num_pending += 1
      out.placeholders.append(len(seq.output_token_ids) - 1)
      row += 1
      if self._ends_by_length(seq, len(seq.output_token_ids)):
        seq.finishing = True

  def update(self, out: SchedulerOutput, tokens, logprobs=None) -> list[Sequence]:
    """Apply a step's result (``reserve`` first, if the step was not reserved): put the sampled
    tokens in place of their placeholders, finish and free what is done.  ``tokens`` /
    ``logprobs``: (len(out.chunks),).  Returns the requests that received a token, in chunk
    order."""
    if out.placeholders is None:
      self.reserve(out)
    now = time.perf_counter()
    grew = []
    for i, (seq, at) in enumerate(zip(out.seqs, out.placeholders)):
      if at is None or seq.is_finished:        # not sampling, or aborted since
        continue
      token = int(tokens[i])
      seq.output_token_ids[at] = token
      seq.num_pending -= 1
      if seq.params.logprobs and logprobs is not None:
        seq.output_logprobs.append(float(logprobs[i]))
      if seq.first_token_time is None:
        seq.first_token_time = now
      grew.append(seq)
      reason = self._finish_reason(seq, token, at + 1)
      if reason is not None:
        self._finish(seq, reason, now)
    return grew

  def _ends_by_length(self, seq: Sequence, num_output: int) -> bool:
    """Whether ``num_output`` generated tokens end the request by length."""
    return (num_output >= seq.params.max_tokens
            or seq.num_prompt_tokens + num_output >= self.config.max_model_len)

  def _finish_reason(self, seq: Sequence, token: int, num_output: int) -> str | None:
    """Why the request ends on its ``num_output``-th generated token ``token``, or None."""
    params = seq.params
    if not params.ignore_eos and token in self.eos_token_ids:
      return "stop"
    if token in params.stop_token_ids:
      return "stop"
    if self._ends_by_length(seq, num_output):
      return "length"
    return None

  def abort(self, seq: Sequence) -> None:
    """Drop an unfinished request: its pages freed, finish_reason "abort"."""
    if not seq.is_finished:
      self._finish(seq, "abort", time.perf_counter())

  def _finish(self, seq: Sequence, reason: str, now: float) -> None:
    """Take a running or waiting request out of its queue (a waiting one holds no pages) and
    drop its placeholders: a step in flight still computes them, and its update skips the
    request.  Its pages go back now: a later step that reuses them runs after the steps in
    flight."""
    del seq.output_token_ids[len(seq.output_token_ids) - seq.num_pending:]
    seq.num_pending = 0
    if seq.status is Status.RUNNING:
      self.running.remove(seq)
      self.blocks.free(seq)
    else:
      self.waiting.remove(seq)
    seq.finish_reason = reason
    seq.finish_time = now
    seq.status = Status.FINISHED

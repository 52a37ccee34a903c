"""The offline serving API, vLLM's ``LLM``: requests in, generated tokens out, through the
scheduler (``scheduler.py``) and the model runner (``runner.py``).

    llm = LLM("path/to/hf_model", tp=2)                 # or a preset name: random weights
    outs = llm.generate(["Hello", "The sky"], SamplingParams(temperature=0, max_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason, outs[0].metrics.ttft
    for delta in llm.stream(prompts, params):           # tokens as they come
      print(delta.index, delta.text, end="")

A model directory holds ``config.json`` + safetensors, its tokenizer (``tokenizer.json`` read
with ``tokenizers``, else ``transformers.AutoTokenizer``) and its EOS ids
(``generation_config.json``, else ``config.json``).  A preset (``weave_jax.PRESETS``) or a
``ModelConfig`` gets random weights, no tokenizer (prompts are token ids) and no EOS.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import time
from typing import Iterator, Sequence as Seq

import jax
import numpy as np

from weave_jax.config import ModelConfig, preset, PRESETS
from weave_jax.engine import RunConfig
from weave_jax.init import init_random
from weave_jax.model import Transformer
from weave_jax.serve.runner import ModelRunner
from weave_jax.serve.sampling_params import SamplingParams
from weave_jax.serve.scheduler import Scheduler, SchedulerConfig
from weave_jax.serve.sequence import Sequence
from weave_jax.sharding import make_mesh

DEFAULT_MAX_MODEL_LEN = 4096


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
  """Seconds (``time.perf_counter``): ttft = first token - arrival; tpot = mean gap between
  output tokens after the first (None with fewer than two tokens)."""
  arrival_time: float
  first_token_time: float | None
  finish_time: float | None
  ttft: float | None
  tpot: float | None
  num_preemptions: int


@dataclasses.dataclass(frozen=True)
class RequestOutput:
  request_id: int
  prompt: str | None                 # the text, when the prompt was given as text
  prompt_token_ids: list[int]
  text: str | None                   # None without a tokenizer
  token_ids: list[int]
  finish_reason: str                 # "stop" (EOS / stop token) or "length"
  logprobs: list[float] | None       # with SamplingParams(logprobs=True)
  metrics: RequestMetrics


@dataclasses.dataclass(frozen=True)
class StreamDelta:
  """What one request gained since its last delta."""
  index: int                         # position in the prompts given to ``stream``
  request_id: int
  token_ids: list[int]               # new tokens
  text: str | None                   # new text (held back while it ends inside a character)
  finished: bool
  finish_reason: str | None


# --- model, tokenizer, EOS -------------------------------------------------------------------

def _load_model(model, mesh, dtype: str | None, seed: int):
  """(Transformer, model directory or None) from a directory, a preset name, a ModelConfig or a
  Transformer already on ``mesh`` (shared, e.g. by the variants of a benchmark)."""
  if isinstance(model, Transformer):
    if dtype is not None and dtype != model.cfg.dtype:
      raise ValueError(f"LLM: dtype={dtype!r} differs from the given model's {model.cfg.dtype!r}")
    return model, None
  if isinstance(model, ModelConfig):
    cfg = model if dtype is None else model.replace(dtype=dtype)
    return init_random(cfg, mesh, seed), None
  if not isinstance(model, (str, os.PathLike)):
    raise TypeError(f"LLM: model must be a directory, a preset name, a ModelConfig or a "
                    f"Transformer, got "
                    f"{type(model).__name__}")
  path = os.fspath(model)
  if os.path.isdir(path):
    from weave_jax.weights import load_hf_checkpoint
    return load_hf_checkpoint(path, mesh, dtype=dtype or "bfloat16"), path
  if path in PRESETS:
    cfg = preset(path) if dtype is None else preset(path, dtype=dtype)
    return init_random(cfg, mesh, seed), None
  raise ValueError(f"LLM: model {path!r} is neither a directory nor a preset "
                   f"({sorted(PRESETS)})")


def load_tokenizer(directory: str | None):
  """``tokenizers.Tokenizer`` from tokenizer.json, else ``transformers.AutoTokenizer``, else
  None (no tokenizer files)."""
  if directory is None:
    return None
  path = os.path.join(directory, "tokenizer.json")
  if os.path.exists(path):
    import tokenizers
    return tokenizers.Tokenizer.from_file(path)
  if any(os.path.exists(os.path.join(directory, f))
         for f in ("tokenizer_config.json", "tokenizer.model", "vocab.json")):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(directory)
  return None


def _encode(tokenizer, text: str) -> list[int]:
  if hasattr(tokenizer, "encode") and hasattr(tokenizer, "get_vocab_size"):   # tokenizers
    return list(tokenizer.encode(text).ids)
  return list(tokenizer(text)["input_ids"])


def _decode(tokenizer, ids: list[int]) -> str:
  return tokenizer.decode(ids, skip_special_tokens=True)


def read_eos_token_ids(directory: str | None) -> tuple[int, ...]:
  """EOS ids from generation_config.json, else config.json (an int or a list); () if none."""
  if directory is None:
    return ()
  for name in ("generation_config.json", "config.json"):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      eos = json.load(f).get("eos_token_id")
    if eos is not None:
      return tuple(int(t) for t in (eos if isinstance(eos, list) else [eos]))
  return ()


# --- the engine ----------------------------------------------------------------------------------

class LLM:
  """A model served by continuous batching.

  Args:
    model: a Hugging Face directory (config.json + safetensors), a preset name (random
      weights), a ``ModelConfig`` (random weights) or a ``Transformer`` already sharded on
      the mesh of ``tp`` devices.
    tp: tensor-parallel size (default: every local device).
    backend: communication backend (``weave_jax.comm``); None = ``fused_p2p`` on GPUs at
      TP > 1, else ``psum``.
    weave: split large mixed steps into two overlapped halves (``RunConfig.weave``).
    dtype: parameter dtype (default: bfloat16 for a directory, the preset's own otherwise).
    seed: random weights' seed, and the sampling seed of requests that give none.
    max_model_len: longest prompt + output (default: the model's max_position_embeddings, at
      most 4096).
    eos_token_ids: override the model's EOS ids.
    run: a whole RunConfig instead of backend / weave / weave_min_tokens / paged_attention.
    async_scheduling: plan and submit step k + 1 before step k's tokens return, so the host's
      work for a step overlaps the device's previous one (the next step reads the sampled
      tokens on device; ``Scheduler.reserve``).  False: each step waits for its tokens.
    **engine options: page_size, num_pages, memory_fraction, max_num_batched_tokens (2048),
      max_num_seqs (256), weave_min_tokens, paged_attention, compile_ahead
      (``ModelRunner``'s arguments).
  """

  def __init__(self, model, *, tp: int | None = None, backend: str | None = None,
               weave: bool = True, dtype: str | None = None, seed: int = 0,
               max_model_len: int | None = None, eos_token_ids: Seq[int] | None = None,
               weave_min_tokens: int | None = None, paged_attention: str = "auto",
               run: RunConfig | None = None, page_size: int = 16, num_pages: int | None = None,
               memory_fraction: float = 0.9, max_num_batched_tokens: int = 2048,
               max_num_seqs: int = 256, compile_ahead: bool = True,
               async_scheduling: bool = True):
    if not isinstance(async_scheduling, bool):
      raise TypeError(f"LLM: async_scheduling must be a bool, got {async_scheduling!r}")
    self.mesh = make_mesh(tp)
    self.tp = self.mesh.shape["tp"]
    self.model, self.directory = _load_model(model, self.mesh, dtype, seed)
    self.cfg = self.model.cfg
    if run is None:
      if backend is None:
        backend = "fused_p2p" if self.tp > 1 and jax.default_backend() == "gpu" else "psum"
      run = RunConfig(backend=backend, weave=weave, weave_min_tokens=weave_min_tokens,
                      paged_attention=paged_attention)
    self.run = run
    self.max_model_len = max_model_len or self._default_max_model_len()
    self.tokenizer = load_tokenizer(self.directory)
    eos = eos_token_ids if eos_token_ids is not None else read_eos_token_ids(self.directory)
    self.eos_token_ids = tuple(int(t) for t in eos)
    self.runner = ModelRunner(self.model, self.mesh, run, page_size=page_size,
                              num_pages=num_pages, memory_fraction=memory_fraction,
                              max_model_len=self.max_model_len,
                              max_num_batched_tokens=max_num_batched_tokens,
                              max_num_seqs=max_num_seqs, seed=seed, compile_ahead=compile_ahead)
    self.scheduler = Scheduler(
        SchedulerConfig(self.runner.num_pages, page_size, self.max_model_len,
                        max_num_batched_tokens, max_num_seqs),
        vocab_size=self.cfg.vocab_size, eos_token_ids=self.eos_token_ids)
    self.async_scheduling = async_scheduling
    self._in_flight: tuple | None = None     # (SchedulerOutput, PendingStep) submitted, not applied
    self._ids = itertools.count()
    self._requests: dict[int, _Request] = {}
    self.step_log: list[tuple[str, int, int, float]] = []   # (kind, tokens, seqs, seconds)

  def _default_max_model_len(self) -> int:
    if self.directory is not None:
      with open(os.path.join(self.directory, "config.json")) as f:
        limit = json.load(f).get("max_position_embeddings")
      if limit:
        return min(int(limit), DEFAULT_MAX_MODEL_LEN)
    return DEFAULT_MAX_MODEL_LEN

  # --- requests ------------------------------------------------------------------------------

  def _tokens_of(self, prompt) -> tuple[str | None, list[int]]:
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError("a text prompt needs a tokenizer; this model has none (a preset or a "
                         "directory without tokenizer files): pass token ids")
      return prompt, _encode(self.tokenizer, prompt)
    if isinstance(prompt, (list, tuple, np.ndarray)):
      return None, prompt
    raise TypeError(f"a prompt must be a string or a list of token ids, got "
                    f"{type(prompt).__name__}")

  def add_request(self, prompt, params: SamplingParams | None = None) -> int:
    """Queue one request (text or token ids); returns its request id.  A bad request raises
    ValueError here and nothing else changes: the requests already queued keep running."""
    params = SamplingParams() if params is None else params
    text, ids = self._tokens_of(prompt)
    return self._enqueue(text, self.scheduler.check_request(ids, params), params)

  def _enqueue(self, text: str | None, ids: list[int], params: SamplingParams) -> int:
    """Queue a checked request (``Scheduler.check_request`` accepted it); returns its id."""
    rid = next(self._ids)
    seq = Sequence(rid, ids, params)
    self._requests[rid] = _Request(seq, text)
    self.scheduler.add(seq)
    return rid

  @property
  def has_unfinished(self) -> bool:
    """Requests waiting or running.  A step in flight counts through its live requests, which
    are running (or preempted: waiting); one whose requests all ended only has tokens to drop."""
    return self.scheduler.has_unfinished

  def step(self) -> list[int]:
    """Plan and submit one step, then apply the results of the step before it (with
    ``async_scheduling``; without, of this one); returns the ids of the requests that got a
    token."""
    t = time.perf_counter()
    out = self.scheduler.schedule()
    submitted = None
    if out.chunks:
      submitted = (out, self.runner.submit(out.chunks))
      self.scheduler.reserve(out)
    if self.async_scheduling:
      done, self._in_flight = self._in_flight, submitted
    else:
      done = submitted
    if done is None:
      if submitted is None and self.scheduler.has_unfinished:
        raise RuntimeError(f"LLM.step: nothing schedulable with {len(self.scheduler.waiting)} "
                           "waiting requests (scheduler invariant broken)")
      return []
    done_out, pending = done
    result = self.runner.collect(pending)
    grew = self.scheduler.update(done_out, result.tokens, result.logprobs)
    self.step_log.append((result.kind, done_out.num_tokens, len(done_out.chunks),
                          time.perf_counter() - t))
    return [s.request_id for s in grew]

  def output(self, request_id: int) -> RequestOutput:
    """The finished request's output; forgets it."""
    req = self._requests.get(request_id)
    if req is None:
      raise KeyError(f"LLM.output: no request {request_id} (never added, or already returned)")
    if not req.seq.is_finished:
      raise ValueError(f"LLM.output: request {request_id} has not finished")
    del self._requests[request_id]
    return req.output(self.tokenizer)

  def abort(self, request_id: int) -> None:
    """Stop a request and forget it (its pages go back to the pool)."""
    req = self._requests.pop(request_id, None)
    if req is not None:
      self.scheduler.abort(req.seq)

  # --- batch API --------------------------------------------------------------------------------

  def _add_all(self, prompts, sampling_params, where: str) -> list[int]:
    prompts = _as_prompt_list(prompts)
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
      params = [sampling_params or SamplingParams()] * len(prompts)
    else:
      params = list(sampling_params)
      if len(params) != len(prompts):
        raise ValueError(f"{where}: {len(params)} SamplingParams for {len(prompts)} prompts")
    checked = []
    for i, (prompt, p) in enumerate(zip(prompts, params)):   # all checked before any runs
      try:
        text, ids = self._tokens_of(prompt)
        checked.append((text, self.scheduler.check_request(ids, p), p))
      except (ValueError, TypeError) as e:
        raise type(e)(f"{where}: request {i}: {e}") from None
    return [self._enqueue(text, tokens, p) for text, tokens, p in checked]

  def generate(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
               *, progress: bool = True) -> list[RequestOutput]:
    """Generate for every prompt (a string, a list of token ids, or a list of either);
    ``sampling_params``: one for all or one per prompt.  Every request is checked before any
    runs (ValueError naming the request index).  Returns outputs in prompt order."""
    ids = self._add_all(prompts, sampling_params, "LLM.generate")
    bar = _Progress(len(ids), self) if progress else None
    pending = set(ids)
    while pending:
      for rid in self.step():
        if self._requests[rid].seq.is_finished:
          pending.discard(rid)
      if bar:
        bar.update(len(ids) - len(pending))
    if bar:
      bar.close()
    return [self.output(i) for i in ids]

  def stream(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None
             ) -> Iterator[StreamDelta]:
    """Like ``generate``, but yields each request's new tokens (and text) after every step;
    a request's last delta has ``finished`` set.  ``index`` is the prompt's position.  Closing
    the iterator early aborts the requests it has not finished."""
    ids = self._add_all(prompts, sampling_params, "LLM.stream")
    index = {rid: i for i, rid in enumerate(ids)}
    pending = set(ids)
    try:
      while pending:
        for rid in sorted(set(self.step()) & pending):
          delta = self._requests[rid].delta(self.tokenizer, index[rid])
          yield delta
          if delta.finished:
            pending.discard(rid)
            self._requests.pop(rid)
    finally:
      for rid in pending:
        self.abort(rid)

  def stats(self) -> dict:
    """Steps run per kind (``steps_by_kind``) and the preemptions so far."""
    out = steps_by_kind(self.step_log)
    out["preemptions"] = self.scheduler.num_preemptions
    return out


def steps_by_kind(step_log) -> dict:
  """{kind: {"steps", "tokens", "seconds"}} summed over ``LLM.step_log`` entries (kind
  "woven" / "unsplit" / "decode")."""
  out: dict = {}
  for kind, tokens, _, seconds in step_log:
    k = out.setdefault(kind, {"steps": 0, "tokens": 0, "seconds": 0.0})
    k["steps"] += 1
    k["tokens"] += tokens
    k["seconds"] += seconds
  return out


def _as_prompt_list(prompts) -> list:
  if isinstance(prompts, str):
    return [prompts]
  if isinstance(prompts, np.ndarray):
    return [prompts] if prompts.ndim == 1 else list(prompts)
  prompts = list(prompts)
  if prompts and isinstance(prompts[0], (int, np.integer)):
    return [prompts]                             # one prompt of token ids
  return prompts


class _Request:
  """A request's sequence plus what has been delivered of it (streaming)."""

  def __init__(self, seq: Sequence, prompt_text: str | None):
    self.seq, self.prompt_text = seq, prompt_text
    self.sent_tokens = 0
    self.sent_text = ""

  def delta(self, tokenizer, index: int) -> StreamDelta | None:
    seq = self.seq
    sampled = seq.sampled_token_ids
    new = sampled[self.sent_tokens:]
    if not new:
      return None
    self.sent_tokens = len(sampled)
    text = None
    if tokenizer is not None:
      full = _decode(tokenizer, sampled)
      if not seq.is_finished and full.endswith("\ufffd"):    # a character cut mid-bytes
        full = self.sent_text
      text, self.sent_text = full[len(self.sent_text):], full
    return StreamDelta(index, seq.request_id, new, text, seq.is_finished, seq.finish_reason)

  def output(self, tokenizer) -> RequestOutput:
    seq = self.seq
    metrics = RequestMetrics(seq.arrival_time, seq.first_token_time, seq.finish_time, seq.ttft(),
                             seq.tpot(), seq.num_preemptions)
    text = None if tokenizer is None else _decode(tokenizer, seq.output_token_ids)
    return RequestOutput(seq.request_id, self.prompt_text, list(seq.prompt_token_ids), text,
                         list(seq.output_token_ids), seq.finish_reason,
                         list(seq.output_logprobs) if seq.params.logprobs else None, metrics)


class _Progress:
  """One stderr line, rewritten at most twice a second: requests done, token rates."""

  def __init__(self, total: int, llm: LLM):
    self.total, self.llm = total, llm
    self.t0 = self.last = time.perf_counter()
    self.first_step = len(llm.step_log)

  def _line(self, done: int) -> str:
    log = self.llm.step_log[self.first_step:]
    dt = max(time.perf_counter() - self.t0, 1e-9)
    tokens = sum(x[1] for x in log)
    return (f"\r[generate] {done}/{self.total} requests | {len(log)} steps | "
            f"{tokens / dt:,.0f} tok/s | {dt:.1f} s")

  def update(self, done: int) -> None:
    now = time.perf_counter()
    if now - self.last >= 0.5 or done == self.total:
      self.last = now
      sys.stderr.write(self._line(done))
      sys.stderr.flush()

  def close(self) -> None:
    sys.stderr.write("\n")
    sys.stderr.flush()

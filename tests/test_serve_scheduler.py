"""The scheduler and the page allocator against a fake runner (no model).

The fake runner keeps a token id in every cache slot: it writes each chunk's tokens through the
chunk's block table and, when a chunk samples, reads the request's whole sequence back through
the block table and hashes it into the next token.  A page handed to two live requests, a wrong
``start``, or a recompute that skips a token changes what it reads, so outputs that equal the
request's stand-alone reference prove the bookkeeping.
"""
import numpy as np
import pytest

from weave_jax.serve.sampling_params import SamplingParams
from weave_jax.serve.scheduler import Scheduler, SchedulerConfig
from weave_jax.serve.sequence import Sequence, Status

VOCAB = 97
EOS = 3


def next_token(tokens) -> int:
  t = np.asarray(tokens, np.int64)
  return int((np.sum((np.arange(t.size) + 1) * t) * 2654435761 + t.size) % VOCAB)


class FakeRunner:
  def __init__(self, num_pages: int, page_size: int):
    self.page_size = page_size
    self.slots = np.full(num_pages * page_size, -1, np.int64)
    self.steps = []                       # per step: list of (request_id, start, q_len, sample)
    self.prev: list[int] = []             # the last call's samples, in sampling-chunk order
    self.placeholders = 0                 # placeholder tokens seen

  def _slots(self, chunk, stop):
    pos = np.arange(stop)
    pages = chunk.block_table[pos // self.page_size]
    return pages * self.page_size + pos % self.page_size

  def execute(self, chunks):
    """Tokens sampled per chunk.  A placeholder token -(r + 1) is the token sampled in row r
    (r-th sampling chunk) of the previous call, as the real runner reads it on device."""
    self.steps.append([(c.request_id, c.start, c.token_ids.size, c.sample) for c in chunks])
    self.placeholders += sum(int((c.token_ids < 0).sum()) for c in chunks)
    out = np.zeros(len(chunks), np.int32)
    for i, c in enumerate(chunks):
      stop = c.start + c.token_ids.size
      assert c.block_table.size * self.page_size >= stop
      tokens = np.asarray(c.token_ids, np.int64)
      assert (tokens >= -len(self.prev)).all(), "a placeholder past the previous step's rows"
      tokens = np.where(tokens < 0, np.asarray(self.prev + [0])[np.maximum(-tokens - 1, 0)],
                        tokens)
      self.slots[self._slots(c, stop)[c.start:]] = tokens
    for i, c in enumerate(chunks):
      if c.sample:
        out[i] = next_token(self.slots[self._slots(c, c.start + c.token_ids.size)])
    self.prev = [int(out[i]) for i, c in enumerate(chunks) if c.sample]
    return out


def reference(prompt, params: SamplingParams, max_model_len: int, eos=EOS):
  tokens, out = list(prompt), []
  while True:
    t = next_token(tokens)
    tokens.append(t)
    out.append(t)
    if (not params.ignore_eos and t == eos) or t in params.stop_token_ids:
      return out, "stop"
    if len(out) >= params.max_tokens or len(tokens) >= max_model_len:
      return out, "length"


def make(num_pages=64, page_size=4, max_model_len=64, budget=16, max_seqs=8):
  cfg = SchedulerConfig(num_pages, page_size, max_model_len, budget, max_seqs)
  return Scheduler(cfg, vocab_size=VOCAB, eos_token_ids=(EOS,)), FakeRunner(num_pages, page_size)


def add(sched, prompt, params=SamplingParams(max_tokens=5), rid=[0]):
  rid[0] += 1
  seq = Sequence(rid[0], sched.check_request(prompt, params), params)
  sched.add(seq)
  return seq


def check_step(sched, out):
  cfg = sched.config
  assert out.num_tokens <= cfg.max_num_batched_tokens
  assert len(out.chunks) <= cfg.max_num_seqs
  ids = [c.request_id for c in out.chunks]
  assert len(set(ids)) == len(ids)
  decode = [c.token_ids.size == 1 and c.start > 0 and c.sample and c.start >= s.num_prompt_tokens
            for c, s in zip(out.chunks, out.seqs)]
  assert decode == sorted(decode, reverse=True), "decodes must come before prefill chunks"
  pages = [p for s in sched.running for p in s.block_table]
  assert len(pages) == len(set(pages)), "a page is owned by two requests"
  assert len(pages) + sched.blocks.num_free_pages == cfg.num_pages


def run_all(sched, runner, max_steps=100000):
  for _ in range(max_steps):
    if not sched.has_unfinished:
      return
    out = sched.schedule()
    check_step(sched, out)
    if out.chunks:
      sched.update(out, runner.execute(out.chunks))
  raise AssertionError("scheduler did not finish")


def run_pipelined(sched, runner, max_steps=100000):
  """Asynchronous scheduling as LLM.step does it: step k + 1 is planned and submitted (and
  reserved) before step k's tokens are applied."""
  in_flight = None
  for _ in range(max_steps):
    if not sched.has_unfinished and in_flight is None:
      return
    out = sched.schedule()
    check_step(sched, out)
    submitted = None
    if out.chunks:
      submitted = (out, runner.execute(out.chunks))
      sched.reserve(out)
    if in_flight is not None:
      sched.update(*in_flight)
    in_flight = submitted
  raise AssertionError("scheduler did not finish")


def test_chunked_prefill_samples_only_at_the_end():
  sched, runner = make(budget=8)
  seq = add(sched, list(range(10, 30)), SamplingParams(max_tokens=3, ignore_eos=True))
  run_all(sched, runner)
  assert [s[0][1:] for s in runner.steps] == [(0, 8, False), (8, 8, False), (16, 4, True),
                                             (20, 1, True), (21, 1, True)]
  assert (seq.output_token_ids, seq.finish_reason) == reference(seq.prompt_token_ids, seq.params,
                                                                64)


def test_budget_goes_to_decodes_first_then_prefill():
  sched, runner = make(budget=8)
  first = [add(sched, [5, 6, 7], SamplingParams(max_tokens=10, ignore_eos=True)) for _ in range(3)]
  out = sched.schedule()                       # three prompts of 3 tokens fill 8 of 8 tokens
  assert [c.token_ids.size for c in out.chunks] == [3, 3, 2]
  sched.update(out, runner.execute(out.chunks))
  late = add(sched, list(range(1, 30)), SamplingParams(max_tokens=2))
  out = sched.schedule()
  # two decodes, then the unfinished prompt of the third, then the new prompt with the rest
  assert [(c.request_id, c.token_ids.size) for c in out.chunks] == [
      (first[0].request_id, 1), (first[1].request_id, 1), (first[2].request_id, 1),
      (late.request_id, 5)]
  assert [c.sample for c in out.chunks] == [True, True, True, False]


def test_max_num_seqs_caps_the_batch():
  sched, runner = make(max_seqs=3, budget=64)
  seqs = [add(sched, [1, 2, 4], SamplingParams(max_tokens=4, ignore_eos=True)) for _ in range(7)]
  out = sched.schedule()
  assert len(out.chunks) == 3 and len(sched.waiting) == 4
  sched.update(out, runner.execute(out.chunks))
  run_all(sched, runner)
  assert max(len(s) for s in runner.steps) == 3
  for s in seqs:
    assert (s.output_token_ids, s.finish_reason) == reference(s.prompt_token_ids, s.params, 64)


def test_preemption_recomputes_and_frees_pages():
  # 6 pages of 4 tokens: two requests of 8 + 12 tokens of cache cannot both stay resident.
  sched, runner = make(num_pages=6, page_size=4, budget=16)
  params = SamplingParams(max_tokens=9, ignore_eos=True)
  a = add(sched, list(range(20, 28)), params)
  b = add(sched, list(range(40, 44)), params)
  out = sched.schedule()
  sched.update(out, runner.execute(out.chunks))
  preempted = []
  while sched.has_unfinished:
    out = sched.schedule()
    check_step(sched, out)
    for seq in out.preempted:
      assert seq.status is Status.WAITING and seq.num_computed_tokens == 0
      assert seq.block_table == [] and sched.waiting[0] is seq
      preempted.append(seq.request_id)
    if out.chunks:
      sched.update(out, runner.execute(out.chunks))
  assert preempted and preempted[0] == b.request_id       # the newest goes first
  assert sched.num_preemptions == len(preempted)
  for s in (a, b):
    assert (s.output_token_ids, s.finish_reason) == reference(s.prompt_token_ids, params, 64)
  assert sched.blocks.num_free_pages == 6


def test_finish_reasons():
  prompt = [9, 8, 7]
  ref, _ = reference(prompt, SamplingParams(max_tokens=50, ignore_eos=True), 10**9, eos=-1)
  stop_at, eos = ref[4], ref[6]
  assert stop_at not in ref[:4] and eos not in ref[:6] + [stop_at]
  cfg = SchedulerConfig(64, 4, 24, 16, 8)
  sched, runner = Scheduler(cfg, vocab_size=VOCAB, eos_token_ids=(eos,)), FakeRunner(64, 4)
  cases = {
      "max_tokens": SamplingParams(max_tokens=3, ignore_eos=True),
      "stop_ids": SamplingParams(max_tokens=50, stop_token_ids=(stop_at,), ignore_eos=True),
      "model_len": SamplingParams(max_tokens=50, ignore_eos=True),
      "eos": SamplingParams(max_tokens=50),
  }
  seqs = {k: add(sched, prompt, p) for k, p in cases.items()}
  run_all(sched, runner)
  got = {k: (len(s.output_token_ids), s.output_token_ids[-1], s.finish_reason)
         for k, s in seqs.items()}
  assert got == {"max_tokens": (3, ref[2], "length"), "stop_ids": (5, stop_at, "stop"),
                 "model_len": (21, ref[20], "length"), "eos": (7, eos, "stop")}
  assert all(s.output_token_ids == ref[:len(s.output_token_ids)] for s in seqs.values())


def test_bad_requests_are_refused_at_add():
  sched, _ = make(num_pages=4, page_size=4, max_model_len=64)
  p = SamplingParams(max_tokens=2)
  with pytest.raises(ValueError, match="empty prompt"):
    sched.check_request([], p)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    sched.check_request([1, VOCAB], p)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    sched.check_request([-1], p)
  with pytest.raises(ValueError, match="longer than max_model_len"):
    sched.check_request([1] * 65, p)
  with pytest.raises(ValueError, match="could never run"):   # 16 slots in the whole cache
    sched.check_request([1] * 12, SamplingParams(max_tokens=6))
  sched.check_request([1] * 12, SamplingParams(max_tokens=5))  # exactly 16 tokens of cache
  with pytest.raises(TypeError, match="SamplingParams"):
    sched.check_request([1], {"max_tokens": 2})
  with pytest.raises(ValueError, match="stop_token_ids"):
    sched.check_request([1], SamplingParams(stop_token_ids=(VOCAB + 1,)))


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("max_tokens", -3),
                                         ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5),
                                         ("top_k", 0), ("seed", -1)])
def test_sampling_params_validation(field, value):
  with pytest.raises(ValueError, match=field):
    SamplingParams(**{field: value})


def test_random_workload_matches_references_without_leaks():
  rng = np.random.RandomState(0)
  sched, runner = make(num_pages=24, page_size=4, max_model_len=48, budget=12, max_seqs=6)
  seqs = []
  for _ in range(300):
    n = int(rng.randint(1, 30))
    params = SamplingParams(max_tokens=int(rng.randint(1, 15)), ignore_eos=bool(rng.rand() < .5))
    seqs.append(add(sched, rng.randint(0, VOCAB, n).tolist(), params))
    if rng.rand() < 0.2:                           # requests keep arriving while others run
      out = sched.schedule()
      check_step(sched, out)
      if out.chunks:
        sched.update(out, runner.execute(out.chunks))
  run_all(sched, runner)
  assert sched.num_preemptions > 0
  for s in seqs:
    assert s.is_finished
    assert (s.output_token_ids, s.finish_reason) == reference(s.prompt_token_ids, s.params, 48)
  assert sched.blocks.num_free_pages == 24 and not sched.running and not sched.waiting


@pytest.mark.parametrize("seed", [0, 1])
def test_pipelined_steps_match_references_without_leaks(seed):
  """One step planned ahead: decodes carry placeholder tokens read from the step before;
  requests ended by EOS or a stop token while their next step was in flight drop its token;
  preemption recomputes; every output equals its stand-alone reference and no page leaks."""
  rng = np.random.RandomState(seed)
  sched, runner = make(num_pages=24, page_size=4, max_model_len=48, budget=12, max_seqs=6)
  seqs = []
  for _ in range(200):
    n = int(rng.randint(1, 30))
    stop = (int(rng.randint(0, VOCAB)),) if rng.rand() < 0.3 else ()
    params = SamplingParams(max_tokens=int(rng.randint(1, 15)), ignore_eos=bool(rng.rand() < .5),
                            stop_token_ids=stop)
    seqs.append(add(sched, rng.randint(0, VOCAB, n).tolist(), params))
  run_pipelined(sched, runner)
  assert sched.num_preemptions > 0 and runner.placeholders > 100
  stopped = 0
  for s in seqs:
    assert s.is_finished and s.num_pending == 0
    assert (s.output_token_ids, s.finish_reason) == reference(s.prompt_token_ids, s.params, 48)
    stopped += s.finish_reason == "stop"
  assert stopped > 10
  assert sched.blocks.num_free_pages == 24 and not sched.running and not sched.waiting


def test_a_request_ended_by_length_is_not_planned_past_it():
  sched, runner = make()
  seq = add(sched, [4, 5, 6], SamplingParams(max_tokens=2, ignore_eos=True))
  out = sched.schedule()
  tokens = runner.execute(out.chunks)
  sched.reserve(out)
  assert seq.output_token_ids == [-1] and not seq.finishing
  nxt = sched.schedule()                                  # its decode, from the placeholder
  assert [c.token_ids.tolist() for c in nxt.chunks] == [[-1]]
  tokens2 = runner.execute(nxt.chunks)
  sched.reserve(nxt)
  assert seq.finishing and not sched.schedule().chunks    # the 2nd token ends it: no third
  sched.update(out, tokens)
  sched.update(nxt, tokens2)
  assert (seq.output_token_ids, seq.finish_reason) == reference([4, 5, 6], seq.params, 64)
  assert sched.blocks.num_free_pages == 64


def test_abort_frees_pages_of_running_and_drops_waiting():
  sched, runner = make(max_seqs=1)
  running = add(sched, [1, 2, 3, 4, 5], SamplingParams(max_tokens=8))
  waiting = add(sched, [6, 7], SamplingParams(max_tokens=8))
  out = sched.schedule()
  sched.update(out, runner.execute(out.chunks))
  assert running.block_table and sched.waiting[0] is waiting
  sched.abort(running)
  sched.abort(waiting)
  assert (running.finish_reason, waiting.finish_reason) == ("abort", "abort")
  assert running.is_finished and waiting.is_finished and not sched.has_unfinished
  assert sched.blocks.num_free_pages == sched.config.num_pages


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "8"])
def test_counts_are_positive_ints_everywhere(bad):
  """SchedulerConfig, the KV-cache layout and SamplingParams.max_tokens share one meaning of a
  count: an int >= 1 (NumPy integers included, bools not)."""
  from weave_jax import preset
  from weave_jax.serve import kv_cache
  with pytest.raises(ValueError, match=f"SchedulerConfig: max_num_seqs={bad!r} must be a "
                                       "positive int"):
    SchedulerConfig(64, 4, 64, 16, bad)
  with pytest.raises(ValueError, match=f"kv_cache: page_size={bad!r} must be a positive int"):
    kv_cache.check_layout(preset("tiny"), 1, num_pages=8, page_size=bad)
  with pytest.raises(ValueError, match="max_tokens must be a positive int"):
    SamplingParams(max_tokens=bad)
  SchedulerConfig(np.int64(64), 4, 64, 16, np.int32(8))
  kv_cache.check_layout(preset("tiny"), 1, num_pages=np.int64(8), page_size=16)

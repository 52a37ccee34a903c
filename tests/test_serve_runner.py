"""ModelRunner: a step over a flat batch on the paged cache equals the prefill Engine.

- chunked prefill (three steps) gives the one-shot prefill's logits;
- a step mixing a decode, a prefill continuation and a new prompt equals each request's dense
  recomputation, at TP 1/2/4, woven (a request cut by the split) and unsplit, psum and rs_ag;
- decode-only steps run their own unsplit program; nocomm runs and differs;
- bad chunks raise ValueError before anything launches.

One 1-layer tiny model, float32, 32-token steps (one bucket per runner: one compile each).
"""
import numpy as np
import pytest
from conftest import rel_err
from flax import nnx

from weave_jax import Engine, ModelConfig, RunConfig, init_random, make_mesh, preset
from weave_jax.serve import ModelRunner, SamplingParams, ScheduledChunk
from weave_jax.sharding import shard_state

CFG = preset("tiny", num_layers=1)
GREEDY = SamplingParams(temperature=0.0)
_rng = np.random.RandomState(0)
SEQS = [_rng.randint(0, CFG.vocab_size, n) for n in (21, 20, 15)]
# Scattered page ids, so that a wrong slot mapping reads someone else's keys.
TABLES = [np.array([5, 9], np.int32), np.array([2, 7], np.int32), np.array([11, 3], np.int32)]


@pytest.fixture(scope="module")
def base():
  return init_random(CFG, make_mesh(1), seed=1)


@pytest.fixture(scope="module")
def model_at(base):
  cache = {}

  def get(tp):
    if tp not in cache:
      graphdef, state = nnx.split(base)
      cache[tp] = nnx.merge(graphdef, shard_state(state, make_mesh(tp)))
    return cache[tp]

  return get


@pytest.fixture(scope="module")
def dense(base):
  """Each request's full-sequence logits from the prefill Engine at TP 1 (the reference)."""
  eng = Engine(base, make_mesh(1), RunConfig())
  return [np.asarray(eng(s)) for s in SEQS]


def make_runner(model_at, tp, run, **kw):
  opts = dict(num_pages=16, max_model_len=32, max_num_batched_tokens=32, max_num_seqs=4,
              compile_ahead=False)
  opts.update(kw)
  return ModelRunner(model_at(tp), make_mesh(tp), run, **opts)


def chunk(i, lo, hi, sample=True, params=GREEDY, rng_step=0):
  return ScheduledChunk(i, SEQS[i][lo:hi], lo, TABLES[i], sample, params, rng_step)


def mixed_steps(runner):
  """Step 1: request 0's prompt (20) + request 1's first chunk (10): 30 tokens.  Step 2: request
  0 decodes its 21st token, request 1's last 10, request 2's whole prompt (15): 26 tokens, split
  at 13 when woven (request 2 is cut)."""
  first = runner.execute([chunk(0, 0, 20), chunk(1, 0, 10, sample=False)], return_logits=True)
  second = runner.execute([chunk(0, 20, 21), chunk(1, 10, 20), chunk(2, 0, 15)],
                          return_logits=True)
  return first, second


@pytest.fixture(scope="module")
def after_mixed(model_at):
  """(tp, backend, woven) -> (runner, first, second): a runner after ``mixed_steps`` (one per
  config for the module, so that every program compiles once)."""
  done = {}

  def get(tp, backend, woven):
    if (tp, backend, woven) not in done:
      runner = make_runner(model_at, tp, RunConfig(backend=backend, weave=woven,
                                                   weave_min_tokens=16))
      done[(tp, backend, woven)] = (runner, *mixed_steps(runner))
    return done[(tp, backend, woven)]

  return get


def test_chunked_prefill_equals_one_shot(model_at, dense):
  """Three chunks submitted back to back (no wait between steps), then collected."""
  runner = make_runner(model_at, 2, RunConfig())
  bounds = ((0, 7), (7, 16), (16, 21))                     # crosses the page boundary at 16
  pending = [runner.submit([chunk(0, lo, hi)]) for lo, hi in bounds]
  for p, (lo, hi) in zip(pending, bounds):
    res = runner.collect(p, return_logits=True)
    assert res.kind == "unsplit"
    assert rel_err(res.logits[0], dense[0][hi - 1]) < 1e-5
    assert res.tokens[0] == dense[0][hi - 1].argmax()


CONFIGS = [(1, "psum", False), (2, "psum", True), (2, "rs_ag", False), (2, "rs_ag", True),
           (4, "rs_ag", True), (4, "psum", False)]


@pytest.mark.parametrize("tp,backend,woven", CONFIGS)
def test_mixed_step_equals_dense(after_mixed, dense, tp, backend, woven):
  runner, first, second = after_mixed(tp, backend, woven)
  assert (first.kind, second.kind) == (("woven",) * 2 if woven else ("unsplit",) * 2)
  assert rel_err(first.logits[0], dense[0][19]) < 1e-5
  for i in range(3):
    assert rel_err(second.logits[i], dense[i][-1]) < 1e-5, f"request {i}"
  np.testing.assert_array_equal(second.tokens, [d[-1].argmax() for d in dense])
  if woven:
    assert runner.real_split(runner.shape(32, decode=False), 26) == 13  # request 2: rows 11..25


def test_decode_steps_run_unsplit(after_mixed, base):
  """After the mixed steps, request 2 decodes alone: the unsplit decode program, while its
  bucket's mixed program is woven."""
  runner, _, _ = after_mixed(2, "rs_ag", True)
  seq = np.concatenate([SEQS[2], [7, 300]])
  for pos in (15, 16):                                     # the second token opens page 3
    res = runner.execute([ScheduledChunk(2, seq[pos:pos + 1], pos, TABLES[2], True, GREEDY)],
                         return_logits=True)
    assert res.kind == "decode"
  assert runner.shape(16, decode=False).split is not None
  ref = np.asarray(Engine(base, make_mesh(1), RunConfig())(seq))[-1]
  assert rel_err(res.logits[0], ref) < 1e-5


def test_nocomm_runs_and_differs(after_mixed, dense):
  _, _, second = after_mixed(2, "nocomm", True)
  assert second.kind == "woven" and np.isfinite(second.logits).all()
  assert rel_err(second.logits[2], dense[2][-1]) > 1e-2


def test_sampling_through_the_runner(after_mixed):
  """Same seed, same tokens; the logprob returned is the sampled token's."""
  params = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
  runner, _, _ = after_mixed(1, "psum", False)
  outs = [runner.execute([chunk(0, 0, 20, params=params, rng_step=3)], return_logits=True)
          for _ in range(2)]
  assert outs[0].tokens[0] == outs[1].tokens[0]
  logits = outs[0].logits[0] / 0.8
  logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
  assert abs(outs[0].logprobs[0] - logp[outs[0].tokens[0]]) < 1e-4


@pytest.mark.parametrize("bad,match", [
    (lambda: [ScheduledChunk(0, np.array([1, CFG.vocab_size]), 0, TABLES[0], True)],
     "token id 512 outside the vocabulary"),
    (lambda: [ScheduledChunk(0, np.array([1, 2]), 31, np.arange(2), True)],
     "exceeds max_model_len=32"),
    (lambda: [ScheduledChunk(0, np.arange(17), 0, np.array([3]), True)],
     "block_table is too short"),
    (lambda: [ScheduledChunk(0, np.arange(4), 0, np.array([16]), True)],
     "page ids outside the pool"),
    (lambda: [ScheduledChunk(0, np.arange(4), 0, np.array([1]), True),
              ScheduledChunk(0, np.arange(4), 4, np.array([1]), True)], "appears twice"),
    (lambda: [], "chunks is empty"),
    (lambda: [ScheduledChunk(0, np.array([-1]), 3, np.array([1]), True)],
     r"placeholder token -1 reads row 0 of the previous step's samples, which had 0"),
    (lambda: [ScheduledChunk(0, np.arange(4), 0, np.array([1]), True),
              ScheduledChunk(1, np.array([5]), 2, np.array([1]), True)],
     r"two tokens write cache slot 18 \(page 1, row 2\); requests \[0, 1\]"),
])
def test_bad_input_raises_before_launch(model_at, bad, match):
  runner = make_runner(model_at, 1, RunConfig())
  with pytest.raises(ValueError, match=match):
    runner.execute(bad())
  assert not runner._programs                               # nothing compiled, nothing ran
  assert not any(a.is_deleted() for kv in runner.cache for a in kv)


def test_page_writes_are_one_unique_scatter_that_drops_padding():
  """write_pages: padding slots (-1) write nothing, real slots land in their page row, and the
  scatter is declared unique (XLA on GPU would otherwise write with atomics)."""
  import jax
  import jax.numpy as jnp
  from weave_jax.serve.runner import write_pages
  pages = jnp.zeros((3, 4, 2, 2), jnp.bfloat16)
  new = jnp.arange(1, 6, dtype=jnp.float32)[:, None, None] * jnp.ones((5, 2, 2))
  slots = jnp.asarray([5, -1, 11, -1, 0], jnp.int32)
  out = np.asarray(write_pages(pages, new, slots).astype(jnp.float32)).reshape(12, 2, 2)
  want = np.zeros((12, 2, 2), np.float32)
  want[5], want[11], want[0] = 1, 3, 5
  np.testing.assert_array_equal(out, want)
  hlo = jax.jit(write_pages).lower(pages, new, slots).as_text()
  assert "unique_indices = true" in hlo


def test_a_kernel_that_cannot_run_here_is_refused_at_start(model_at):
  with pytest.raises(ValueError, match="impl='triton' cannot run here"):    # CPU
    make_runner(model_at, 1, RunConfig(paged_attention="triton"))


def test_bucket_plan(model_at):
  runner = make_runner(model_at, 2, RunConfig(backend="rs_ag", weave=True, weave_min_tokens=32),
                       max_num_batched_tokens=100, max_num_seqs=20)
  assert runner.buckets == [16, 32, 64, 112]
  shapes = runner.program_shapes()
  assert [(s.bucket, s.split is not None) for s in shapes] == [
      (16, False), (32, True), (64, True), (112, True), (32, False)]
  assert [s.sample_rows for s in shapes] == [16, 20, 20, 20, 20]


@pytest.mark.parametrize("split", [None, 24])
def test_packed_fields_start_256_byte_aligned(split):
  """Every field of the packed step buffer starts at a multiple of 256 bytes (a custom call may
  get it as a view into the buffer) and no two fields overlap."""
  import jax.numpy as jnp
  from weave_jax.serve import step_inputs
  shape = step_inputs.StepShape(bucket=40, split=split, max_num_seqs=5, pages_per_seq=7)
  fields, offsets = shape.fields(), shape.offsets()
  assert all(off * 4 % 256 == 0 for off in offsets)
  ends = [off + int(np.prod(shp)) for (_, shp, _), off in zip(fields, offsets)]
  assert all(end <= nxt for end, nxt in zip(ends, offsets[1:])) and ends[-1] == shape.size()
  buf = np.arange(shape.size(), dtype=np.int32)
  out = step_inputs.unpack(shape, jnp.asarray(buf))
  for (name, shp, dt), off in zip(fields, offsets):
    want = buf[off:off + int(np.prod(shp))].reshape(shp).view(dt)
    np.testing.assert_array_equal(np.asarray(out[name]), want, err_msg=name)


def test_compile_ahead_prints_progress_and_covers_steps(model_at, capsys):
  runner = make_runner(model_at, 1, RunConfig(), max_num_batched_tokens=16, compile_ahead=True)
  out = capsys.readouterr().out
  assert "[serve] compiled 1/1: bucket 16 (unsplit, 4 seqs) in" in out
  assert "[serve] compiled 3 sampler programs (rows [4], modes greedy, sample, filtered)" in out
  assert "[serve] compiled 1 step programs and the samplers in" in out
  compiled = (dict(runner._programs), dict(runner._samplers))
  runner.execute([chunk(0, 0, 16, params=SamplingParams(top_k=3))])
  assert (runner._programs, runner._samplers) == compiled       # nothing compiled on the way


# --- GPU: the paged attention kernels, bf16 -----------------------------------------------------

# Small, but with the head_dim (128) and GQA the kernels are built for.
GPU_CFG = ModelConfig("llama", 1024, 512, 1024, 2, 8, 2, 128, 1e-5, 10000.0, dtype="bfloat16")


def kernels_match_engine(cfg, impl, tol):
  """Chunked prefill, a mixed step and decodes through ``impl`` against the Engine's forward."""
  mesh = make_mesh(1)
  model = init_random(cfg, mesh, seed=2)
  eng = Engine(model, mesh, RunConfig())
  rng = np.random.RandomState(0)
  seqs = [rng.randint(0, cfg.vocab_size, n) for n in (300, 77, 140)]
  tables = [np.arange(0, 20), np.arange(40, 46), np.arange(20, 30)]
  runner = ModelRunner(model, mesh, RunConfig(paged_attention=impl), num_pages=64,
                       max_model_len=320, max_num_batched_tokens=256, max_num_seqs=8,
                       compile_ahead=False)
  assert runner.attention_impl == impl

  def c(i, lo, hi, sample=True):
    return ScheduledChunk(i, seqs[i][lo:hi], lo, tables[i], sample, GREEDY)

  runner.execute([c(0, 0, 200, False), c(1, 0, 40, False)])
  mixed = runner.execute([c(0, 200, 299), c(1, 40, 77), c(2, 0, 100)], return_logits=True)
  decode = runner.execute([c(0, 299, 300), c(2, 100, 101)], return_logits=True)
  assert (mixed.kind, decode.kind) == ("unsplit", "decode")
  for got, (i, end) in ((mixed.logits[0], (0, 299)), (mixed.logits[1], (1, 77)),
                        (mixed.logits[2], (2, 100)), (decode.logits[0], (0, 300)),
                        (decode.logits[1], (2, 101))):
    ref = np.asarray(eng(seqs[i][:end]))[-1]
    assert rel_err(got, ref) < tol, f"request {i} at {end} tokens"


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "mosaic"])
def test_kernels_match_engine_on_gpu(impl):
  kernels_match_engine(GPU_CFG, impl, 3e-2)

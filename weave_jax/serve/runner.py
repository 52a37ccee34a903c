"""The device side of serving: one model step over a flat token batch on a paged KV cache.

    runner = ModelRunner(model, mesh, RunConfig(backend="rs_ag", weave=True), num_pages=...)
    result = runner.execute(chunks)          # list[ScheduledChunk] -> StepResult
    pending = runner.submit(chunks); ...; result = runner.collect(pending)   # same, split

A step is any mix of decode tokens and prefill chunks (each after its cached prefix).  It runs
the prefill forward's stage chain (``weave.run``: embedding, then attention and MLP per layer,
each closed by ``reduce_add_norm``) over one half (unsplit) or two (woven).  Each attention
stage writes the half's K/V into the pages (``slot_mapping``) and attends over the request's
cached prefix plus itself; it returns the updated pages as its ctx, so that half B's attention
reads what half A wrote by data dependency.  Only the rows that sample reach the LM head, and
sampling runs on device (its own small program, fed by the step's outputs on device): the host
gets token ids and their log-probabilities, nothing else.

Static shapes: one program per token bucket (powers of two from 16 up to
``max_num_batched_tokens``), compiled ahead by ``compile_all``; mixed buckets at or above the
weave threshold (``Engine.plan``: RunConfig.weave_min_tokens or the tuning table) are woven,
decode-only steps always run unsplit.  The cache is donated to every step.  On GPU the
programs keep XLA's default command-buffer (CUDA graph) settings.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pallas_kernels import attention as paged_kernels
from weave_jax import forward, layers, weave, xla_options
from weave_jax.checks import positive_int
from weave_jax.comm import AXIS
from weave_jax.engine import Engine, RunConfig
from weave_jax.model import Transformer, lm_logits
from weave_jax.serve import kv_cache, sampler, step_inputs
from weave_jax.serve.sampling_params import SamplingParams
from weave_jax.serve.step_inputs import StepShape

MIN_BUCKET = 16


@dataclasses.dataclass
class ScheduledChunk:
  """One request's share of a step; decodes first, then prefill chunks."""
  request_id: int
  token_ids: np.ndarray        # (q_len,) int32: new tokens whose K/V this step computes; -(r + 1)
                               # is row r of the previous submitted step's samples (placeholder)
  start: int                   # tokens of this request already in the cache
  block_table: np.ndarray      # (n,) int32 page ids covering start + q_len tokens
  sample: bool                 # token_ids ends at the request's last known token
  params: SamplingParams = SamplingParams()
  rng_step: int = 0            # tokens this request has sampled so far (folded into its seed)


@dataclasses.dataclass
class StepResult:
  tokens: np.ndarray           # (len(chunks),) int32: sampled token (valid where chunk.sample)
  logprobs: np.ndarray         # (len(chunks),) float32: log-prob of that token (same)
  kind: str                    # "woven" | "unsplit" | "decode"
  logits: np.ndarray | None = None   # (len(chunks), V) float32 with return_logits (same rows)


@dataclasses.dataclass
class PendingStep:
  """A step that ``ModelRunner.submit`` enqueued; ``ModelRunner.collect`` waits for it."""
  out: jax.Array               # (2, R) int32 on device: tokens, float32 logprobs bit-cast
  logits: jax.Array            # (R, V) float32 on device
  which: np.ndarray            # indices of the chunks that sample (their rows, in order)
  num_chunks: int
  kind: str


# --- attention dispatch --------------------------------------------------------------------------

def paged_attention(impl: str, dtype: str):
  """Resolves RunConfig.paged_attention ``impl`` on this device.  Returns (the kernel chosen,
  ``fn(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc, num_seqs) -> (T, N, D)``).
  Raises ValueError when a named kernel cannot run here; "auto" warns when only the reference
  can."""
  chosen = paged_kernels.resolve_impl(impl, paged_kernels.device_arch(), dtype)
  return chosen, functools.partial(paged_kernels.ragged_paged_attention, impl=chosen)


# --- the per-rank step ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ServeHalf:
  """One half's tokens and paged-attention metadata (step_inputs' per-half fields)."""
  tokens: jax.Array            # (T_h,)
  rope: tuple                  # cos, sin (T_h, D/2)
  slots: jax.Array             # (T_h,) -1 = padding
  query_start_loc: jax.Array   # (S_h + 1,)
  kv_lens: jax.Array           # (S_h,)
  block_tables: jax.Array      # (S_h, M)
  num_seqs: jax.Array          # ()


def _half(cfg, fields: dict, h: int) -> ServeHalf:
  return ServeHalf(fields[f"tokens{h}"], layers.rope_tables(cfg, fields[f"positions{h}"]),
                   fields[f"slots{h}"], fields[f"query_start_loc{h}"], fields[f"kv_lens{h}"],
                   fields[f"block_tables{h}"], fields[f"num_seqs{h}"][0])


def write_pages(pages, new, slots):
  """pages (P, page, K, D) with rows ``slots`` (T,) set to ``new`` (T, K, D); slot -1 drops.

  The real slots of a step are distinct (``step_inputs.check_and_flatten`` refuses a step
  where two tokens write one slot), and each dropped token gets its own index past the end, so
  the scatter is declared unique: without that XLA on GPU writes every element with an atomic
  compare-and-swap loop (16-bit elements have no atomic store)."""
  p, page = pages.shape[:2]
  flat = pages.reshape(p * page, *pages.shape[2:])
  past_end = p * page + jnp.arange(slots.shape[0], dtype=slots.dtype)
  idx = jnp.where(slots < 0, past_end, slots)
  return flat.at[idx].set(new.astype(pages.dtype), mode="drop",
                          unique_indices=True).reshape(pages.shape)


def serve_stages(model: Transformer, cache, attention) -> list[weave.Stage]:
  """[embed, (attention over pages, mlp) per layer]: the prefill chain (forward.chain_stages)
  with each attention's ctx the layer's pages (k_pages, v_pages)."""
  def attention_stage(i, layer):
    def attn(n, h: ServeHalf, ctx):
      k_pages, v_pages = cache[i] if ctx is None else ctx     # half B: the pages A wrote
      q, k, v = layer.attn.project_qkv(n, h.rope)
      k_pages = write_pages(k_pages, k, h.slots)
      v_pages = write_pages(v_pages, v, h.slots)
      o = attention(q, k_pages, v_pages, h.kv_lens, h.block_tables, h.query_start_loc,
                    h.num_seqs)
      return layer.attn.project_out(o), (k_pages, v_pages)
    return attn
  return forward.chain_stages(model, attention_stage)


def step_rank(graphdef, state, cache, fields, *, shape: StepShape, backend, tp: int, attention):
  """Per-rank step.  Returns (this rank's logits shard (R, V_local) float32, updated cache)."""
  model = nnx.merge(graphdef, state)
  cfg = model.cfg
  halves = tuple(_half(cfg, fields, h) for h in range(len(shape.half_rows)))
  residuals = tuple(jnp.zeros(backend.residual_shape(rows, cfg.hidden_size, tp), cfg.dtype)
                    for rows in shape.half_rows)
  res = weave.run(serve_stages(model, cache, attention), halves, residuals, backend,
                  eps=cfg.rms_norm_eps)
  new_cache = tuple(ctx for ctx in res.ctxs if ctx is not None)
  normed = jnp.concatenate(res.normed, axis=0) if len(res.normed) > 1 else res.normed[0]
  rows = normed[fields["sample_rows"]]                           # (R, H): gathered before the head
  with jax.named_scope("lm_head"):
    return lm_logits(model.head_table(), rows), new_cache


# --- the runner -----------------------------------------------------------------------------------

def token_buckets(max_num_batched_tokens: int) -> list[int]:
  """Powers of two from MIN_BUCKET below the budget, then the budget rounded up to 16."""
  out, b = [], MIN_BUCKET
  while b < max_num_batched_tokens:
    out.append(b)
    b *= 2
  out.append(-(-max_num_batched_tokens // MIN_BUCKET) * MIN_BUCKET)
  return out


class ModelRunner:
  """A TP-sharded model, its paged KV cache and one compiled step program per token bucket.

  Args:
    model, mesh, run: as for ``Engine`` (RunConfig.paged_attention picks the attention kernel).
    page_size: tokens per page.
    num_pages: pages in the cache; None: as many as ``memory_fraction`` of the free device
      memory holds after the weights and the activation reserve (``kv_cache``).
    max_model_len: longest request (prompt + output) in tokens.
    max_num_batched_tokens: token budget of one step (the largest bucket).
    max_num_seqs: requests in one step at most.
    seed: seeds the requests whose SamplingParams.seed is None.
    compile_ahead: compile every bucket now (progress lines, total time); False compiles each
      program on first use (tests).
  """

  def __init__(self, model: Transformer, mesh: Mesh, run: RunConfig = RunConfig(), *,
               page_size: int = kv_cache.DEFAULT_PAGE_SIZE, num_pages: int | None = None,
               memory_fraction: float = 0.9, max_model_len: int = 4096,
               max_num_batched_tokens: int = 2048, max_num_seqs: int = 256, seed: int = 0,
               compile_ahead: bool = True):
    max_model_len, page_size, max_num_batched_tokens, max_num_seqs = (
        positive_int("ModelRunner", name, value) for name, value in (
            ("max_model_len", max_model_len), ("page_size", page_size),
            ("max_num_batched_tokens", max_num_batched_tokens), ("max_num_seqs", max_num_seqs)))
    self.engine = Engine(model, mesh, run)
    self.buckets = token_buckets(max_num_batched_tokens)
    # The fused backends' workspace, sized once for the largest bucket before any program is
    # built (growing it later would rebuild the backends under compiled programs).
    self.engine.open_workspace(self.buckets[-1])
    self.cfg, self.mesh, self.run, self.tp = self.engine.cfg, mesh, run, self.engine.tp
    self.page_size, self.max_model_len = page_size, max_model_len
    self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
    self.seed = seed
    self.attention_impl, self._attention = paged_attention(run.paged_attention, self.cfg.dtype)
    print(f"[serve] paged attention: {self.attention_impl} (RunConfig.paged_attention="
          f"{run.paged_attention!r})", flush=True)
    sizing = "num_pages given"
    if num_pages is None:
      reserve = kv_cache.activation_reserve(self.cfg, self.buckets[-1], max_num_seqs, self.tp)
      num_pages = kv_cache.pages_for_memory(self.cfg, mesh, page_size=page_size,
                                            memory_fraction=memory_fraction, reserve=reserve)
      sizing = (f"{kv_cache.free_device_bytes(mesh) / 2**30:.2f} GiB free after the weights x "
                f"{memory_fraction} - {reserve / 2**30:.2f} GiB activation reserve for "
                f"{self.buckets[-1]} tokens")
    self.num_pages = num_pages
    self.cache = kv_cache.allocate(self.cfg, mesh, num_pages, page_size)
    print(f"{kv_cache.describe(self.cfg, self.tp, num_pages, page_size)}; {sizing}", flush=True)
    self.limits = step_inputs.Limits(self.cfg.vocab_size, page_size, num_pages, max_model_len,
                                     max_num_batched_tokens, max_num_seqs)
    self._replicated = NamedSharding(mesh, P())
    # The weights as a flat list: a call flattens its arguments, and the NNX state's Python
    # flatten of a 32-layer model costs ~0.1-0.2 ms on the host per step; a list costs ~10 us.
    self._state_leaves, self._state_def = jax.tree_util.tree_flatten(self.engine.state)
    self._shapes: dict = {}
    self._programs: dict = {}
    self._samplers: dict = {}
    # The last submitted step's samples (2, max_num_seqs) on device, and how many rows are
    # real: the next step's placeholder tokens are read from them inside its program.
    self._prev_out = jax.device_put(np.zeros((2, max_num_seqs), np.int32), self._replicated)
    self._prev_rows = 0
    if compile_ahead:
      self.compile_all()

  # --- shapes ---------------------------------------------------------------------------------

  def bucket(self, n_tokens: int) -> int:
    return next(b for b in self.buckets if b >= n_tokens)

  def shape(self, bucket: int, decode: bool) -> StepShape:
    """The program shape of a step in ``bucket``: woven as Engine.plan says, unless decode.
    Memoised: the plan reads the tuning tables, which the per-step host loop must not."""
    key = (bucket, decode)
    if key not in self._shapes:
      split = None if decode else self.engine.plan(bucket).split
      self._shapes[key] = StepShape(bucket, split, self.max_num_seqs, self.limits.pages_per_seq)
    return self._shapes[key]

  def program_shapes(self) -> list[StepShape]:
    """Every program a step can need: the mixed one per bucket, plus an unsplit one for the
    decode buckets whose mixed program is woven."""
    shapes = [self.shape(b, decode=False) for b in self.buckets]
    decode_top = self.bucket(min(self.max_num_seqs, self.max_num_batched_tokens))
    shapes += [self.shape(b, decode=True) for b in self.buckets
               if b <= decode_top and self.shape(b, decode=False).split is not None]
    return shapes

  # --- compile ----------------------------------------------------------------------------------

  def compile_all(self) -> None:
    """Compile every program ahead, one progress line each and the total."""
    shapes = self.program_shapes()
    t0 = time.perf_counter()
    for i, shape in enumerate(shapes):
      t = time.perf_counter()
      self.program(shape)
      kind = "unsplit" if shape.split is None else f"woven at {shape.split}"
      print(f"[serve] compiled {i + 1}/{len(shapes)}: bucket {shape.bucket} ({kind}, "
            f"{shape.sample_rows} seqs) in {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    rows = sorted({shape.sample_rows for shape in shapes})
    for r in rows:
      for mode in sampler.MODES:
        self.sampler_program(r, mode)
    print(f"[serve] compiled {len(sampler.MODES) * len(rows)} sampler programs (rows {rows}, "
          f"modes {', '.join(sampler.MODES)}) in {time.perf_counter() - t:.1f} s", flush=True)
    print(f"[serve] compiled {len(shapes)} step programs and the samplers in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

  def program(self, shape: StepShape):
    """The compiled step for ``shape``: exe(state leaves, cache, packed, previous samples) ->
    (logits (R, V) float32, sampling fields (temperature, top_k, top_p, seeds, steps), cache).
    The cache is donated."""
    if shape not in self._programs:
      backend = self.engine.backend_of(self.engine.plan(shape.bucket))
      cache_struct = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                 sharding=a.sharding), self.cache)
      buf = jax.ShapeDtypeStruct((shape.size(),), jnp.int32, sharding=self._replicated)
      prev = jax.ShapeDtypeStruct(self._prev_out.shape, jnp.int32, sharding=self._replicated)
      lowered = jax.jit(self._step_fn(shape, backend), donate_argnums=(1,)).lower(
          self._state_leaves, cache_struct, buf, prev)
      opts = xla_options.compile_options(self.engine.platform, weave=shape.split is not None)
      self._programs[shape] = xla_options.compile_with(lowered, opts)
    return self._programs[shape]

  def _step_fn(self, shape: StepShape, backend):
    cache_specs = tuple((kv_cache.CACHE_SPEC, kv_cache.CACHE_SPEC) for _ in self.cache)
    rank_fn = functools.partial(step_rank, self.engine.graphdef, shape=shape, backend=backend,
                                tp=self.tp, attention=self._attention)
    sharded = jax.shard_map(rank_fn, mesh=self.mesh, in_specs=(self.engine.specs, cache_specs, P()),
                            out_specs=(P(None, AXIS), cache_specs), check_vma=False)
    vocab = self.cfg.vocab_size

    def step(state_leaves, cache, packed, prev):
      state = jax.tree_util.tree_unflatten(self._state_def, state_leaves)
      fields = step_inputs.unpack(shape, packed)
      for h in range(len(shape.half_rows)):            # placeholders: the last step's samples
        tokens = fields[f"tokens{h}"]
        row = jnp.clip(-tokens - 1, 0, prev.shape[1] - 1)
        fields[f"tokens{h}"] = jnp.where(tokens < 0, prev[0, row], tokens)
      logits, cache = sharded(state, cache, fields)
      # Full rows on every device: the sampler's softmax and sort run over the whole vocab.
      logits = jax.lax.with_sharding_constraint(logits[:, :vocab], self._replicated)
      return logits, tuple(fields[name] for name, _ in step_inputs.SAMPLING_FIELDS), cache

    return step

  def sampler_program(self, rows: int, mode: str):
    """The compiled sampler for ``rows`` rows: exe(logits, *sampling fields) -> (2,
    max_num_seqs) int32 (tokens, float32 logprobs bit-cast; rows past ``rows`` are 0), one shape
    for every step so that the next step's program can read it.  ``mode``
    (``sampler.mode_for``): the host picks the cheapest exact one for the step (no
    data-dependent branch on device)."""
    key = (rows, mode)
    if key not in self._samplers:
      width = self._prev_out.shape[1]

      def fn(logits, temperature, top_k, top_p, seeds, steps):
        tokens, logprobs = sampler.sample(logits, temperature, top_k, top_p, seeds, steps,
                                          mode=mode)
        out = jnp.stack([tokens, jax.lax.bitcast_convert_type(logprobs, jnp.int32)])
        return jnp.pad(out, ((0, 0), (0, width - rows)))

      spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=self._replicated)
      args = [spec((rows, self.cfg.vocab_size), jnp.float32)]
      args += [spec((rows,), dt) for _, dt in step_inputs.SAMPLING_FIELDS]
      self._samplers[key] = jax.jit(fn).lower(*args).compile()
    return self._samplers[key]

  # --- one step ---------------------------------------------------------------------------------

  def real_split(self, shape: StepShape, n_tokens: int) -> int | None:
    """Real tokens that go to half A: the bucket's split scaled to the step, so that both
    halves hold a like share of the real tokens (each is padded to its static rows)."""
    if shape.split is None:
      return None
    s = round(n_tokens * shape.split / shape.bucket)
    return min(max(s, n_tokens - (shape.bucket - shape.split)), shape.split)

  def execute(self, chunks, return_logits: bool = False) -> StepResult:
    """Run one step over ``chunks`` (list[ScheduledChunk]).  Blocks only on the sampled ids.

    ``return_logits``: also fetch the sampled rows' float32 logits (tests).
    """
    return self.collect(self.submit(chunks), return_logits)

  def prepare(self, chunks) -> tuple[step_inputs.Batch, StepShape, np.ndarray]:
    """The host side of a step: check the chunks, pick the program shape and pack its input.
    Returns (the flattened batch, the shape, the packed (size,) int32 host buffer)."""
    batch = step_inputs.check_and_flatten(chunks, self.limits, self._prev_rows)
    n = batch.num_tokens
    shape = self.shape(self.bucket(n), decode=batch.is_decode)
    seeds = [sampler.default_seed(self.seed, c.request_id) if c.params.seed is None
             else c.params.seed for c in chunks]
    return batch, shape, step_inputs.pack(batch, shape, self.real_split(shape, n), chunks, seeds)

  def submit(self, chunks) -> PendingStep:
    """Check the chunks, build the metadata, and enqueue the step and its sampler; returns at
    once (JAX dispatch is asynchronous), so host work can overlap the device's.  The next
    step's placeholder tokens read this step's samples."""
    batch, shape, packed = self.prepare(chunks)
    which = np.flatnonzero(batch.sample)
    mode = sampler.mode_for([chunks[i].params for i in which], self.cfg.vocab_size)
    with self.engine.timeout_errors():          # a fused kernel's timeout names its rank and barrier
      out, logits = self.launch(shape, jax.device_put(packed, self._replicated), mode)
    self._prev_out, self._prev_rows = out, int(which.size)
    kind = "decode" if batch.is_decode else ("unsplit" if shape.split is None else "woven")
    return PendingStep(out, logits, which, len(chunks), kind)

  def collect(self, pending: PendingStep, return_logits: bool = False) -> StepResult:
    """Wait for a submitted step's sampled ids (the only transfer back) and return them."""
    which = pending.which
    with self.engine.timeout_errors():
      host = np.asarray(pending.out)[:, :which.size]
    tokens = np.zeros(pending.num_chunks, np.int32)
    logprobs = np.zeros(pending.num_chunks, np.float32)
    tokens[which] = host[0]
    logprobs[which] = host[1].view(np.float32)
    rows = None
    if return_logits:
      rows = np.zeros((pending.num_chunks, self.cfg.vocab_size), np.float32)
      rows[which] = np.asarray(pending.logits)[:which.size]
    return StepResult(tokens, logprobs, pending.kind, rows)

  def launch(self, shape: StepShape, packed: jax.Array, mode: str):
    """Enqueue the step and its sampler on a placed packed buffer (its placeholders read the
    last submitted step's samples); the cache moves on.  Returns (out (2, max_num_seqs) int32,
    logits (R, V)), both still on device (nothing waits)."""
    logits, fields, self.cache = self.program(shape)(self._state_leaves, self.cache, packed,
                                                     self._prev_out)
    return self.sampler_program(shape.sample_rows, mode)(logits, *fields), logits

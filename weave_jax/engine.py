"""The user-facing entry point: a sharded model + a run configuration -> jitted prefill forward.

    engine = Engine(model, mesh, RunConfig(backend="rs_ag", weave=True))
    logits = engine(tokens)                       # (T, vocab), float32

Handles input validation, padding to the TP size (real tokens stay exact), the weave split,
per-compile XLA options and the ``shard_map`` over the mesh.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from weave_jax import split as split_mod
from weave_jax import xla_options
from weave_jax.comm import AXIS, get_backend
from weave_jax.forward import forward_rank
from weave_jax.model import Transformer
from weave_jax.sharding import state_specs


PAGED_ATTENTION_IMPLS = ("auto", "reference", "triton", "mosaic")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How to run the model.  Frozen and hashable: it is part of the compile cache key.

  backend: communication backend name (``weave_jax.comm.BACKENDS``).
  backend_options: extra backend options as (name, value) pairs, e.g. (("ctas", 8),).
  weave: split batches into two halves and overlap their communication.
  weave_min_tokens: batches smaller than this run unsplit.  None = what ``run/tune_split.py``
    measured for this device/model/TP/backend: the per-bucket verdict (woven faster or not)
    for measured buckets, its threshold for the others, else the device's dense / MoE
    threshold (``weave_jax.tuned``).
  split: fixed offset of half B (tokens); None = tuned / wave-aware.
  attn_impl: ``jax.nn.dot_product_attention`` implementation (None: cuDNN on GPU when possible).
  logits: "all" (every token) or "last" (the last real token only, as a prefill server does).
  paged_attention: the serving attention kernel (``pallas_kernels.attention``): "auto" (the
    best available for the device), "reference", "triton" or "mosaic".
  backend_by_size: let the tuning table pick another backend for the token buckets where it
    measured that backend faster in this engine's unsplit forward (e.g. XLA's psum for
    Mixtral-8x22B's 1K bucket under ``fused_p2p``; ``weave_jax.split.tuned_backend``).  False runs
    ``backend`` at every size (what a benchmark of that backend wants).
  """
  backend: str = "psum"
  backend_options: tuple[tuple[str, object], ...] = ()
  weave: bool = False
  weave_min_tokens: int | None = None
  split: int | None = None
  attn_impl: str | None = None
  logits: str = "all"
  backend_by_size: bool = True
  paged_attention: str = "auto"

  def __post_init__(self):
    if self.paged_attention not in PAGED_ATTENTION_IMPLS:
      raise ValueError(f"RunConfig: paged_attention must be one of {PAGED_ATTENTION_IMPLS}, got "
                       f"{self.paged_attention!r}")
    if self.logits not in ("all", "last"):
      raise ValueError(f"RunConfig: logits must be 'all' or 'last', got {self.logits!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static shape decisions for one batch size."""
  n_tokens: int        # real tokens
  padded: int          # padded to the TP size (per half when woven)
  split: int | None    # first token of half B, or None (unsplit)
  backend: str = ""    # communication backend of this batch size (RunConfig.backend_by_size)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def packed_positions(segment_ids: np.ndarray) -> np.ndarray:
  """Positions that restart at 0 at every new segment (segments are contiguous runs)."""
  seg = np.asarray(segment_ids)
  starts = np.r_[True, seg[1:] != seg[:-1]]
  run_start = np.maximum.accumulate(np.where(starts, np.arange(seg.size), 0))
  return (np.arange(seg.size) - run_start).astype(np.int32)


class Engine:
  """A TP-sharded model bound to a mesh and a RunConfig.  Call it on a token batch."""

  def __init__(self, model: Transformer, mesh: Mesh, run: RunConfig = RunConfig()):
    self.cfg = model.cfg
    self.mesh, self.run = mesh, run
    self.tp = mesh.shape[AXIS]
    self.cfg.check_tp(self.tp)
    self.backend = get_backend(run.backend, **dict(run.backend_options))
    self._backends = {run.backend: self.backend}   # + what backend_by_size substitutes
    self.graphdef, self.state = nnx.split(model)
    self._check_param_dtypes()
    self.specs = state_specs(self.state)
    dev = mesh.devices.flat[0]
    self.platform = dev.platform
    self.device_kind = getattr(dev, "device_kind", dev.platform)
    self.sms = getattr(dev, "core_count", None) if self.platform == "gpu" else None
    # cuDNN's fused causal attention on GPU, named explicitly so that an unsupported shape
    # fails loudly instead of silently materialising T x T scores.
    self.attn_impl = run.attn_impl or ("cudnn" if self.platform == "gpu" else None)
    self._compiled: dict = {}
    self._warned_untuned_weave = False

  def _check_param_dtypes(self):
    want = jnp.dtype(self.cfg.dtype)
    for path, leaf in jax.tree_util.tree_leaves_with_path(self.state):
      if leaf.dtype != want:
        name = jax.tree_util.keystr(path)
        raise TypeError(f"Engine: parameter {name} has dtype {leaf.dtype}, config says {want}")

  # --- planning ------------------------------------------------------------------------------

  def plan(self, n_tokens: int) -> Plan:
    tp, run = self.tp, self.run
    min_tokens = run.weave_min_tokens
    measured = None  # the tuned per-bucket verdict, used only when no threshold is given
    if min_tokens is None:
      min_tokens = split_mod.weave_threshold(self.device_kind, self.cfg, tp, run.backend,
                                             sms=self.sms)
      measured = split_mod.tuned_weave(self.device_kind, self.cfg, tp, run.backend, n_tokens)
      if run.weave and not self._woven_as_tuned():
        measured = False
    woven = n_tokens >= max(min_tokens, 2 * tp) if measured is None else measured
    if not run.weave or not woven or n_tokens < 2 * tp:
      backend = run.backend
      if run.backend_by_size:
        backend = split_mod.tuned_backend(self.device_kind, self.cfg, tp, run.backend,
                                          n_tokens) or backend
      return Plan(n_tokens, _round_up(n_tokens, tp), None, backend)
    if run.split is not None:
      s = run.split
      if s % tp or not 0 < s < n_tokens:
        raise ValueError(f"RunConfig.split={s} must be a multiple of TP={tp} in (0, {n_tokens})")
    else:
      s = split_mod.choose_split(n_tokens, self.cfg, tp, self.device_kind, self.sms, run.backend)
    return Plan(n_tokens, s + _round_up(n_tokens - s, tp), s, run.backend)

  def _woven_as_tuned(self) -> bool:
    """False when this backend's woven calls would not run the way the tuning table measured
    them (``FusedP2P.woven_as_tuned``); the tuned plan then stays unsplit, with one warning."""
    check = getattr(self.backend, "woven_as_tuned", None)
    if check is None or check():
      return True
    if not self._warned_untuned_weave:
      self._warned_untuned_weave = True
      warnings.warn(f"Engine: {self.run.backend} with one process per GPU runs woven calls on "
                    "the two-shot kernel (the copy engines need one process driving every GPU), "
                    "which measured slower than unsplit calls; the tuned plan runs unsplit.  Set "
                    "RunConfig.weave_min_tokens to weave anyway.", RuntimeWarning, stacklevel=3)
    return False

  def backend_of(self, plan: Plan):
    """The backend object that runs ``plan`` (built on first use for a substituted one)."""
    if plan.backend not in self._backends:
      self._backends[plan.backend] = get_backend(plan.backend)
    return self._backends[plan.backend]

  # --- validation ----------------------------------------------------------------------------

  def _validate(self, tokens, positions, segment_ids):
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
      raise ValueError(f"Engine: tokens must be 1-D (T,), got shape {tokens.shape}")
    if tokens.size == 0:
      raise ValueError("Engine: empty batch (0 tokens)")
    if not np.issubdtype(tokens.dtype, np.integer):
      raise TypeError(f"Engine: tokens must be integers, got {tokens.dtype}")
    if tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size:
      raise ValueError(f"Engine: token ids must be in [0, {self.cfg.vocab_size}), got "
                       f"[{tokens.min()}, {tokens.max()}]")
    out = []
    for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
      if arr is None:
        out.append(None)
        continue
      arr = np.asarray(arr)
      if arr.shape != tokens.shape:
        raise ValueError(f"Engine: {name} shape {arr.shape} != tokens shape {tokens.shape}")
      if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"Engine: {name} must be integers, got {arr.dtype}")
      out.append(arr.astype(np.int32))
    positions, segment_ids = out
    if segment_ids is not None and positions is None:
      positions = packed_positions(segment_ids)
    if positions is None:
      positions = np.arange(tokens.size, dtype=np.int32)
    return tokens.astype(np.int32), positions, segment_ids

  # --- compile & run -------------------------------------------------------------------------

  def _build(self, plan: Plan, packed: bool):
    logits_at = plan.n_tokens - 1 if self.run.logits == "last" else None
    rank_fn = functools.partial(
        self._rank_forward, backend=self.backend_of(plan), split=plan.split, logits_at=logits_at)
    seg_spec = P() if packed else None
    sharded = jax.shard_map(rank_fn, mesh=self.mesh,
                            in_specs=(self.specs, P(), P(), seg_spec),
                            out_specs=P(None, AXIS), check_vma=False)
    vocab = self.cfg.vocab_size

    def fwd(state, tokens, positions, segments):
      return sharded(state, tokens, positions, segments)[:, :vocab]

    return jax.jit(fwd)

  def _rank_forward(self, state, tokens, positions, segments, *, backend, split, logits_at):
    model = nnx.merge(self.graphdef, state)
    return forward_rank(model, tokens, positions, segments, backend=backend, split=split,
                        tp=self.tp, attn_impl=self.attn_impl, logits_at=logits_at)

  def compiled(self, n_tokens: int, packed: bool = False):
    """The compiled executable for a batch of ``n_tokens`` (compiled once per shape)."""
    plan = self.plan(n_tokens)
    key = (plan, packed)
    if key not in self._compiled:
      self._ensure_workspace(self.backend_of(plan), plan.padded)
      args = self._example_args(plan, packed)
      opts = xla_options.compile_options(self.platform, weave=plan.split is not None)
      lowered = self._build(plan, packed).lower(*args)
      self._compiled[key] = (plan, xla_options.compile_with(lowered, opts))
    return self._compiled[key]

  def _ensure_workspace(self, backend, tokens: int) -> None:
    """The fused backends need the library's workspace (allocated outside XLA) sized for the
    largest chunk; (re)allocate it when this mesh/size/dtype is not covered yet."""
    if not backend.name.startswith("fused"):
      return
    from weave_jax import fused
    ws = fused.workspace.current()
    want_ordinals = tuple(d.local_hardware_id for d in self.mesh.devices.flat)
    dtype = jnp.dtype(self.cfg.dtype)
    if (ws is None or ws.max_tokens < tokens or ws.hidden < self.cfg.hidden_size
        or ws.dtype != dtype or ws.ordinals != want_ordinals):
      max_tokens = max(tokens, ws.max_tokens if ws is not None else 0, 16384)
      fused.init_workspace(self.mesh, max_tokens=max_tokens, hidden=self.cfg.hidden_size,
                           dtype=dtype, transport=getattr(backend, "transport", "peer"))

  def _example_args(self, plan: Plan, packed: bool):
    i32 = jax.ShapeDtypeStruct((plan.padded,), jnp.int32)
    return (self.state, i32, i32, i32 if packed else None)

  def _pad(self, plan: Plan, tokens, positions, segment_ids):
    extra = plan.padded - plan.n_tokens
    tokens = np.pad(tokens, (0, extra))
    positions = np.pad(positions, (0, extra))
    if segment_ids is not None:
      segment_ids = np.pad(segment_ids, (0, extra), constant_values=-1)
    return tokens, positions, segment_ids

  def prepare(self, tokens, positions=None, segment_ids=None):
    """Validate, pad and place a batch.  Returns (plan, executable, args): ``executable(*args)``
    runs the forward with no host work (what benchmarks time)."""
    tokens, positions, segment_ids = self._validate(tokens, positions, segment_ids)
    plan, exe = self.compiled(tokens.size, segment_ids is not None)
    args = self._pad(plan, tokens, positions, segment_ids)
    replicated = jax.sharding.NamedSharding(self.mesh, P())
    args = tuple(None if a is None else jax.device_put(a, replicated) for a in args)
    return plan, exe, (self.state, *args)

  def __call__(self, tokens, positions=None, segment_ids=None) -> jax.Array:
    """Prefill forward.  tokens (T,) int; optional positions (T,), segment_ids (T,) for packed
    prompts.  Returns float32 logits (T, vocab), or (1, vocab) with ``logits="last"``."""
    plan, exe, args = self.prepare(tokens, positions, segment_ids)
    logits = exe(*args)
    return logits[-1:] if self.run.logits == "last" else logits[:plan.n_tokens]

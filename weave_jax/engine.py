"""The user-facing entry point: a sharded model + a run configuration -> jitted prefill forward.

    engine = Engine(model, mesh, RunConfig(backend="rs_ag", weave=True))
    logits = engine(tokens)                       # (T, vocab), float32

Handles input validation, padding to the TP size (real tokens stay exact), the weave split,
per-compile XLA options and the ``shard_map`` over the mesh.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels.attention import IMPLS as PAGED_IMPLS
from weave_jax import split as split_mod
from weave_jax import xla_options
from weave_jax.comm import AXIS, BACKENDS, FUSED, get_backend
from weave_jax.forward import forward_rank
from weave_jax.model import Transformer
from weave_jax.options import FusedOptions
from weave_jax.sharding import state_specs

# The smallest shared workspace an Engine asks for (tokens): later larger batches grow it, so
# most processes allocate once.
MIN_WORKSPACE_TOKENS = 16384


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How to run the model.  Frozen and hashable: it is part of the compile cache key.

  backend: communication backend name (``weave_jax.comm.BACKENDS``).
  options: ``FusedOptions`` of the fused backends (None: the defaults); the XLA backends take
    none.
  weave: split batches into two halves and overlap their communication.
  weave_min_tokens: batches smaller than this run unsplit.  None = what ``run/tune_split.py``
    measured for this device/model/TP/backend: the per-bucket verdict (woven faster or not)
    for measured buckets, its threshold for the others, else the device's dense / MoE
    threshold (``weave_jax.tuned``); at TP=1 never (no communication to overlap).
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
  options: FusedOptions | None = None
  weave: bool = False
  weave_min_tokens: int | None = None
  split: int | None = None
  attn_impl: str | None = None
  logits: str = "all"
  backend_by_size: bool = True
  paged_attention: str = "auto"

  def __post_init__(self):
    if not isinstance(self.backend, str) or self.backend not in BACKENDS:
      raise ValueError(f"RunConfig: backend must be one of {BACKENDS}, got {self.backend!r}")
    if self.options is not None:
      if not isinstance(self.options, FusedOptions):
        raise TypeError(f"RunConfig: options must be a FusedOptions or None, got "
                        f"{type(self.options).__name__}")
      if self.backend not in FUSED:
        raise ValueError(f"RunConfig: options are for the fused backends {FUSED}; backend "
                         f"{self.backend!r} takes none")
    for name in ("weave", "backend_by_size"):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"RunConfig: {name} must be a bool, got {getattr(self, name)!r}")
    for name in ("weave_min_tokens", "split"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise TypeError(f"RunConfig: {name} must be an int or None, got {value!r}")
      if value is not None and value < 1:
        raise ValueError(f"RunConfig: {name}={value} must be >= 1")
    if self.attn_impl is not None and not isinstance(self.attn_impl, str):
      raise TypeError(f"RunConfig: attn_impl must be a str or None, got {self.attn_impl!r}")
    if self.logits not in ("all", "last"):
      raise ValueError(f"RunConfig: logits must be 'all' or 'last', got {self.logits!r}")
    if self.paged_attention not in PAGED_IMPLS:
      raise ValueError(f"RunConfig: paged_attention must be one of {PAGED_IMPLS}, got "
                       f"{self.paged_attention!r}")


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


def _array(name: str, value) -> np.ndarray:
  """``value`` as a numpy array; TypeError naming ``name`` when numpy cannot hold it."""
  try:
    return np.asarray(value)
  except Exception as e:  # ragged lists, objects numpy cannot hold
    raise TypeError(f"Engine: {name} must be an integer array, got {type(value).__name__}") from e


def _check_integers(name: str, arr: np.ndarray) -> None:
  if not np.issubdtype(arr.dtype, np.integer):  # bools are not integers here
    raise TypeError(f"Engine: {name} must be integers, got {arr.dtype}")


def _check_contiguous(segment_ids: np.ndarray) -> None:
  """Raises ValueError unless every segment id forms one contiguous run."""
  starts = np.r_[True, segment_ids[1:] != segment_ids[:-1]]
  run_ids = segment_ids[starts]
  if len(np.unique(run_ids)) != len(run_ids):
    values, counts = np.unique(run_ids, return_counts=True)
    raise ValueError(f"Engine: segment_ids must be contiguous runs (one per packed prompt); id "
                     f"{values[counts > 1][0]} appears in {counts[counts > 1][0]} separate runs")


class Engine:
  """A TP-sharded model bound to a mesh and a RunConfig.  Call it on a token batch.

  ``workspace``: the fused backends' ``weave_jax.fused.Workspace`` (built on the same mesh);
  None: the process's shared workspace of these devices (``weave_jax.fused.workspace.shared``),
  grown for the engine's batches and opened at the first compile.
  The XLA backends take none.  Every call of a fused engine turns a kernel timeout into a
  ``FusedTimeoutError`` naming the rank and barrier.
  """

  def __init__(self, model: Transformer, mesh: Mesh, run: RunConfig = RunConfig(), *,
               workspace=None):
    if not isinstance(model, Transformer):
      raise TypeError(f"Engine: model must be a weave_jax Transformer, got {type(model).__name__}")
    if not isinstance(mesh, Mesh):
      raise TypeError(f"Engine: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if AXIS not in mesh.axis_names:
      raise ValueError(f"Engine: the mesh needs a {AXIS!r} axis, got axes {mesh.axis_names}")
    if not isinstance(run, RunConfig):
      raise TypeError(f"Engine: run must be a RunConfig, got {type(run).__name__}")
    self.cfg = model.cfg
    self.mesh, self.run = mesh, run
    self.tp = mesh.shape[AXIS]
    self.cfg.check_tp(self.tp)
    self._owns_workspace = workspace is None
    self.workspace = self._make_workspace(workspace)
    self.backend = self._get_backend(run.backend)
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

  def _make_workspace(self, workspace):
    """The given workspace (checked against the mesh and model), or the shared one of these
    devices for a fused backend; None for the XLA backends."""
    if self.run.backend not in FUSED:
      if workspace is not None:
        raise ValueError(f"Engine: backend {self.run.backend!r} takes no workspace")
      return None
    from weave_jax.fused import Workspace
    from weave_jax.fused import workspace as ws_lib
    transport = "multimem" if self.run.backend == "fused_multimem" else "peer"
    if workspace is None:
      return ws_lib.shared(self.mesh, axis_name=AXIS, max_tokens=MIN_WORKSPACE_TOKENS,
                           hidden=self.cfg.hidden_size, dtype=jnp.dtype(self.cfg.dtype),
                           transport=transport)
    if not isinstance(workspace, Workspace):
      raise TypeError(f"Engine: workspace must be a weave_jax.fused.Workspace, got "
                      f"{type(workspace).__name__}")
    groups = ws_lib.tp_groups(self.mesh, AXIS)
    if workspace.groups != groups or workspace.axis_name != AXIS:
      raise ValueError(f"Engine: the workspace's TP groups {workspace.groups} (axis "
                       f"{workspace.axis_name!r}) are not the mesh's {groups} (axis {AXIS!r})")
    if workspace.hidden < self.cfg.hidden_size or workspace.dtype != jnp.dtype(self.cfg.dtype):
      raise ValueError(f"Engine: the workspace (hidden {workspace.hidden}, {workspace.dtype}) "
                       f"does not fit the model (hidden {self.cfg.hidden_size}, {self.cfg.dtype})")
    return workspace

  def _get_backend(self, name: str):
    if name in FUSED:
      return get_backend(name, options=self.run.options, workspace=self.workspace)
    return get_backend(name)

  def _check_param_dtypes(self):
    want = jnp.dtype(self.cfg.dtype)
    for path, leaf in jax.tree_util.tree_leaves_with_path(self.state):
      if leaf.dtype != want:
        name = jax.tree_util.keystr(path)
        raise TypeError(f"Engine: parameter {name} has dtype {leaf.dtype}, config says {want}")

  # --- planning ------------------------------------------------------------------------------

  def plan(self, n_tokens: int) -> Plan:
    """Static decisions for a batch of ``n_tokens``: a function of the config (the workspace's
    included), mesh, device kind (its tuning table) and ``n_tokens`` alone."""
    if not isinstance(n_tokens, (int, np.integer)) or isinstance(n_tokens, bool) or n_tokens < 1:
      raise ValueError(f"Engine.plan: n_tokens={n_tokens!r} must be a positive integer")
    n_tokens = int(n_tokens)
    tp, run = self.tp, self.run
    min_tokens = run.weave_min_tokens
    measured = None  # the tuned per-bucket verdict, used only when no threshold is given
    if min_tokens is None and tp == 1:
      min_tokens = sys.maxsize    # one device: no collective for the other half to hide
    elif min_tokens is None:
      min_tokens = split_mod.weave_threshold(self.device_kind, self.cfg, tp, run.backend,
                                             sms=self.sms)
      measured = split_mod.tuned_weave(self.device_kind, self.cfg, tp, run.backend, n_tokens)
      if run.weave and not self._woven_as_tuned():
        measured = False
    woven = n_tokens >= max(min_tokens, 2 * tp) if measured is None else measured
    if not run.weave or not woven or n_tokens < 2 * tp:
      backend = run.backend
      if run.backend_by_size:
        tuned = split_mod.tuned_backend(self.device_kind, self.cfg, tp, run.backend, n_tokens)
        # only an XLA backend may stand in: a fused one needs a workspace nobody asked for
        backend = tuned if tuned in BACKENDS and tuned not in FUSED else backend
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
    them (``FusedP2P.woven_as_tuned``: a workspace without the copy engines); the tuned plan
    then stays unsplit, with one warning."""
    check = getattr(self.backend, "woven_as_tuned", None)
    if check is None or check():
      return True
    if not self._warned_untuned_weave:
      self._warned_untuned_weave = True
      warnings.warn(f"Engine: {self.run.backend} on a workspace without the copy engines (one "
                    "process per GPU, several TP groups, or copy_engine=False) runs woven calls "
                    "on the two-shot kernel, which measured slower than unsplit calls; the tuned "
                    "plan runs unsplit.  Set RunConfig.weave_min_tokens to weave anyway.",
                    RuntimeWarning, stacklevel=3)
    return False

  def backend_of(self, plan: Plan):
    """The backend object that runs ``plan`` (built on first use for a substituted one)."""
    if plan.backend not in self._backends:
      self._backends[plan.backend] = self._get_backend(plan.backend)
    return self._backends[plan.backend]

  # --- validation ----------------------------------------------------------------------------

  def _validate(self, tokens, positions, segment_ids):
    tokens = _array("tokens", tokens)
    if tokens.ndim != 1:
      raise ValueError(f"Engine: tokens must be 1-D (T,), got shape {tokens.shape}")
    if tokens.size == 0:
      raise ValueError("Engine: empty batch (0 tokens)")
    _check_integers("tokens", tokens)
    if tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size:
      raise ValueError(f"Engine: token ids must be in [0, {self.cfg.vocab_size}), got "
                       f"[{tokens.min()}, {tokens.max()}]")
    out = []
    for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
      if arr is None:
        out.append(None)
        continue
      arr = _array(name, arr)
      if arr.shape != tokens.shape:
        raise ValueError(f"Engine: {name} shape {arr.shape} != tokens shape {tokens.shape}")
      _check_integers(name, arr)
      if arr.min() < 0:
        raise ValueError(f"Engine: {name} must be >= 0, got {arr.min()} at index "
                         f"{int(np.argmin(arr))}")
      if arr.max() > np.iinfo(np.int32).max:
        raise ValueError(f"Engine: {name} must fit int32, got {arr.max()}")
      out.append(arr.astype(np.int32))
    positions, segment_ids = out
    if segment_ids is not None:
      _check_contiguous(segment_ids)
      if positions is None:
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
      self.open_workspace(plan.padded)
      args = self._example_args(plan, packed)
      opts = xla_options.compile_options(self.platform, weave=plan.split is not None)
      lowered = self._build(plan, packed).lower(*args)
      self._compiled[key] = (plan, xla_options.compile_with(lowered, opts))
    return self._compiled[key]

  def open_workspace(self, tokens: int) -> None:
    """Opens the fused workspace for batches of up to ``tokens`` (padded), first growing the
    engine's own one when it is smaller (a given one that is too small raises).  Callers that
    build their own programs over this engine's backend (the serving runner) call it before
    compiling."""
    ws = self.workspace
    if ws is None:
      return
    if tokens > ws.max_tokens:
      if not self._owns_workspace:
        raise ValueError(f"Engine: a batch of {tokens} tokens (padded) exceeds the given "
                         f"workspace's max_tokens={ws.max_tokens}")
      ws.grow(max_tokens=max(tokens, 2 * ws.max_tokens))
    ws.open()

  def timeout_errors(self):
    """Context manager that turns a fused kernel's timeout into FusedTimeoutError (rank,
    barrier); wrap every call of a program that runs the fused kernel, and block on its result
    inside."""
    if self.workspace is None:
      return contextlib.nullcontext()
    return self.workspace.raise_on_timeout()

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
    with self.timeout_errors():
      logits = exe(*args)
      if self.workspace is not None:  # a trapped kernel surfaces here, inside the handler
        logits = jax.block_until_ready(logits)
    return logits[-1:] if self.run.logits == "last" else logits[:plan.n_tokens]

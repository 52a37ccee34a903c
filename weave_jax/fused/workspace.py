"""Workspace of the fused kernel: an explicit object the user (or the Engine) creates and passes
to every fused call.  No module state selects a workspace.

The device buffers live outside XLA's allocator (cudaMalloc in ``ffi/workspace.cu``), one set
per device, and the FFI handlers find them by device ordinal.  Footprint per device (Tmax
tokens, H hidden, 2-byte dtype, ``num_slots`` slots, ``world`` ranks, Smax = ceil(Tmax / world))::

    (1 + num_slots) * world * Smax * H * 2
    + 2 * (world + 1) * Tos * H * 2  +  ~21 KiB,      Tos = max(1, min(Tmax, 1 MiB / (H * 2)))

e.g. Tmax=32768, H=8192, bf16, world=2, num_slots=2: 1.5 GiB + 6 MiB per device.

Lifecycle: ``Workspace(...)`` validates and records the configuration (pure Python, nothing
allocated; the compiled program depends only on it); ``open()`` allocates and proves peer
access; ``close()`` releases it.  One process driving every GPU: peer pointers (peer access
enabled).  One process per GPU (``jax.distributed``): CUDA IPC handles exchanged through the
distributed runtime's key-value store.  Both prove peer access with a real write/read-back
probe before the first call.

Several workspaces may be open in one process on disjoint devices (e.g. two engines on two
GPU pairs, or the TP groups of a data x tensor mesh).  The C++ side keeps one buffer set per
device and one host rendezvous per process (the copy-engine algorithm's), so: a device belongs
to one open workspace at a time, at most one open workspace uses the copy engines, and device
memory is returned when the last open workspace closes (``weave_ws_free_all``).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np

from weave_jax.fused import _lib

ENV_TIMEOUT_MS = "WEAVE_FUSED_TIMEOUT_MS"
DEFAULT_TIMEOUT_MS = 10_000.0
MAX_HIDDEN = 16384  # kThreads * kMaxVecPerThread * 8 in ffi/fused_reduce_add_norm.cuh
MAX_SLOTS = 4       # kMaxSlots
BARRIER_NAMES = {0: "start (inputs published)", 1: "end (outputs delivered)",
                 2: "copy-engine host rendezvous (inputs pushed)",
                 3: "copy-engine host rendezvous (rows reduced)",
                 4: "one-shot (inputs published)"}
DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))
ONE_SHOT_BYTES = 1 << 20  # kOneShotBytes: one-shot staging per source (ffi/workspace.cu)

# What the C++ side holds, process-wide: CUDA ordinal -> the open Workspace that owns it, and
# the open Workspace that owns the copy-engine host rendezvous.
_DEVICE_OWNER: dict[int, "Workspace"] = {}
_RENDEZVOUS_OWNER: list = []
_SHARED: dict = {}   # (TP groups, axis name) -> the default workspace of engines given none
_IPC_GENERATION = itertools.count()


class FusedTimeoutError(RuntimeError):
  """A fused kernel's barrier timed out: a peer never arrived."""


def tp_groups(devices_or_mesh, axis_name: str) -> tuple[tuple, ...]:
  """TP groups in rank order: one per index of the mesh's other axes, or the one device list."""
  if isinstance(devices_or_mesh, jax.sharding.Mesh):
    mesh = devices_or_mesh
    if axis_name not in mesh.axis_names:
      raise ValueError(f"Workspace: axis_name={axis_name!r} is not an axis of the mesh "
                       f"{dict(mesh.shape)}")
    axis = mesh.axis_names.index(axis_name)
    grid = np.moveaxis(mesh.devices, axis, -1).reshape(-1, mesh.shape[axis_name])
    return tuple(tuple(row) for row in grid)
  if isinstance(devices_or_mesh, (str, bytes)) or not hasattr(devices_or_mesh, "__iter__"):
    raise TypeError(f"Workspace: devices_or_mesh must be a Mesh or a sequence of devices, got "
                    f"{type(devices_or_mesh).__name__}")
  devices = tuple(devices_or_mesh)
  if len(set(devices)) != len(devices):
    raise ValueError(f"Workspace: devices repeat: {devices}")
  return (devices,)


def _positive_int(op: str, name: str, value, lo: int, hi: int | None = None) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{op}: {name} must be an integer, got {value!r}")
  if value < lo or (hi is not None and value > hi):
    raise ValueError(f"{op}: {name}={value} outside {lo}..{hi if hi is not None else 'inf'}")
  return int(value)


def _hidden(op: str, value) -> int:
  """``value`` as a hidden size the kernel takes: a multiple of 8 in 8..MAX_HIDDEN."""
  hidden = _positive_int(op, "hidden", value, 8, MAX_HIDDEN)
  if hidden % 8:
    raise ValueError(f"{op}: hidden={hidden} must be a multiple of 8 in 8..{MAX_HIDDEN}")
  return hidden


class Workspace:
  """The fused kernel's buffers for one TP group (or the TP groups of a multi-axis mesh).

  Args:
    devices_or_mesh: jax devices in rank order, or a Mesh: its ``axis_name`` axis is the TP
      group, one group per index of its other axes.
    max_tokens: largest token count T of any later call.
    hidden: largest hidden size H (multiple of 8, <= 16384).
    dtype: bf16 or fp16: the dtype of every later call.
    num_slots: start/done calls that may be in flight at once (1..4).
    timeout_ms: barrier spin limit; default $WEAVE_FUSED_TIMEOUT_MS or 10 s.
    transport: "peer" (NVLink peer loads/stores) or "multimem" (NVLS; passes the multicast gate,
      which refuses unless WEAVE_ENABLE_MULTIMEM=1 and nothing disables NVLS).
    axis_name: the TP axis of a Mesh (and of the ``shard_map`` the calls run in).
    copy_engine: allow the copy-engine algorithm (one per process; see the module docstring).
      None: where it can run (one process driving the only TP group).

  Everything is validated here; nothing is allocated until ``open()``.
  """

  def __init__(self, devices_or_mesh, *, max_tokens: int, hidden: int, dtype=jnp.bfloat16,
               num_slots: int = 2, timeout_ms: float | None = None, transport: str = "peer",
               axis_name: str = "tp", copy_engine: bool | None = None):
    op = "Workspace"
    if not isinstance(axis_name, str) or not axis_name:
      raise TypeError(f"{op}: axis_name must be a non-empty str, got {axis_name!r}")
    self.axis_name = axis_name
    self.groups = tp_groups(devices_or_mesh, axis_name)
    self.world = len(self.groups[0])
    if not 2 <= self.world <= 8:
      raise ValueError(f"{op}: world size {self.world} outside 2..8")
    self.max_tokens = _positive_int(op, "max_tokens", max_tokens, 1)
    self.hidden = _hidden(op, hidden)
    try:
      self.dtype = np.dtype(dtype)
    except TypeError as e:
      raise TypeError(f"{op}: dtype={dtype!r} is not a dtype") from e
    if self.dtype not in DTYPES:
      raise ValueError(f"{op}: dtype={self.dtype} must be bfloat16 or float16")
    self.num_slots = _positive_int(op, "num_slots", num_slots, 1, MAX_SLOTS)
    if transport not in ("peer", "multimem"):
      raise ValueError(f"{op}: transport={transport!r} must be 'peer' or 'multimem'")
    self.transport = transport
    timeout = timeout_ms if timeout_ms is not None else os.environ.get(ENV_TIMEOUT_MS,
                                                                       DEFAULT_TIMEOUT_MS)
    try:
      self.timeout_ms = float(timeout)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{op}: timeout_ms={timeout!r} is not a number") from e
    if not self.timeout_ms > 0:
      raise ValueError(f"{op}: timeout_ms={self.timeout_ms} must be > 0")
    self.mode = self._mode()
    can_ce = self.mode == "local" and len(self.groups) == 1 and transport == "peer"
    if copy_engine not in (None, True, False):
      raise TypeError(f"{op}: copy_engine must be a bool or None, got {copy_engine!r}")
    if copy_engine and not can_ce:
      raise ValueError(f"{op}: copy_engine=True needs one process driving the only TP group "
                       f"over the peer transport (this is {self.mode!r}, {len(self.groups)} "
                       f"group(s), {transport!r})")
    self.copy_engine = can_ce if copy_engine is None else copy_engine
    first = self.groups[0][0]
    self.device_kind = getattr(first, "device_kind", first.platform)
    self.sms = getattr(first, "core_count", None) if first.platform == "gpu" else None
    local = [d for g in self.groups for d in g if d.process_index == jax.process_index()]
    self.ordinals = tuple(d.local_hardware_id if d.local_hardware_id is not None else d.id
                          for d in local)
    self.peer_ok = False
    self.probe_message = "not opened"
    self._open = False

  def _mode(self) -> str:
    me = jax.process_index()
    local = [sum(d.process_index == me for d in g) for g in self.groups]
    if all(n == self.world for n in local):
      return "local"
    if len(self.groups) == 1 and local == [1]:
      return "ipc"
    raise ValueError(f"Workspace: this process holds {local} of {self.world} devices per "
                     "group; use one process for all or one device per process")

  def __repr__(self) -> str:
    state = "open" if self._open else "closed"
    return (f"Workspace({state}, {len(self.groups)} x TP{self.world} on {self.device_kind}, "
            f"max_tokens={self.max_tokens}, hidden={self.hidden}, dtype={self.dtype}, "
            f"mode={self.mode}, transport={self.transport}, copy_engine={self.copy_engine})")

  @property
  def is_open(self) -> bool:
    return self._open

  def one_shot_rows(self) -> int:
    """Largest T the one-shot algorithm takes (mirrors ``ffi/workspace.cu``)."""
    return max(1, min(self.max_tokens, ONE_SHOT_BYTES // (self.hidden * self.dtype.itemsize)))

  def covers(self, *, tokens: int, hidden: int, dtype) -> bool:
    """Whether calls of (tokens, hidden, dtype) fit this workspace."""
    return tokens <= self.max_tokens and hidden <= self.hidden and np.dtype(dtype) == self.dtype

  # --- allocation ----------------------------------------------------------------------------

  def open(self) -> "Workspace":
    """Allocates every local device's buffers and proves peer access.  Idempotent.

    When the peer probe fails, ``peer_ok`` is False and the fused backends fall back to rs_ag
    with one warning."""
    if self._open:
      return self
    op = "Workspace.open"
    devices = [d for g in self.groups for d in g]
    if any(d.platform != "gpu" for d in devices):
      raise ValueError(f"{op}: every device must be a CUDA GPU, got {devices}")
    for o in self.ordinals:
      if o in _DEVICE_OWNER:
        raise ValueError(f"{op}: CUDA device {o} belongs to another open workspace "
                         f"({_DEVICE_OWNER[o]!r}); close() it first")
    if self.copy_engine and _RENDEZVOUS_OWNER:
      raise ValueError(f"{op}: another open workspace uses the copy engines (one host "
                       "rendezvous per process); create this one with copy_engine=False")
    lib = _lib.load()
    for o in self.ordinals:
      _DEVICE_OWNER[o] = self
    try:
      self._allocate(lib)
    except BaseException:
      self._release()
      raise
    if self.copy_engine:
      _RENDEZVOUS_OWNER.append(self)
    self._open = True
    return self

  def _allocate(self, lib) -> None:
    op = "Workspace.open"
    err = _lib.errbuf()
    if self.mode == "local":
      self.peer_ok, self.probe_message = True, ""
      for group in self.groups:
        arr = (ctypes.c_int * self.world)(*(d.local_hardware_id for d in group))
        rc = lib.weave_ws_init_local(self.world, arr, self.max_tokens, self.hidden,
                                     self.dtype.itemsize, self.num_slots, err, len(err))
        if rc == 0:
          rc = lib.weave_ws_probe(self.world, arr, err, len(err))
        if rc == -1:
          raise RuntimeError(f"{op}: {err.value.decode()}")
        if rc != 0:
          self.peer_ok, self.probe_message = False, err.value.decode()
    else:
      group = self.groups[0]
      me = [d for d in group if d.process_index == jax.process_index()][0]
      self.peer_ok, self.probe_message = _init_ipc(
          lib, me.local_hardware_id, group.index(me), self.world, self.max_tokens, self.hidden,
          self.dtype.itemsize, self.num_slots)
    for o in self.ordinals:
      lib.weave_ws_set_timeout_ms(o, self.timeout_ms)
    if self.transport == "multimem":
      if self.mode != "local" or len(self.groups) != 1:
        raise NotImplementedError(f"{op}: the multimem transport runs one process, one group")
      arr = (ctypes.c_int * self.world)(*self.ordinals)
      if lib.weave_multicast_create(self.world, arr, err, len(err)) != 0:
        raise RuntimeError(f"{op}: {err.value.decode()}")

  def grow(self, *, max_tokens: int | None = None, hidden: int | None = None) -> None:
    """Raises ``max_tokens`` / ``hidden`` to at least these values, reallocating an open
    workspace (compiled programs stay valid: the handlers find the buffers by device)."""
    op = "Workspace.grow"
    want_t = self.max_tokens if max_tokens is None else _positive_int(op, "max_tokens",
                                                                       max_tokens, 1)
    want_h = self.hidden if hidden is None else _hidden(op, hidden)
    if want_t <= self.max_tokens and want_h <= self.hidden:
      return
    reopen = self._open
    self.close()
    self.max_tokens, self.hidden = max(want_t, self.max_tokens), max(want_h, self.hidden)
    if reopen:
      self.open()

  def close(self) -> None:
    """Releases the devices; the last open workspace's close frees the device memory.  Safe
    to call twice."""
    if not self._open:
      return
    self._open = False
    self._release()

  def _release(self) -> None:
    for o in self.ordinals:
      if _DEVICE_OWNER.get(o) is self:
        del _DEVICE_OWNER[o]
    if self in _RENDEZVOUS_OWNER:
      _RENDEZVOUS_OWNER.remove(self)
    if not _DEVICE_OWNER and _lib.available():
      err = _lib.errbuf()
      _lib.load().weave_ws_free_all(err, len(err))

  def __enter__(self) -> "Workspace":
    return self.open()

  def __exit__(self, *exc) -> None:
    self.close()

  def require_open(self, op: str) -> None:
    if not self._open:
      raise RuntimeError(f"{op}: the workspace is not open; call workspace.open() first ({self!r})")

  # --- error records, test aids --------------------------------------------------------------

  def timeout_error(self) -> FusedTimeoutError | None:
    """Reads every local device's host-mapped error record; returns an error naming the rank
    and barrier of the first recorded timeout, or None."""
    if not self._open:
      return None
    lib = _lib.load()
    rec = (ctypes.c_int32 * 6)()
    for o in self.ordinals:
      if lib.weave_ws_read_error(o, rec) == 0 and rec[0] == 1:
        return _timeout_error(o, *list(rec)[1:])
    return None

  @contextlib.contextmanager
  def raise_on_timeout(self):
    """Turns an XLA failure caused by a barrier timeout into a FusedTimeoutError that names
    the rank and barrier (read from the host-mapped record)."""
    try:
      yield self
    except Exception as exc:
      if (err := self.timeout_error()) is not None:
        raise err from exc
      raise

  def poison_slots(self) -> None:
    """Test aid: fills every output/residual slot with NaN (0xFF bytes) on every local device."""
    self.require_open("poison_slots")
    for o in self.ordinals:
      if _lib.load().weave_ws_poison(o) != 0:
        raise RuntimeError(f"poison_slots: failed on CUDA device {o}")

  def handler_calls(self) -> dict[int, tuple[int, int]]:
    """{CUDA ordinal: (invocations, under capture)} of the synchronous fused call's handler
    since open, per local device.  XLA runs the handler once per executed call, except inside a
    command buffer: there it runs it while recording the CUDA graph and replays the graph
    afterwards without it.  So captured > 0 with fewer invocations than calls executed shows
    that graphs were replayed."""
    self.require_open("handler_calls")
    out = {}
    counts = (ctypes.c_uint64 * 2)()
    for o in self.ordinals:
      if _lib.load().weave_ws_call_counts(o, counts) != 0:
        raise RuntimeError(f"handler_calls: no workspace on CUDA device {o}")
      out[o] = (int(counts[0]), int(counts[1]))
    return out


def shared(mesh, *, axis_name: str, max_tokens: int, hidden: int, dtype,
           transport: str = "peer") -> Workspace:
  """The process's default workspace for the TP groups of ``mesh`` (what an Engine uses when
  given none), grown in place to cover ``max_tokens`` and ``hidden``.  Engines on the same
  devices share it; one with another dtype or transport needs its own explicit Workspace."""
  probe = Workspace(mesh, max_tokens=max_tokens, hidden=hidden, dtype=dtype,
                    transport=transport, axis_name=axis_name)
  key = (probe.groups, axis_name)
  ws = _SHARED.get(key)
  if ws is None:
    _SHARED[key] = probe
    return probe
  if (ws.dtype, ws.transport) != (probe.dtype, probe.transport):
    raise ValueError(f"the shared workspace of these devices is {ws.dtype}/{ws.transport}; a "
                     f"{probe.dtype}/{probe.transport} engine on them needs its own Workspace "
                     "(and the other one closed while it runs)")
  ws.grow(max_tokens=max_tokens, hidden=hidden)
  return ws


def _timeout_error(ordinal, rank, peer, barrier, block, epoch) -> FusedTimeoutError:
  name = BARRIER_NAMES.get(barrier, "?")
  if block < 0:  # the copy-engine algorithm's host rendezvous: the call returned an error
    return FusedTimeoutError(
        f"weave_fused: rank {rank} (CUDA device {ordinal}) timed out at barrier {barrier} "
        f"'{name}' waiting for rank {peer} (call {epoch & 0xffffffff}); nothing trapped, but "
        "copy-engine calls fail until the workspace is opened again")
  return FusedTimeoutError(
      f"weave_fused_ran: rank {rank} (CUDA device {ordinal}) timed out at barrier {barrier} "
      f"'{name}' waiting for rank {peer} (block {block}, epoch {epoch & 0xffffffff}); the kernel "
      "trapped, this process's CUDA context is unusable")


def _init_ipc(lib, ordinal, rank, world, max_tokens, hidden, itemsize,
              num_slots) -> tuple[bool, str]:
  """One process per GPU: export this rank's handles, fetch every peer's from the KV store,
  open them, and run the write/read-back probe.  Returns (peer_ok, message), equal on every
  rank: each rank publishes its probe outcome and all of them must pass, so that either every
  rank runs the fused kernel or every rank falls back (a mix would leave barriers unpaired).
  """
  from jax._src import distributed

  client = distributed.global_state.client
  if client is None:
    raise RuntimeError("Workspace.open: one device per process needs "
                       "jax.distributed.initialize()")
  nbytes = lib.weave_ws_ipc_handle_bytes()
  mine = (ctypes.c_uint8 * nbytes)()
  err = _lib.errbuf()
  if lib.weave_ws_init_ipc_export(ordinal, rank, world, max_tokens, hidden, itemsize, num_slots,
                                  mine, err, len(err)) != 0:
    raise RuntimeError(f"Workspace.open: {err.value.decode()}")
  gen = next(_IPC_GENERATION)

  def exchange(kind: str, value: bytes) -> list[bytes]:
    client.key_value_set_bytes(f"weave_fused/{gen}/{kind}/{rank}", value)
    return [client.blocking_key_value_get_bytes(f"weave_fused/{gen}/{kind}/{q}", 60_000)
            for q in range(world)]

  blob = b"".join(exchange("handles", bytes(mine)))
  all_handles = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
  if lib.weave_ws_init_ipc_open(ordinal, all_handles, err, len(err)) != 0:
    raise RuntimeError(f"Workspace.open: {err.value.decode()}")
  # probe: every rank writes into every peer's memory, then (after all wrote) checks its own
  rc = lib.weave_ws_probe_ipc_write(ordinal, err, len(err))
  outcome = "ok" if rc == 0 else err.value.decode() or f"error {rc}"
  exchange("probe_written", outcome.encode())
  if rc == 0:
    rc = lib.weave_ws_probe_ipc_check(ordinal, err, len(err))
    outcome = "ok" if rc == 0 else err.value.decode() or f"error {rc}"
  failed = [f"rank {q}: {o.decode()}" for q, o in enumerate(exchange("probe", outcome.encode()))
            if o != b"ok"]
  if failed:
    return False, "; ".join(failed)
  return True, f"ipc write/read-back probe passed on {world} ranks"


def _close_all() -> None:
  for ws in {id(w): w for w in _DEVICE_OWNER.values()}.values():
    ws.close()


atexit.register(_close_all)

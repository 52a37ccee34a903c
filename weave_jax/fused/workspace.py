"""Workspace of the fused kernel: explicit init, peer probe, error records, free at exit.

The workspace lives outside XLA's allocator (cudaMalloc in ``ffi/workspace.cu``), one per
device, and the FFI handlers find it by device ordinal.  Footprint per device (Tmax tokens,
H hidden, 2-byte dtype, ``num_slots`` slots, ``world`` ranks, Smax = ceil(Tmax / world))::

    (1 + num_slots) * world * Smax * H * 2
    + 2 * (world + 1) * Tos * H * 2  +  ~21 KiB,      Tos = max(1, min(Tmax, 1 MiB / (H * 2)))

e.g. Tmax=32768, H=8192, bf16, world=2, num_slots=2: 1.5 GiB + 6 MiB per device.

One process driving every GPU: peer pointers (peer access enabled).  One process per GPU
(``jax.distributed``): CUDA IPC handles exchanged through the distributed runtime's key-value
store (``_init_ipc``).  Both prove peer access with a real write/read-back probe before the
first call.
"""
from __future__ import annotations

import atexit
import ctypes
import dataclasses
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np

from weave_jax.fused import _lib

ENV_TIMEOUT_MS = "WEAVE_FUSED_TIMEOUT_MS"
DEFAULT_TIMEOUT_MS = 10_000.0
MAX_HIDDEN = 16384  # kThreads * kMaxVecPerThread * 8 in ffi/fused_reduce_add_norm.cuh
BARRIER_NAMES = {0: "start (inputs published)", 1: "end (outputs delivered)",
                 2: "copy-engine host rendezvous (inputs pushed)",
                 3: "copy-engine host rendezvous (rows reduced)",
                 4: "one-shot (inputs published)"}


@dataclasses.dataclass(frozen=True)
class Workspace:
  """What Python knows of the initialised workspace (the C++ side holds the pointers)."""

  ordinals: tuple[int, ...]   # local CUDA ordinals, in rank order (this process's only)
  ranks: tuple[int, ...]      # rank of each ordinal above
  world: int
  max_tokens: int
  hidden: int
  dtype: np.dtype
  num_slots: int
  mode: str                   # "local" (peer pointers) or "ipc" (one process per GPU)
  transport: str              # "peer" or "multimem"
  peer_ok: bool               # the write/read-back probe passed
  probe_message: str = ""


_WORKSPACE: Workspace | None = None
_IPC_GENERATION = itertools.count()


class FusedTimeoutError(RuntimeError):
  """A fused kernel's barrier timed out: a peer never arrived."""


def current() -> Workspace | None:
  return _WORKSPACE


def _devices_in_rank_order(devices_or_mesh) -> list:
  if isinstance(devices_or_mesh, jax.sharding.Mesh):
    mesh = devices_or_mesh
    if any(size != 1 for name, size in mesh.shape.items() if name != "tp"):
      raise ValueError(f"init_workspace: mesh {dict(mesh.shape)} must have only the 'tp' axis > 1")
    return list(mesh.devices.flat)
  return list(devices_or_mesh)


def init_workspace(devices_or_mesh, *, max_tokens: int, hidden: int, dtype=jnp.bfloat16,
                   num_slots: int = 2, timeout_ms: float | None = None,
                   transport: str = "peer") -> Workspace:
  """Allocates the workspace on every device of the TP group and proves peer access.

  Args:
    devices_or_mesh: jax devices in rank order, or a Mesh whose only non-trivial axis is "tp".
    max_tokens: largest token count T of any later call.
    hidden: largest hidden size H (multiple of 8, <= 16384).
    dtype: bf16 or fp16: the dtype of every later call.
    num_slots: output slots for start/done calls in flight at once (1..4).
    timeout_ms: barrier spin limit; default $WEAVE_FUSED_TIMEOUT_MS or 10 s.
    transport: "peer" (NVLink peer loads/stores) or "multimem" (NVLS; passes the multicast gate,
      which refuses unless WEAVE_ENABLE_MULTIMEM=1 and nothing disables NVLS).

  Returns the Workspace record.  When the peer probe fails, ``peer_ok`` is False and the fused
  backends fall back to rs_ag with one warning.
  """
  global _WORKSPACE
  op = "init_workspace"
  lib = _lib.load()
  if _WORKSPACE is not None:
    free_workspace()
  devices = _devices_in_rank_order(devices_or_mesh)
  world = len(devices)
  dtype = np.dtype(dtype)
  if not 2 <= world <= 8:
    raise ValueError(f"{op}: world size {world} outside 2..8")
  if hidden % 8 or not 8 <= hidden <= MAX_HIDDEN:
    raise ValueError(f"{op}: hidden={hidden} must be a multiple of 8 in 8..{MAX_HIDDEN}")
  if max_tokens < 1:
    raise ValueError(f"{op}: max_tokens={max_tokens} must be >= 1")
  if dtype not in (np.dtype(jnp.bfloat16), np.dtype(jnp.float16)):
    raise ValueError(f"{op}: dtype={dtype} must be bfloat16 or float16")
  if not 1 <= num_slots <= 4:
    raise ValueError(f"{op}: num_slots={num_slots} outside 1..4")
  if transport not in ("peer", "multimem"):
    raise ValueError(f"{op}: transport={transport!r} must be 'peer' or 'multimem'")
  if any(d.platform != "gpu" for d in devices):
    raise ValueError(f"{op}: every device must be a CUDA GPU, got {devices}")
  timeout = float(timeout_ms if timeout_ms is not None
                  else os.environ.get(ENV_TIMEOUT_MS, DEFAULT_TIMEOUT_MS))
  local = [d for d in devices if d.process_index == jax.process_index()]
  ordinals = tuple(d.local_hardware_id for d in local)
  ranks = tuple(devices.index(d) for d in local)
  err = _lib.errbuf()
  if len(local) == world:
    mode = "local"
    arr = (ctypes.c_int * world)(*ordinals)
    rc = lib.weave_ws_init_local(world, arr, max_tokens, hidden, dtype.itemsize, num_slots, err,
                                 len(err))
    peer_ok, message = rc == 0, err.value.decode()
    if rc == -1:
      raise RuntimeError(f"{op}: {message}")
    if peer_ok:
      rc = lib.weave_ws_probe(world, arr, err, len(err))
      peer_ok, message = rc == 0, err.value.decode()
      if rc == -1:
        raise RuntimeError(f"{op}: {message}")
  elif len(local) == 1:
    mode = "ipc"
    peer_ok, message = _init_ipc(lib, ordinals[0], ranks[0], world, max_tokens, hidden,
                                 dtype.itemsize, num_slots)
  else:
    raise ValueError(f"{op}: this process holds {len(local)} of {world} devices; "
                     "use one process for all or one device per process")
  for o in ordinals:
    lib.weave_ws_set_timeout_ms(o, timeout)
  if transport == "multimem":
    if mode != "local":
      raise NotImplementedError(f"{op}: multimem transport is single-process only")
    arr = (ctypes.c_int * world)(*ordinals)
    rc = lib.weave_multicast_create(world, arr, err, len(err))
    if rc != 0:
      free_workspace()
      raise RuntimeError(f"{op}: {err.value.decode()}")
  _WORKSPACE = Workspace(ordinals=ordinals, ranks=ranks, world=world, max_tokens=max_tokens,
                         hidden=hidden, dtype=dtype, num_slots=num_slots, mode=mode,
                         transport=transport, peer_ok=peer_ok, probe_message=message)
  return _WORKSPACE


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
    raise RuntimeError("init_workspace: one device per process needs jax.distributed.initialize()")
  nbytes = lib.weave_ws_ipc_handle_bytes()
  mine = (ctypes.c_uint8 * nbytes)()
  err = _lib.errbuf()
  if lib.weave_ws_init_ipc_export(ordinal, rank, world, max_tokens, hidden, itemsize, num_slots,
                                  mine, err, len(err)) != 0:
    raise RuntimeError(f"init_workspace: {err.value.decode()}")
  gen = next(_IPC_GENERATION)

  def exchange(kind: str, value: bytes) -> list[bytes]:
    client.key_value_set_bytes(f"weave_fused/{gen}/{kind}/{rank}", value)
    return [client.blocking_key_value_get_bytes(f"weave_fused/{gen}/{kind}/{q}", 60_000)
            for q in range(world)]

  blob = b"".join(exchange("handles", bytes(mine)))
  all_handles = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
  if lib.weave_ws_init_ipc_open(ordinal, all_handles, err, len(err)) != 0:
    raise RuntimeError(f"init_workspace: {err.value.decode()}")
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


def free_workspace() -> None:
  """Frees every device's workspace (registered with atexit).  Safe to call twice."""
  global _WORKSPACE
  if _WORKSPACE is None:
    return
  _WORKSPACE = None
  err = _lib.errbuf()
  _lib.load().weave_ws_free_all(err, len(err))


def poison_slots() -> None:
  """Test aid: fills every output/residual slot with NaN (0xFF bytes) on every local device."""
  ws = _WORKSPACE
  if ws is None:
    raise RuntimeError("poison_slots: workspace not initialised")
  for o in ws.ordinals:
    if _lib.load().weave_ws_poison(o) != 0:
      raise RuntimeError(f"poison_slots: failed on CUDA device {o}")


def handler_calls() -> dict[int, tuple[int, int]]:
  """{CUDA ordinal: (invocations, under capture)} of the synchronous fused call's handler since
  init, per local device.  XLA runs the handler once per executed call, except inside a command
  buffer: there it runs it while recording the CUDA graph (under stream capture) and replays
  the graph afterwards without it.  So captured > 0 with fewer invocations than calls executed
  shows that graphs were replayed."""
  ws = _WORKSPACE
  if ws is None:
    raise RuntimeError("handler_calls: workspace not initialised")
  out = {}
  counts = (ctypes.c_uint64 * 2)()
  for o in ws.ordinals:
    if _lib.load().weave_ws_call_counts(o, counts) != 0:
      raise RuntimeError(f"handler_calls: no workspace on CUDA device {o}")
    out[o] = (int(counts[0]), int(counts[1]))
  return out


def timeout_error() -> FusedTimeoutError | None:
  """Reads every local device's host-mapped error record; returns an error naming the rank
  and barrier of the first recorded timeout, or None."""
  ws = _WORKSPACE
  if ws is None:
    return None
  lib = _lib.load()
  rec = (ctypes.c_int32 * 6)()
  for o in ws.ordinals:
    if lib.weave_ws_read_error(o, rec) == 0 and rec[0] == 1:
      code, rank, peer, barrier, block, epoch = list(rec)
      if block < 0:  # the copy-engine algorithm's host rendezvous: the call returned an error
        return FusedTimeoutError(
            f"weave_fused: rank {rank} (CUDA device {o}) timed out at barrier {barrier} "
            f"'{BARRIER_NAMES.get(barrier, '?')}' waiting for rank {peer} (call "
            f"{epoch & 0xffffffff}); nothing trapped, but copy-engine calls fail until "
            "init_workspace() runs again")
      return FusedTimeoutError(
          f"weave_fused_ran: rank {rank} (CUDA device {o}) timed out at barrier {barrier} "
          f"'{BARRIER_NAMES.get(barrier, '?')}' waiting for rank {peer} (block {block}, epoch "
          f"{epoch & 0xffffffff}); the kernel trapped, this process's CUDA context is unusable")
  return None


class raise_on_timeout:
  """Context manager: turns an XLA launch failure caused by a barrier timeout into a
  FusedTimeoutError that names the rank and barrier (read from the host-mapped record)."""

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc is not None and (err := timeout_error()) is not None:
      raise err from exc
    return False


atexit.register(free_workspace)

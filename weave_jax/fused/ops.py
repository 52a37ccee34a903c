"""JAX wrappers of the fused AllReduce + residual + RMSNorm FFI targets.

Every function here runs INSIDE ``jax.shard_map`` over the workspace's TP axis (local shapes):

    partial  (T, H)   this rank's partial sum, any T in 1..max_tokens
    residual (S, H)   S = ceil(T / world); rank r owns tokens [r*S, min((r+1)*S, T))
    weight   (H,)
    -> normed (T, H) replicated, new_residual (S, H)

Each call names its ``Workspace`` (``weave_jax.fused.workspace``), which must be open when the
call is traced.  Inputs are validated in Python before anything launches; each error names the
op and the bad value.  The kernel itself is documented in ``ffi/fused_reduce_add_norm.cuh``.

Algorithms (``algorithm=``; "auto" picks by message size, see ``choose_algorithm``):

    one_shot     every rank pushes its whole partial (and its residual rows) to every peer and
                 normalizes every row itself: one barrier; T <= the workspace's one-shot rows
    two_shot     reduce-scatter by NVLink stores, norm on my rows, all-gather by NVLink stores:
                 two barriers, ``ctas`` SMs do all the copying
    copy_engine  the two-shot data flow with the NVLink copies on the copy engines: push copies,
                 a local reduce + norm kernel of ``ce_ctas`` blocks, pull copies, pipelined
                 over ``ce_chunks`` chunks of rows.  Ranks meet on the host and order their
                 streams with cross-device CUDA events, so nothing spins on the GPU and no SM
                 copies.  One process driving every GPU only (``Workspace.copy_engine``); it
                 relies on XLA running each device's program on its own host thread (true of
                 JAX 0.11.2's GPU client); not under CUDA graph capture.

The numbers "auto" uses (grids, size thresholds) come from the device's tuning table
(``weave_jax.tuned.kernel_params``), keyed by device kind, TP and token bucket.
"""
from __future__ import annotations

import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np

from weave_jax import tuned
from weave_jax.fused import _lib
from weave_jax.fused.workspace import Workspace
from weave_jax.options import (MAX_CE_CTAS, MAX_CTAS, check_algorithm, check_chunks,
                               check_cmd_buffer, check_grid)

_TRANSPORTS = {"peer": 0, "multimem": 1}
#: FFI attribute ``algo`` codes (the ABI of ``ffi/handlers.cu``), one per public algorithm.
ALGORITHMS = {"two_shot": 0, "copy_engine": 1, "one_shot": 2}


def kernel_params(ws: Workspace, tokens: int) -> tuned.KernelParams:
  return tuned.kernel_params(ws.device_kind, ws.world, tokens, sms=ws.sms)


def ce_chunks_for(tokens: int, hidden: int, itemsize: int, ws: Workspace) -> int:
  """The chunks "auto" pipelines a copy-engine call in: 2 from the tuned slice size, else 1
  (each chunk adds host-enqueued copies, a launch and event waits)."""
  slice_bytes = -(-tokens // ws.world) * hidden * itemsize
  return 2 if slice_bytes >= kernel_params(ws, tokens).ce_two_chunks_min_slice_bytes else 1


def choose_algorithm(tokens: int, hidden: int, itemsize: int, ws: Workspace,
                     woven: bool = False) -> str:
  """The algorithm "auto" runs for a (tokens, hidden) message: one-shot up to the tuned size;
  for a woven call (``fused_start``) on a workspace that may use them, the copy engines from
  the tuned size (they leave the SMs to the other half's GEMMs); else the two-shot kernel
  (multimem: always two-shot).  Unsplit calls keep the kernels at every size: the copy
  engines measured slower in the unsplit model (4 x H200, 2026-11-22)."""
  if ws.transport != "peer":
    return "two_shot"
  params = kernel_params(ws, tokens)
  nbytes = tokens * hidden * itemsize
  if nbytes <= params.one_shot_max_bytes and tokens <= ws.one_shot_rows():
    return "one_shot"
  if woven and ws.copy_engine and nbytes >= params.woven_copy_engine_min_bytes:
    return "copy_engine"
  return "two_shot"


def _resolve(op: str, ws: Workspace, partial, algorithm: str, ctas, ce_ctas, ce_chunks,
             woven: bool):
  """(algorithm, grid, chunks) for a call, validated.  Runs after _validate."""
  check_algorithm(op, "algorithm", algorithm)
  check_chunks(op, ce_chunks)
  tokens, hidden = partial.shape
  params = kernel_params(ws, tokens)
  if algorithm == "auto":
    algorithm = choose_algorithm(tokens, hidden, partial.dtype.itemsize, ws, woven)
  if ws.transport != "peer" and algorithm != "two_shot":
    raise ValueError(f"{op}: the {ws.transport} transport runs only algorithm='two_shot'")
  if algorithm == "one_shot" and tokens > ws.one_shot_rows():
    raise ValueError(f"{op}: algorithm='one_shot' needs tokens <= {ws.one_shot_rows()} "
                     f"(1 MiB per source at hidden={ws.hidden}), got {tokens}")
  if algorithm == "copy_engine":
    if not ws.copy_engine:
      raise ValueError(f"{op}: algorithm='copy_engine' needs a workspace with copy_engine=True "
                       f"(one process driving the only TP group); this is {ws!r}")
    ce_ctas = params.ce_ctas if ce_ctas is None else ce_ctas
    check_grid(op, "ce_ctas", ce_ctas, MAX_CE_CTAS)
    grid = int(ce_ctas)
    chunks = (ce_chunks_for(tokens, hidden, partial.dtype.itemsize, ws)
              if ce_chunks == "auto" else int(ce_chunks))
  else:
    ctas = (params.weave_ctas if woven else params.ctas) if ctas is None else ctas
    check_grid(op, "ctas", ctas, MAX_CTAS)
    grid, chunks = int(ctas), 1
  _lib.register_targets()  # last: everything above raises before anything can launch
  return algorithm, grid, chunks


def _validate(op: str, ws, partial, residual, weight) -> None:
  if not isinstance(ws, Workspace):
    raise TypeError(f"{op}: workspace must be a weave_jax.fused.Workspace, got "
                    f"{type(ws).__name__}")
  ws.require_open(op)
  if partial.ndim != 2 or residual.ndim != 2 or weight.ndim != 1:
    raise ValueError(f"{op}: expected partial (T, H), residual (S, H), weight (H,), got "
                     f"{partial.shape}, {residual.shape}, {weight.shape}")
  tokens, hidden = partial.shape
  if partial.dtype != ws.dtype:
    raise TypeError(f"{op}: partial dtype {partial.dtype} != workspace dtype {ws.dtype}")
  if residual.dtype != partial.dtype or weight.dtype != partial.dtype:
    raise TypeError(f"{op}: dtype mismatch: partial {partial.dtype}, residual {residual.dtype}, "
                    f"weight {weight.dtype}")
  if hidden % 8:
    raise ValueError(f"{op}: hidden={hidden} is not a multiple of 8")
  if hidden > ws.hidden:
    raise ValueError(f"{op}: hidden={hidden} exceeds workspace hidden={ws.hidden}")
  if not 1 <= tokens <= ws.max_tokens:
    raise ValueError(f"{op}: tokens={tokens} outside 1..workspace max_tokens={ws.max_tokens}")
  shard = -(-tokens // ws.world)
  if residual.shape != (shard, hidden):
    raise ValueError(f"{op}: residual shape {residual.shape} != ({shard}, {hidden}) for "
                     f"tokens={tokens}, world={ws.world}")
  if weight.shape != (hidden,):
    raise ValueError(f"{op}: weight shape {weight.shape} != ({hidden},)")


def concurrent_command_buffers() -> bool:
  """Whether XLA_FLAGS asks XLA to run a command buffer's independent commands concurrently
  (``--xla_gpu_command_buffer_scheduling_mode=CONCURRENT``).  Two fused calls share the
  workspace's staging rows and barrier words, so they must not run at once; XLA's default mode
  ("LHS") keeps them in program order.  Per-jit ``compiler_options`` are not visible here."""
  flags = os.environ.get("XLA_FLAGS", "").replace("-", "_").upper()
  return "XLA_GPU_COMMAND_BUFFER_SCHEDULING_MODE=CONCURRENT" in flags


def graph_target_default(algorithm: str, transport: str) -> bool:
  """Whether a synchronous call goes through the command-buffer target by default: where graph
  replay was verified (2 x H200, 2026-12-01) -- the one-shot and two-shot kernels of the peer
  transport, one process or one per GPU -- unless XLA_FLAGS asks for concurrent command
  buffers.  The copy engines cannot be replayed (host rendezvous per call)."""
  return (algorithm != "copy_engine" and transport == "peer" and
          not concurrent_command_buffers())


def fused_reduce_add_norm(partial, residual, weight, *, eps: float, workspace: Workspace,
                          ctas: int | None = None, algorithm: str = "auto",
                          ce_ctas: int | None = None, cmd_buffer: bool | None = None,
                          ce_chunks="auto"):
  """One fused call on XLA's stream.  Returns (normed (T, H), new_residual (S, H)).

  Args:
    partial: (T, H) this rank's partial sum.
    residual: (ceil(T / world), H) this rank's residual shard.
    weight: (H,) RMSNorm scale.
    eps: RMSNorm epsilon.
    workspace: the open ``Workspace`` of this TP group.
    ctas: thread blocks (2..128) of the one-shot and two-shot kernels; None = tuned.
    algorithm: "auto", "one_shot", "two_shot" or "copy_engine" (module docstring).
    ce_ctas: thread blocks (2..1024) of the copy-engine reduce kernel; None = tuned.
    ce_chunks: chunks (1..32) a copy-engine call is pipelined in, or "auto" (tuned).
    cmd_buffer: use the target registered as command-buffer compatible, so that XLA records
      the call into a CUDA graph with its neighbours and replays it without host launches
      (the kernels keep their epochs on the device, so a replay is a new call).  None:
      ``graph_target_default``.  Not for the copy-engine algorithm, nor for a call made while
      a ``fused_start`` of the same workspace is pending (the handler returns an error).
  """
  op = "fused_reduce_add_norm"
  _validate(op, workspace, partial, residual, weight)
  check_cmd_buffer(op, cmd_buffer, algorithm)
  if cmd_buffer and concurrent_command_buffers():
    raise ValueError(f"{op}: cmd_buffer=True with --xla_gpu_command_buffer_scheduling_mode="
                     "CONCURRENT in XLA_FLAGS: XLA could run two fused calls at once, and they "
                     "share the workspace; use the default mode or cmd_buffer=False")
  algorithm, grid, chunks = _resolve(op, workspace, partial, algorithm, ctas, ce_ctas,
                                     ce_chunks, woven=False)
  if cmd_buffer is None:
    cmd_buffer = graph_target_default(algorithm, workspace.transport)
  target = "weave_fused_ran_graph" if cmd_buffer else "weave_fused_ran"
  out = (jax.ShapeDtypeStruct(partial.shape, partial.dtype),
         jax.ShapeDtypeStruct(residual.shape, residual.dtype))
  # No side effect: effects send programs down JAX's slow dispatch path (2026-11-22).  SPMD: a
  # call XLA drops or merges is dropped or merged on every rank, so no barrier waits alone.
  return jax.ffi.ffi_call(target, out, has_side_effect=False)(
      partial, residual, weight, eps=np.float32(eps), ctas=np.int32(grid),
      transport=np.int32(_TRANSPORTS[workspace.transport]), algo=np.int32(ALGORITHMS[algorithm]),
      ce_chunks=np.int32(chunks))


def fused_start(partial, residual, weight, *, eps: float, workspace: Workspace, slot: int,
                ctas: int | None = None, algorithm: str = "auto", ce_ctas: int | None = None,
                ce_chunks="auto"):
  """Launches the call on the library's side stream and returns at once.

  Returns a pending result ``(token, normed, new_residual)`` for ``fused_done``: the kernel
  writes ``normed`` and ``new_residual`` after this call returns, so nothing but
  ``fused_done`` may read them (pass the tuple along unchanged; ``optimization_barrier`` is
  fine).  ``slot`` (0..num_slots-1) is chosen by the caller, so the program is a function of
  its inputs alone: calls in flight at once need distinct slots (the weave schedule gives
  half A slot 0 and half B slot 1).

  ``algorithm="auto"`` runs large calls on the copy engines where the workspace allows it
  (``choose_algorithm(..., woven=True)``), so that the compute it overlaps keeps the SMs.
  """
  op = "fused_start"
  _validate(op, workspace, partial, residual, weight)
  if not (isinstance(slot, (int, np.integer)) and 0 <= slot < workspace.num_slots):
    raise ValueError(f"{op}: slot={slot!r} outside 0..{workspace.num_slots - 1}")
  algorithm, grid, chunks = _resolve(op, workspace, partial, algorithm, ctas, ce_ctas,
                                     ce_chunks, woven=True)
  out = (jax.ShapeDtypeStruct((1,), jnp.uint32),
         jax.ShapeDtypeStruct(partial.shape, partial.dtype),
         jax.ShapeDtypeStruct(residual.shape, residual.dtype))
  # Side effects declared (start and done): they talk to the library's side stream outside
  # XLA's view; dropping the flag made the woven forward no faster (2 x H200, 2026-11-22).
  return jax.ffi.ffi_call("weave_fused_start", out, has_side_effect=True)(
      partial, residual, weight, eps=np.float32(eps), ctas=np.int32(grid), slot=np.int32(slot),
      transport=np.int32(_TRANSPORTS[workspace.transport]), algo=np.int32(ALGORITHMS[algorithm]),
      ce_chunks=np.int32(chunks))


def fused_done(pending, partial, residual, weight, *, slot: int):
  """Waits for ``fused_start`` (same slot, same inputs) and returns (normed, new_residual).

  ``pending`` is start's ``(token, normed, new_residual)``; its arrays become the outputs
  (aliased: no copy).  Takes start's inputs so that XLA keeps their buffers alive while the
  side stream reads them.
  """
  token, normed, new_residual = pending
  out = (jax.ShapeDtypeStruct(normed.shape, normed.dtype),
         jax.ShapeDtypeStruct(new_residual.shape, new_residual.dtype))
  return jax.ffi.ffi_call("weave_fused_done", out, has_side_effect=True,
                          input_output_aliases={1: 0, 2: 1})(
      token, normed, new_residual, partial, residual, weight, slot=np.int32(slot))


def on_stream(fn, stream: int = 1):
  """Runs ``fn`` on XLA's ``gpu_stream:<stream>`` through ``compute_on``.

  The one compatibility shim for ``compute_on``: a context manager ``compute_on(type)`` in
  jax 0.11.0, a decorator ``compute_on(f, *, compute_type, out_memory_spaces)`` since 0.11.2.
  """
  from jax.experimental import compute_on as _co

  compute_type = f"gpu_stream:{stream}"
  params = inspect.signature(_co.compute_on).parameters
  if "out_memory_spaces" in params:
    space = jax.memory.Space.Device
    return _co.compute_on(fn, compute_type=compute_type, out_memory_spaces=space)
  if "f" in params:
    return _co.compute_on(fn, compute_type=compute_type)

  def wrapped(*args, **kwargs):
    with _co.compute_on(compute_type):
      return fn(*args, **kwargs)

  return wrapped

"""JAX wrappers of the fused AllReduce + residual + RMSNorm FFI targets.

Every function here runs INSIDE ``jax.shard_map`` over the TP axis (local shapes):

    partial  (T, H)   this rank's partial sum, any T in 1..max_tokens
    residual (S, H)   S = ceil(T / world); rank r owns tokens [r*S, min((r+1)*S, T))
    weight   (H,)
    -> normed (T, H) replicated, new_residual (S, H)

Inputs are validated in Python before anything launches; each error names the op and the bad
value.  The kernel itself is documented in ``ffi/fused_reduce_add_norm.cuh``.

Algorithms (``algorithm=``; "auto" picks by message size, see ``choose_algorithm``):

    one_shot     every rank pushes its whole partial (and its residual rows) to every peer and
                 normalizes every row itself: one barrier; T <= the workspace's one-shot rows
    two_shot     reduce-scatter by NVLink stores, norm on my rows, all-gather by NVLink stores:
                 two barriers, ``ctas`` SMs do all the copying; on sm_90+ (peer transport) the
                 two copy phases are TMA bulk copies (the norm's stores stay 16-byte stores)
    two_shot_lsu the same with 16-byte loads/stores only (what sm_80 runs), for comparisons
    copy_engine  the two-shot data flow with the NVLink copies on the copy engines: push copies,
                 a local reduce + norm kernel of ``ce_ctas`` blocks, pull copies, pipelined
                 over ``ce_chunks`` chunks of rows.  On sm_90+ at TP=2 with 2048 < H <= 8192
                 and ``ce_ctas`` <= 32 the kernel moves its rows with TMA bulk copies (1.5-1.6x
                 the load/store kernel on one H200; larger grids are HBM-bound either way).
                 Ranks meet
                 on the host and order their streams with cross-device CUDA events, so nothing
                 spins on the GPU and no SM copies.  One process driving every GPU only, and
                 it relies on XLA running each device's program on its own host thread (true
                 of JAX 0.11.2's GPU client; were it not, the rendezvous would time out with an
                 error naming the rank); not under CUDA graph capture.  "auto" picks it for
                 woven (``fused_start``) calls of at least AUTO_WOVEN_COPY_ENGINE_MIN_BYTES,
                 where the SMs it leaves free matter most.
    copy_engine_direct  copy_engine where, at TP=2, the kernel stores each normalized row
                 straight into the peer's output: no pull copies (at TP > 2 as copy_engine)
    copy_engine_lsu   copy_engine with the load/store local kernel always (comparisons: the
                 eighth session's copy-engine algorithm)
    copy_engine_tma   copy_engine with the TMA local kernel at any ``ce_ctas`` where the kernel
                 applies (TP=2, sm_90+, 2048 < H <= 8192; elsewhere as copy_engine): to compare
                 132 TMA blocks with the default 132 load/store blocks in the woven model
"""
from __future__ import annotations

import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np

from weave_jax.fused import _lib
from weave_jax.fused import workspace as ws_lib

MIN_CTAS, MAX_CTAS = 2, 128
MAX_CE_CTAS = 1024        # kMaxCeCtas: the copy-engine kernel's blocks are not paired
MAX_CE_CHUNKS = 32        # kMaxCeChunks: the copy-engine pipeline's depth
ONE_SHOT_BYTES = 1 << 20  # kOneShotBytes: one-shot staging per source (ffi/workspace.cu)
_TRANSPORTS = {"peer": 0, "multimem": 1}
ALGORITHMS = {"two_shot": 0, "copy_engine": 1, "one_shot": 2, "two_shot_lsu": 3,
              "copy_engine_direct": 4, "copy_engine_lsu": 5, "copy_engine_tma": 6}
#: the copy-engine algorithm and its variants (module docstring)
COPY_ENGINE_ALGORITHMS = ("copy_engine", "copy_engine_direct", "copy_engine_lsu",
                          "copy_engine_tma")

# "auto" sends messages up to this many bytes to one_shot, from run/bench_allreduce_norm.py on
# 2 x H200 (BENCHMARKS.md): at 128-256 KiB the two are about even (9-14 µs of GPU time); from
# 512 KiB the two-shot kernel is as fast or faster (third session, 2026-11-22).
AUTO_ONE_SHOT_MAX_BYTES = 256 << 10
# Default grids, from the same measurements: 128 CTAs is the fastest unsplit setting (1.5-1.6x
# XLA psum + norm in wall time from 16 to 128 MiB); 32 leaves most SMs to the GEMMs a woven call
# overlaps.
DEFAULT_CTAS = 128
DEFAULT_WEAVE_CTAS = 32
# The copy-engine algorithm's local kernel: one block per SM of an H100 / H200.  In the woven
# model (Llama-3.3-70B shapes, 16 layers, 2 x H200, two runs on 2026-11-30, BENCHMARKS.md) 132
# blocks were 0.6-2.3% faster than 64 at 4K, 8K and 16K tokens (5 of 5 comparisons), 16 blocks
# 1-2% slower; a 4-layer run of the fifth session had 64 ahead by 0.5-2.5%.  Not compared at TP=4.
DEFAULT_CE_CTAS = 132
# "auto" runs woven calls of at least this many bytes on the copy engines.  Measured on 2 x H200
# (Llama-3.3-70B shapes, 4 layers, BENCHMARKS.md): the woven forward with copy-engine calls beat
# the one with 32-CTA two-shot calls at every size measured, 1K-16K tokens (halves of 8-128 MiB),
# e.g. 1.844 vs 1.952 ms/layer at 1K and 26.62 vs 28.22 at 16K.  Smaller woven calls were not
# measured, so they keep the kernels.
AUTO_WOVEN_COPY_ENGINE_MIN_BYTES = 8 << 20
# "auto" pipelines a copy-engine call in 2 chunks (the push of chunk 1 overlaps the reduce of
# chunk 0, which overlaps nothing else; the reduce of chunk 1 overlaps the pull of chunk 0) once
# a rank's slice reaches this many bytes, else runs it in one.  Measured
# (run/bench_allreduce_norm.py, 2 x H200, TP=2, H=8192, 64-block kernel, 2026-11-30,
# BENCHMARKS.md): 2 chunks took 16-22% less time than 1 from 64 MiB messages (32 MiB slices) to
# 512 MiB, the same at 32 MiB; 4, 8 and 16 chunks were slower than 2 at every size (each chunk
# adds ~10 µs: its copies, kernel launch and cross-device event waits are enqueued by the host).
# Not measured at TP > 2.
CE_TWO_CHUNKS_MIN_SLICE_BYTES = 32 << 20
# Unsplit calls keep the kernel at every size.  At TP=4 the copy engines were faster in
# isolation from 128 MiB (run/bench_allreduce_norm.py --tp 4: 831 vs 981 µs at 128 MiB), but
# slower in the model: Llama-3.3-70B shapes, unsplit, 4 x H200, 0.956 / 0.963x the psum
# baseline at 8K / 16K tokens against 0.985 / 1.008x with the kernel (BENCHMARKS.md, sixth
# session).


def check_grid(op: str, field: str, value, hi: int) -> None:
  """Raises ValueError unless ``value`` is an integer grid size in MIN_CTAS..hi."""
  if not (isinstance(value, (int, np.integer)) and MIN_CTAS <= value <= hi):
    raise ValueError(f"{op}: {field}={value} outside {MIN_CTAS}..{hi}")


def check_chunks(op: str, value) -> None:
  """Raises ValueError unless ``value`` is "auto" or an integer in 1..MAX_CE_CHUNKS."""
  if value == "auto":
    return
  if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
          and 1 <= value <= MAX_CE_CHUNKS):
    raise ValueError(f"{op}: ce_chunks={value!r} must be 'auto' or an integer in "
                     f"1..{MAX_CE_CHUNKS}")


def ce_chunks_for(tokens: int, hidden: int, itemsize: int, world: int) -> int:
  """The chunks "auto" pipelines a copy-engine call in: 2 from CE_TWO_CHUNKS_MIN_SLICE_BYTES of
  a rank's slice, else 1."""
  slice_bytes = -(-tokens // world) * hidden * itemsize
  return 2 if slice_bytes >= CE_TWO_CHUNKS_MIN_SLICE_BYTES else 1


def one_shot_rows(ws) -> int:
  """Largest T the one-shot algorithm takes with workspace ``ws`` (mirrors workspace.cu)."""
  return max(1, min(ws.max_tokens, ONE_SHOT_BYTES // (ws.hidden * ws.dtype.itemsize)))


def choose_algorithm(tokens: int, hidden: int, itemsize: int, ws, transport: str = "peer",
                     woven: bool = False) -> str:
  """The algorithm "auto" runs for a (tokens, hidden) message: one-shot for messages up to
  AUTO_ONE_SHOT_MAX_BYTES; for a woven call (``fused_start``) of a one-process workspace, the
  copy engines from AUTO_WOVEN_COPY_ENGINE_MIN_BYTES; else the two-shot kernel (multimem:
  always two-shot)."""
  if transport != "peer":
    return "two_shot"
  nbytes = tokens * hidden * itemsize
  if nbytes <= AUTO_ONE_SHOT_MAX_BYTES and tokens <= one_shot_rows(ws):
    return "one_shot"
  if woven and ws.mode == "local" and nbytes >= AUTO_WOVEN_COPY_ENGINE_MIN_BYTES:
    return "copy_engine"
  return "two_shot"


def _resolve(op: str, partial, algorithm: str, ctas: int, ce_ctas: int, transport: str,
             woven: bool = False, ce_chunks="auto"):
  """(algorithm, grid, chunks) for a call, validated.  Runs after _validate."""
  ws = ws_lib.current()
  check_chunks(op, ce_chunks)
  if algorithm == "auto":
    algorithm = choose_algorithm(partial.shape[0], partial.shape[1], partial.dtype.itemsize, ws,
                                 transport, woven)
  if algorithm not in ALGORITHMS:
    raise ValueError(f"{op}: algorithm={algorithm!r} must be 'auto' or one of {sorted(ALGORITHMS)}")
  if transport != "peer" and algorithm != "two_shot":
    raise ValueError(f"{op}: the {transport} transport runs only algorithm='two_shot'")
  if algorithm == "one_shot" and partial.shape[0] > one_shot_rows(ws):
    raise ValueError(f"{op}: algorithm='one_shot' needs tokens <= {one_shot_rows(ws)} "
                     f"({ONE_SHOT_BYTES >> 20} MiB per source at hidden={ws.hidden}), got "
                     f"{partial.shape[0]}")
  if algorithm in COPY_ENGINE_ALGORITHMS:
    if ws.mode != "local":
      raise ValueError(f"{op}: algorithm={algorithm!r} needs one process driving every GPU of "
                       f"the group (this workspace is {ws.mode!r})")
    check_grid(op, "ce_ctas", ce_ctas, MAX_CE_CTAS)
    grid = int(ce_ctas)
    chunks = (ce_chunks_for(partial.shape[0], partial.shape[1], partial.dtype.itemsize, ws.world)
              if ce_chunks == "auto" else int(ce_chunks))
  else:
    grid, chunks = int(ctas), 1
  _lib.register_targets()  # last: everything above raises before anything can launch
  return algorithm, grid, chunks


def _validate(op: str, partial, residual, weight, ctas: int, transport: str):
  ws = ws_lib.current()
  if ws is None:
    raise RuntimeError(f"{op}: workspace not initialised; call weave_jax.fused.init_workspace() "
                       "first")
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
  check_grid(op, "ctas", ctas, MAX_CTAS)
  if transport not in _TRANSPORTS:
    raise ValueError(f"{op}: transport={transport!r} must be one of {sorted(_TRANSPORTS)}")
  if transport != ws.transport:
    raise ValueError(f"{op}: transport={transport!r} but the workspace was built for "
                     f"{ws.transport!r}")


def concurrent_command_buffers() -> bool:
  """Whether XLA_FLAGS asks XLA to run a command buffer's independent commands concurrently
  (``--xla_gpu_command_buffer_scheduling_mode=CONCURRENT``).  Two fused calls share the
  workspace's staging rows and barrier words, so they must not run at once; XLA's default mode
  ("LHS") kept them in program order (the 10,000-call graph test interleaves four independent
  chains).  Per-jit ``compiler_options`` are not visible here."""
  flags = os.environ.get("XLA_FLAGS", "").replace("-", "_").upper()
  return "XLA_GPU_COMMAND_BUFFER_SCHEDULING_MODE=CONCURRENT" in flags


def graph_target_default(algorithm: str, transport: str) -> bool:
  """Whether a synchronous call goes through the command-buffer target by default: where graph
  replay of the kernels was verified -- the one-shot and two-shot kernels of the peer transport,
  in one process driving every GPU or one process per GPU (IPC; tests/test_ipc_gpu.py), unless
  XLA_FLAGS asks for concurrent command buffers (``concurrent_command_buffers``).  The copy
  engines cannot be replayed (host rendezvous per call); replay with the multimem transport was
  never run.  Measured (one process) on 2 x H200 (BENCHMARKS.md, eighth session): calls of
  <= 4 MiB 3-13% faster in the microbenchmark; in the model (three families, 4 layers, 1-4096
  tokens) ahead of the plain target in 13 of 15 cells, 1.05-1.14x the psum baseline at 1-256
  tokens against 1.02-1.14x (each cell's difference inside its 3-16% run-to-run spread)."""
  return (algorithm not in COPY_ENGINE_ALGORITHMS and transport == "peer" and
          not concurrent_command_buffers())


def fused_reduce_add_norm(partial, residual, weight, *, eps: float, ctas: int = DEFAULT_CTAS,
                          transport: str = "peer", algorithm: str = "auto",
                          ce_ctas: int = DEFAULT_CE_CTAS, cmd_buffer: bool | None = None,
                          ce_chunks="auto"):
  """One fused call on XLA's stream.  Returns (normed (T, H), new_residual (S, H)).

  Args:
    partial: (T, H) this rank's partial sum.
    residual: (ceil(T / world), H) this rank's residual shard.
    weight: (H,) RMSNorm scale.
    eps: RMSNorm epsilon.
    ctas: thread blocks (2..128) of the one-shot and two-shot kernels, equal on every rank.
    transport: "peer" or "multimem" (must match the workspace).
    algorithm: "auto", "one_shot", "two_shot", "two_shot_lsu", "copy_engine",
      "copy_engine_direct", "copy_engine_lsu" or "copy_engine_tma" (module docstring).
    ce_ctas: thread blocks (2..1024) of the copy-engine algorithm's local reduce kernel.
    ce_chunks: chunks (1..32) the copy-engine algorithm pipelines a call in, or "auto"
      (``ce_chunks_for``: 2 from CE_TWO_CHUNKS_MIN_SLICE_BYTES of a rank's slice, else 1).
    cmd_buffer: use the target registered as command-buffer compatible, so that XLA records
      the call into a CUDA graph with its neighbours (XLA's default
      ``--xla_gpu_enable_command_buffer`` includes CUSTOM_CALL; a graph needs
      ``--xla_gpu_graph_min_graph_size`` commands in a row, 5 by default) and replays it
      without host launches.  The kernels keep their epochs on the device, so a replay is a
      new call.  None (default): ``graph_target_default`` -- on wherever replay was verified.
      Not for the copy-engine algorithm (host rendezvous per call), nor for a call made while
      a ``fused_start`` of the same workspace is pending (a recorded call cannot wait for the
      side stream; the handler returns an error saying so).  Verified on 2 x H200, JAX 0.11.2
      (2026-12-01, ``tests/test_fused_gpu.py``): 10,000 replayed calls of three kernels and
      four sizes bitwise equal to the plain target's, and replays with new input buffers.
  """
  op = "fused_reduce_add_norm"
  _validate(op, partial, residual, weight, ctas, transport)
  if cmd_buffer and algorithm in COPY_ENGINE_ALGORITHMS:  # ("auto" never picks it here)
    raise ValueError(f"{op}: cmd_buffer=True cannot run algorithm={algorithm!r} (its ranks meet "
                     "on the host every call, which a replayed CUDA graph skips)")
  if cmd_buffer and concurrent_command_buffers():
    raise ValueError(f"{op}: cmd_buffer=True with --xla_gpu_command_buffer_scheduling_mode="
                     "CONCURRENT in XLA_FLAGS: XLA could run two fused calls at once, and they "
                     "share the workspace; use the default mode or cmd_buffer=False")
  algorithm, grid, chunks = _resolve(op, partial, algorithm, ctas, ce_ctas, transport,
                                     ce_chunks=ce_chunks)
  if cmd_buffer is None:
    cmd_buffer = graph_target_default(algorithm, transport)
  target = "weave_fused_ran_graph" if cmd_buffer else "weave_fused_ran"
  out = (jax.ShapeDtypeStruct(partial.shape, partial.dtype),
         jax.ShapeDtypeStruct(residual.shape, residual.dtype))
  # No side effect declared: JAX runs programs with (unordered) effects through its slow
  # dispatch path with runtime tokens (which part of the flag's cost that is was not isolated).
  # Measured on 2 x H200 (Llama shapes, 4 layers): with the
  # flag the unsplit fused forward was 0.80-0.99x the psum baseline from 1 to 4096 tokens,
  # without it 1.02-1.07x (BENCHMARKS.md).  Without the flag XLA may drop a call whose results
  # are unused, or merge identical calls; every rank runs the same SPMD program, so every rank
  # drops or merges the same calls and no barrier is left waiting.
  return jax.ffi.ffi_call(target, out, has_side_effect=False)(
      partial, residual, weight, eps=np.float32(eps), ctas=np.int32(grid),
      transport=np.int32(_TRANSPORTS[transport]), algo=np.int32(ALGORITHMS[algorithm]),
      ce_chunks=np.int32(chunks))


SIDE_PRIORITIES = {"normal": 0, "high": 1}


def fused_start(partial, residual, weight, *, eps: float, ctas: int = DEFAULT_WEAVE_CTAS,
                slot: int = 0, transport: str = "peer", algorithm: str = "auto",
                ce_ctas: int = DEFAULT_CE_CTAS, side_priority: str = "normal",
                ce_chunks="auto"):
  """Launches the kernel on the library's side stream and returns at once.

  Returns a pending result ``(token, normed, new_residual)`` for ``fused_done``: the kernel
  writes ``normed`` and ``new_residual`` after this call returns, so nothing but
  ``fused_done`` may read them (pass the tuple along unchanged; ``optimization_barrier`` is
  fine).  At most ``num_slots`` starts may be in flight (each with its own slot) before their
  dones.

  ``algorithm="auto"`` runs calls of at least AUTO_WOVEN_COPY_ENGINE_MIN_BYTES on the copy
  engines (``choose_algorithm(..., woven=True)``), so that the compute it overlaps keeps the SMs.

  ``side_priority``: "normal" (default) runs the kernel on a library stream of normal priority;
  "high" on one of the device's highest priority, so that its blocks are scheduled ahead of
  compute blocks queued on XLA's stream.  In the woven model on 2 x H200 "high" was no faster
  (0-3% slower, within noise; BENCHMARKS.md), hence the default.
  """
  ws = ws_lib.current()
  if ws is not None and not 0 <= slot < ws.num_slots:
    raise ValueError(f"fused_start: slot={slot} outside 0..{ws.num_slots - 1}")
  if side_priority not in SIDE_PRIORITIES:
    raise ValueError(f"fused_start: side_priority={side_priority!r} must be one of "
                     f"{sorted(SIDE_PRIORITIES)}")
  _validate("fused_start", partial, residual, weight, ctas, transport)
  algorithm, grid, chunks = _resolve("fused_start", partial, algorithm, ctas, ce_ctas,
                                     transport, woven=True, ce_chunks=ce_chunks)
  out = (jax.ShapeDtypeStruct((1,), jnp.uint32),
         jax.ShapeDtypeStruct(partial.shape, partial.dtype),
         jax.ShapeDtypeStruct(residual.shape, residual.dtype))
  # Side effects declared (start and done): they talk to the library's side stream outside
  # XLA's view.  Programs with them take JAX's slow dispatch path (see above); dropping the flag
  # here passed the start/done and woven Llama tests but made the woven forward no faster
  # (6.511 vs 6.510 ms/layer at 4K on 2 x H200), so the safer declaration stays.
  return jax.ffi.ffi_call("weave_fused_start", out, has_side_effect=True)(
      partial, residual, weight, eps=np.float32(eps), ctas=np.int32(grid), slot=np.int32(slot),
      transport=np.int32(_TRANSPORTS[transport]), algo=np.int32(ALGORITHMS[algorithm]),
      priority=np.int32(SIDE_PRIORITIES[side_priority]), ce_chunks=np.int32(chunks))


def fused_done(pending, partial, residual, weight, *, slot: int = 0):
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

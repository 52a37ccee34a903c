"""JAX wrappers of the fused AllReduce + residual + RMSNorm FFI targets.

Every function here runs INSIDE ``jax.shard_map`` over the TP axis (local shapes):

    partial  (T, H)   this rank's partial sum, any T in 1..max_tokens
    residual (S, H)   S = ceil(T / world); rank r owns tokens [r*S, min((r+1)*S, T))
    weight   (H,)
    -> normed (T, H) replicated, new_residual (S, H)

Inputs are validated in Python before anything launches; each error names the op and the bad
value.  The kernel itself is documented in ``ffi/fused_reduce_add_norm.cuh``.
"""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np

from weave_jax.fused import _lib
from weave_jax.fused import workspace as ws_lib

MIN_CTAS, MAX_CTAS = 2, 32
_TRANSPORTS = {"peer": 0, "multimem": 1}


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
  if not (isinstance(ctas, (int, np.integer)) and MIN_CTAS <= ctas <= MAX_CTAS):
    raise ValueError(f"{op}: ctas={ctas} outside {MIN_CTAS}..{MAX_CTAS}")
  if transport not in _TRANSPORTS:
    raise ValueError(f"{op}: transport={transport!r} must be one of {sorted(_TRANSPORTS)}")
  if transport != ws.transport:
    raise ValueError(f"{op}: transport={transport!r} but the workspace was built for "
                     f"{ws.transport!r}")
  _lib.register_targets()


def fused_reduce_add_norm(partial, residual, weight, *, eps: float, ctas: int = 16,
                          transport: str = "peer", cmd_buffer: bool = False):
  """One fused call on XLA's stream.  Returns (normed (T, H), new_residual (S, H)).

  Args:
    partial: (T, H) this rank's partial sum.
    residual: (ceil(T / world), H) this rank's residual shard.
    weight: (H,) RMSNorm scale.
    eps: RMSNorm epsilon.
    ctas: thread blocks (2..32), equal on every rank.
    transport: "peer" or "multimem" (must match the workspace).
    cmd_buffer: use the target whose handler carries the command-buffer-compatible trait.
      NOT the default: on 2xH200 / JAX 0.11.2 XLA did not capture it into a command buffer
      (even with --xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL,WHILE), so graph replay of
      this kernel is untested.  The protocol is built for replay (device-resident epochs).
  """
  _validate("fused_reduce_add_norm", partial, residual, weight, ctas, transport)
  target = "weave_fused_ran_graph" if cmd_buffer else "weave_fused_ran"
  out = (jax.ShapeDtypeStruct(partial.shape, partial.dtype),
         jax.ShapeDtypeStruct(residual.shape, residual.dtype))
  # has_side_effect: a call whose outputs are unused on one rank must still run there, or the
  # other ranks' barriers would time out.
  return jax.ffi.ffi_call(target, out, has_side_effect=True)(
      partial, residual, weight, eps=np.float32(eps), ctas=np.int32(ctas),
      transport=np.int32(_TRANSPORTS[transport]))


def fused_start(partial, residual, weight, *, eps: float, ctas: int = 16, slot: int = 0,
                transport: str = "peer"):
  """Launches the kernel on the library's side stream; results stay in workspace slot ``slot``.

  Returns a (1,) uint32 token for ``fused_done``.  At most ``num_slots`` starts may be in flight
  (each with its own slot) before their dones.
  """
  ws = ws_lib.current()
  if ws is not None and not 0 <= slot < ws.num_slots:
    raise ValueError(f"fused_start: slot={slot} outside 0..{ws.num_slots - 1}")
  _validate("fused_start", partial, residual, weight, ctas, transport)
  return jax.ffi.ffi_call("weave_fused_start", jax.ShapeDtypeStruct((1,), jnp.uint32),
                          has_side_effect=True)(
      partial, residual, weight, eps=np.float32(eps), ctas=np.int32(ctas), slot=np.int32(slot),
      transport=np.int32(_TRANSPORTS[transport]))


def fused_done(token, partial, residual, weight, *, slot: int = 0):
  """Waits for ``fused_start`` (same slot, same inputs) and returns (normed, new_residual).

  Takes start's inputs so that XLA keeps their buffers alive while the side stream reads them.
  """
  out = (jax.ShapeDtypeStruct(partial.shape, partial.dtype),
         jax.ShapeDtypeStruct(residual.shape, residual.dtype))
  return jax.ffi.ffi_call("weave_fused_done", out, has_side_effect=True)(
      token, partial, residual, weight, slot=np.int32(slot))


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

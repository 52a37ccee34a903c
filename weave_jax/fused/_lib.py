"""Loading ``libweave_fused`` (built from ``ffi/``) and registering its XLA FFI targets.

Search order: ``$WEAVE_FUSED_LIBRARY`` (a path to the .so), then ``weave_jax/_native/`` beside
this package (plain CMake builds and editable installs), then the installed package's
``weave_jax/_native/`` under site-packages (wheels).
"""
from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import sysconfig

LIB_NAME = "libweave_fused.so"
ENV_LIBRARY = "WEAVE_FUSED_LIBRARY"

# FFI target names -> exported handler symbols.
TARGETS = {
    "weave_fused_ran": "weave_fused_ran",
    "weave_fused_ran_graph": "weave_fused_ran_graph",
    "weave_fused_start": "weave_fused_start",
    "weave_fused_done": "weave_fused_done",
}
# Targets XLA may capture into command buffers (CUDA graphs; replay verified 2026-12-01):
# registered with the COMMAND_BUFFER_COMPATIBLE trait, which their handler symbols also carry.
COMMAND_BUFFER_TARGETS = frozenset({"weave_fused_ran_graph"})


class FusedUnavailableError(RuntimeError):
  """The fused FFI library is missing (built without nvcc) or cannot be loaded."""


def candidate_paths() -> list[pathlib.Path]:
  paths = []
  if env := os.environ.get(ENV_LIBRARY):
    paths.append(pathlib.Path(env))
  here = pathlib.Path(__file__).resolve().parent.parent / "_native" / LIB_NAME
  paths.append(here)
  for key in ("platlib", "purelib"):
    paths.append(pathlib.Path(sysconfig.get_paths()[key]) / "weave_jax" / "_native" / LIB_NAME)
  return paths


def _declare(lib: ctypes.CDLL) -> None:
  c_int, c_i64, c_char_p, c_double = ctypes.c_int, ctypes.c_int64, ctypes.c_char_p, ctypes.c_double
  int_p = ctypes.POINTER(ctypes.c_int)
  u8_p = ctypes.POINTER(ctypes.c_uint8)
  sig = {
      "weave_multicast_policy": (c_int, [c_int]),
      "weave_multicast_policy_reason": (c_char_p, [c_int]),
      "weave_multicast_create": (c_int, [c_int, int_p, c_char_p, c_int]),
      "weave_ws_init_local": (c_int, [c_int, int_p, c_i64, c_i64, c_int, c_int, c_char_p, c_int]),
      "weave_ws_probe": (c_int, [c_int, int_p, c_char_p, c_int]),
      "weave_ws_ipc_handle_bytes": (c_int, []),
      "weave_ws_init_ipc_export": (c_int, [c_int, c_int, c_int, c_i64, c_i64, c_int, c_int, u8_p,
                                           c_char_p, c_int]),
      "weave_ws_init_ipc_open": (c_int, [c_int, u8_p, c_char_p, c_int]),
      "weave_ws_probe_ipc_write": (c_int, [c_int, c_char_p, c_int]),
      "weave_ws_probe_ipc_check": (c_int, [c_int, c_char_p, c_int]),
      "weave_ws_free_all": (c_int, [c_char_p, c_int]),
      "weave_ws_read_error": (c_int, [c_int, ctypes.POINTER(ctypes.c_int32)]),
      "weave_ws_set_timeout_ms": (c_int, [c_int, c_double]),
      "weave_ws_poison": (c_int, [c_int]),
      "weave_ws_set_stamps": (c_int, [c_int, c_int]),
      "weave_ws_read_stamps": (c_int, [c_int, ctypes.POINTER(ctypes.c_uint64), c_int]),
      "weave_ws_call_counts": (c_int, [c_int, ctypes.POINTER(ctypes.c_uint64)]),
  }
  for name, (res, args) in sig.items():
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = res, args


@functools.cache
def load() -> ctypes.CDLL:
  """Loads the library once.  Raises FusedUnavailableError naming every path tried."""
  tried = []
  for path in candidate_paths():
    if path.is_file():
      try:
        lib = ctypes.CDLL(str(path))
      except OSError as e:
        tried.append(f"{path} ({e})")
        continue
      _declare(lib)
      return lib
    tried.append(f"{path} (missing)")
  raise FusedUnavailableError(
      "weave_jax fused kernels: libweave_fused.so not found. It is built from ffi/ when nvcc is "
      "present (`pip install -e .` or `cmake -S ffi -B build -G Ninja && cmake --build build`), "
      f"or set {ENV_LIBRARY}=/path/to/{LIB_NAME}. Tried: " + "; ".join(tried))


def available() -> bool:
  try:
    load()
    return True
  except FusedUnavailableError:
    return False


@functools.cache
def register_targets() -> None:
  """Registers every FFI target with XLA (CUDA platform).  Idempotent."""
  import jax

  from jaxlib import xla_client

  lib = load()
  graph_ok = xla_client.CustomCallTargetTraits.COMMAND_BUFFER_COMPATIBLE
  for target, symbol in TARGETS.items():
    capsule = jax.ffi.pycapsule(getattr(lib, symbol))
    if target in COMMAND_BUFFER_TARGETS:
      try:
        jax.ffi.register_ffi_target(target, capsule, platform="CUDA", traits=graph_ok)
        continue
      except Exception as e:  # e.g. "The plugin does not support custom call traits."
        if "traits" not in str(e):
          raise
    jax.ffi.register_ffi_target(target, capsule, platform="CUDA")


def errbuf() -> ctypes.Array:
  return ctypes.create_string_buffer(1024)

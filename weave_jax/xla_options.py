"""Every XLA option this library sets, in one place, applied per compile.

We never touch ``XLA_FLAGS`` or other global state: options go to
``jax.jit(f).lower(...).compile(compiler_options)`` for our executables only.
"""
from __future__ import annotations

import re
import warnings

_REJECTED: set[str] = set()

# XLA's own choice of collective implementation is kept: forcing NCCL
# (xla_gpu_experimental_use_collective_kernels=0) failed to compile on JAX 0.11.2 (2026-11).


def compile_options(platform: str, *, weave: bool) -> dict[str, object]:
  """Compiler options for one forward executable.

  Args:
    platform: ``jax.devices()[0].platform`` ("gpu", "cpu", ...).
    weave: the executable interleaves two halves; XLA must not merge them back.
  """
  if platform != "gpu":
    return {}
  opts: dict[str, object] = {}
  if weave:
    # The dot merger would fuse A's and B's GEMMs (they share weights) into one; the combiners
    # would merge A's and B's collectives into one.  Either defeats the overlap.
    opts.update({
        "xla_gpu_dot_merger_threshold_mb": 0,
        "xla_gpu_all_reduce_combine_threshold_bytes": 0,
        "xla_gpu_reduce_scatter_combine_threshold_bytes": 0,
        "xla_gpu_all_gather_combine_threshold_bytes": 0,
    })
  return opts


def compile_with(lowered, options: dict[str, object]):
  """``lowered.compile(options)``; an option this XLA version rejects is dropped with one warning
  (flags come and go between JAX releases; a removed flag must not break the forward)."""
  options = {k: v for k, v in options.items() if k not in _REJECTED}
  while True:
    try:
      return lowered.compile(options)
    except Exception as e:  # jax raises XlaRuntimeError (INVALID_ARGUMENT) for unknown options
      m = re.search(r"setting option (\w+)", str(e)) or re.search(r"[Uu]nknown.*?(xla_\w+)", str(e))
      if not m or m.group(1) not in options:
        raise
      _REJECTED.add(m.group(1))
      warnings.warn(f"XLA rejected compile option {m.group(1)}={options.pop(m.group(1))!r} "
                    f"({str(e).splitlines()[0][:120]}); compiling without it", stacklevel=2)

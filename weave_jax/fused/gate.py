"""Python view of the multicast gate (the policy itself lives in ``ffi/multicast_gate.cu``).

Only the C++ pure policy function is called from here; nothing in Python can create a
multicast object except ``Workspace(..., transport="multimem").open()``, which goes through the
C++ creator, which asks the same policy first.
"""
from __future__ import annotations

from weave_jax.fused import _lib


def multicast_policy(device_supported: bool) -> tuple[int, str]:
  """Asks the C++ policy whether multicast may be created.  Creates nothing.

  Returns (code, reason): code 0 means allowed; any other code is a refusal.
  """
  lib = _lib.load()
  code = lib.weave_multicast_policy(int(bool(device_supported)))
  return code, lib.weave_multicast_policy_reason(code).decode()

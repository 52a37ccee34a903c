"""Test set-up: 8 virtual CPU devices (set before JAX is imported) and the ``gpu`` marker."""
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402


def gpu_count() -> int:
  try:
    return len(jax.devices("gpu"))
  except RuntimeError:
    return 0


def gpu_tp() -> int:
  """TP of the multi-GPU tests: $WEAVE_TEST_TP (default 2; run/gpu_all.sh sets it on larger
  machines)."""
  return int(os.environ.get("WEAVE_TEST_TP", "2"))


def pytest_collection_modifyitems(config, items):
  if gpu_count():
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to JAX)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)

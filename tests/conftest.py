"""Test set-up: 8 virtual CPU devices (set before JAX is imported) and the ``gpu`` marker."""
import importlib.util
import os
import pathlib
import subprocess
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
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


ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_module(path, name: str):
  """The Python file at ``path`` (a script of run/ or examples/) imported as module ``name`` and
  registered in ``sys.modules`` (dataclasses look their module up there)."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def rel_err(a, b) -> float:
  """Relative L2 error ||a - b|| / ||b||, computed in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


GPU_MISSING_KEY = pytest.StashKey[bool]()


def run_interpreter_cases(test_file: str, num_cases: int, timeout: int) -> None:
  """Run ``test_file --interpret`` in a fresh process under Triton's interpreter (it must be
  set before triton is imported) and require every case to print " ok"."""
  env = {**os.environ, "TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, test_file, "--interpret"], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  print(proc.stdout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert proc.stdout.count(" ok") == num_cases


def nvidia_driver_gpus() -> bool:
  """Whether nvidia-smi lists a GPU on this machine (whatever JAX sees)."""
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return False
  return any(line.startswith("GPU") for line in out.splitlines())


GPU_MISSING = ("this machine has NVIDIA GPUs but JAX sees none: install JAX's CUDA plugin "
               "(bash run/test.sh does; or pip install -e '.[test,cuda12]')")


def pytest_collection_modifyitems(config, items):
  if gpu_count():
    return
  # A GPU machine whose JAX has no CUDA plugin would skip every GPU test and pass: there they
  # fail (pytest_runtest_setup), unless CPU-only JAX was asked for (JAX_PLATFORMS=cpu).
  if nvidia_driver_gpus() and os.environ.get("JAX_PLATFORMS", "") != "cpu":
    config.stash[GPU_MISSING_KEY] = True
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to JAX)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


def pytest_runtest_setup(item):
  if "gpu" in item.keywords and item.config.stash.get(GPU_MISSING_KEY, False):
    pytest.fail(GPU_MISSING)

"""The multicast gate refuses in every case DESIGN.md names.  Calls the C++ POLICY function
only (weave_multicast_policy); never the creating function.  Device support is always passed
as 0, so even a policy bug could not reach multicast creation from here."""
from __future__ import annotations

import ctypes
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DISABLERS = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")
OPT_IN = "WEAVE_ENABLE_MULTIMEM"


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
  """The C++ policy from the built library, or from the gate source compiled here with nvcc."""
  from weave_jax.fused import _lib
  try:
    lib = _lib.load()
  except _lib.FusedUnavailableError:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
      pytest.skip("libweave_fused not built and no nvcc to build the gate")
    so = tmp_path_factory.mktemp("gate") / "libgate.so"
    subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", "--cudart", "static", "-std=c++17",
                    "-gencode=arch=compute_80,code=sm_80", "-I", str(ROOT / "ffi"),
                    str(ROOT / "ffi" / "multicast_gate.cu"), str(ROOT / "ffi" / "workspace.cu"),
                    "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
  fn = lib.weave_multicast_policy
  fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
  return fn


@pytest.fixture
def clean_env(monkeypatch):
  for name in DISABLERS + (OPT_IN,):
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_refuses_without_opt_in(policy, clean_env):
  assert policy(0) == 1
  clean_env.setenv(OPT_IN, "yes")  # only exactly "1" opts in
  assert policy(0) == 1


@pytest.mark.parametrize("value", ["0", "false", "no", "off", ""])
def test_refuses_when_nccl_disables_nvls(policy, clean_env, value):
  clean_env.setenv(OPT_IN, "1")
  clean_env.setenv("NCCL_NVLS_ENABLE", value)
  assert policy(0) == 2


@pytest.mark.parametrize("value", ["1", "true", "yes", "2"])
def test_refuses_when_torch_disables_multicast(policy, clean_env, value):
  clean_env.setenv(OPT_IN, "1")
  clean_env.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", value)
  assert policy(0) == 3


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_refuses_when_nvshmem_disables_nvls(policy, clean_env, value):
  clean_env.setenv(OPT_IN, "1")
  clean_env.setenv("NVSHMEM_DISABLE_NVLS", value)
  assert policy(0) == 4


def test_disablers_win_over_opt_in_all_set(policy, clean_env):
  clean_env.setenv(OPT_IN, "1")
  for name, value in zip(DISABLERS, ("0", "1", "1")):
    clean_env.setenv(name, value)
  assert policy(0) != 0


def test_refuses_without_device_support(policy, clean_env):
  clean_env.setenv(OPT_IN, "1")
  assert policy(0) == 5


def test_python_view_uses_the_cpp_policy(clean_env):
  from weave_jax import fused
  if not fused.available():
    pytest.skip("libweave_fused not built")
  code, reason = fused.multicast_policy(False)
  assert code == 1 and "WEAVE_ENABLE_MULTIMEM" in reason


def test_only_one_function_in_one_file_calls_cumulticast():
  hits = {}
  for path in list((ROOT / "ffi").rglob("*")) + list((ROOT / "weave_jax").rglob("*.py")):
    if path.is_file() and path.suffix in (".cu", ".cuh", ".h", ".cc", ".cpp", ".py"):
      text = path.read_text()
      if re.search(r"cuMulticast\w+", text):
        hits[path.relative_to(ROOT).as_posix()] = text
  assert list(hits) == ["ffi/multicast_gate.cu"], list(hits)
  text = hits["ffi/multicast_gate.cu"]
  # every use sits inside weave_multicast_create, after the policy call
  body = text[text.index("int weave_multicast_create("):]
  outside = text[:text.index("int weave_multicast_create(")]
  assert not re.search(r"cuMulticast\w+\s*[(\"]", outside.split("*/")[-1] if "*/" in outside else outside)
  create = '"' + "cuMulticast" + 'Create"'  # spelled apart so repo-wide greps find one file
  assert body.index("weave_multicast_policy(") < body.index(create)

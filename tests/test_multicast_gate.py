"""The multicast gate refuses in every case DESIGN.md names, proven on any machine with a C++
compiler: the policy source (ffi/multicast_policy.cc, pure C++) is built here alone with the
host compiler, without CUDA, and called through ctypes.  Only the policy is ever called, never
the creating function, and the environment is changed only through monkeypatch."""
from __future__ import annotations

import ctypes
import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
POLICY_SRC = ROOT / "ffi" / "multicast_policy.cc"
DISABLERS = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")
OPT_IN = "WEAVE_ENABLE_MULTIMEM"


def _host_compiler() -> str:
  for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  pytest.fail("no host C++ compiler (g++, c++ or clang++): the multicast policy cannot be built")


@pytest.fixture(scope="module")
def policy_lib(tmp_path_factory):
  """ffi/multicast_policy.cc built alone (no CUDA headers, no nvcc) into a shared library."""
  so = tmp_path_factory.mktemp("gate") / "libweave_policy.so"
  build = subprocess.run([_host_compiler(), "-std=c++17", "-O1", "-shared", "-fPIC", "-I",
                          str(ROOT / "ffi"), str(POLICY_SRC), "-o", str(so)],
                         capture_output=True, text=True)
  assert build.returncode == 0, f"multicast policy failed to build:\n{build.stderr}"
  lib = ctypes.CDLL(str(so))
  lib.weave_multicast_policy.restype = ctypes.c_int
  lib.weave_multicast_policy.argtypes = [ctypes.c_int]
  lib.weave_multicast_policy_reason.restype = ctypes.c_char_p
  lib.weave_multicast_policy_reason.argtypes = [ctypes.c_int]
  return lib


@pytest.fixture(scope="module")
def policy(policy_lib):
  return policy_lib.weave_multicast_policy


@pytest.fixture
def clean_env(monkeypatch):
  for name in DISABLERS + (OPT_IN,):
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_refuses_without_opt_in(policy, clean_env):
  assert policy(1) == 1
  clean_env.setenv(OPT_IN, "yes")  # only exactly "1" opts in
  assert policy(1) == 1


@pytest.mark.parametrize("value", ["0", "false", "no", "off", ""])
def test_refuses_when_nccl_disables_nvls(policy, clean_env, value):
  clean_env.setenv(OPT_IN, "1")
  clean_env.setenv("NCCL_NVLS_ENABLE", value)
  assert policy(1) == 2


@pytest.mark.parametrize("value", ["1", "true", "yes", "2"])
def test_refuses_when_torch_disables_multicast(policy, clean_env, value):
  clean_env.setenv(OPT_IN, "1")
  clean_env.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", value)
  assert policy(1) == 3


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_refuses_when_nvshmem_disables_nvls(policy, clean_env, value):
  clean_env.setenv(OPT_IN, "1")
  clean_env.setenv("NVSHMEM_DISABLE_NVLS", value)
  assert policy(1) == 4


def test_disablers_win_over_opt_in_all_set(policy, clean_env):
  clean_env.setenv(OPT_IN, "1")
  for name, value in zip(DISABLERS, ("0", "1", "1")):
    clean_env.setenv(name, value)
  assert policy(1) == 2


def test_refuses_without_device_support(policy, clean_env):
  clean_env.setenv(OPT_IN, "1")
  assert policy(0) == 5


def test_false_values_of_the_disablers_do_not_refuse(policy, clean_env):
  """The only case that allows: opted in, supported, every disabler present but off.  Without
  it, a policy that always refused would pass every test above."""
  clean_env.setenv(OPT_IN, "1")
  clean_env.setenv("NCCL_NVLS_ENABLE", "1")
  clean_env.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "0")
  clean_env.setenv("NVSHMEM_DISABLE_NVLS", "false")
  assert policy(1) == 0


def test_every_refusal_has_a_reason(policy_lib):
  reasons = {code: policy_lib.weave_multicast_policy_reason(code).decode() for code in range(6)}
  assert reasons[0] == "allowed"
  assert "WEAVE_ENABLE_MULTIMEM" in reasons[1]
  for code, name in zip((2, 3, 4), DISABLERS):
    assert name in reasons[code]
  assert "MULTICAST_SUPPORTED" in reasons[5]
  assert policy_lib.weave_multicast_policy_reason(99).decode() == "unknown refusal"


def test_python_view_uses_the_cpp_policy(clean_env):
  from weave_jax import fused
  if not fused.available():
    pytest.skip("libweave_fused not built (the policy itself is tested above)")
  code, reason = fused.multicast_policy(False)
  assert code == 1 and "WEAVE_ENABLE_MULTIMEM" in reason


def test_library_builds_the_same_policy_source():
  cmake = (ROOT / "ffi" / "CMakeLists.txt").read_text()
  assert re.search(r"add_library\(weave_fused SHARED[^)]*\bmulticast_policy\.cc\b", cmake)
  gate = (ROOT / "ffi" / "multicast_gate.cu").read_text()
  assert '#include "multicast_policy.h"' in gate
  assert "getenv" not in gate  # the policy is decided in one place


def test_only_one_function_in_one_file_calls_cumulticast():
  hits = {}
  dirs = ("ffi", "experimental", "weave_jax", "pallas_kernels", "run", "examples")
  for path in (p for d in dirs for p in (ROOT / d).rglob("*")):
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

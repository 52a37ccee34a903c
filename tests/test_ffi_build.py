"""Build checks of the CUDA sources.  CI (nvcc, no GPU): the sm_90a kernel holds the multimem
instructions, the P2P path compiles (sm_90a with its TMA bulk copies, and sm_80), the built
library does not link libcuda, and nothing experimental (experimental/ffi/) reaches the library.
On a GPU (one is enough): every algorithm's kernels with all ranks on that GPU
(ffi/check/ranks_on_one_gpu.cu)."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc") or next(
    (str(p) for p in [pathlib.Path("/usr/local/cuda/bin/nvcc")] if p.exists()), None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")

INSTANTIATE = """
#include "fused_reduce_add_norm.cuh"
template __global__ void weave::fused_reduce_add_norm_kernel<__nv_bfloat16, weave::%(t)s, 2>(
    const __grid_constant__ weave::KernelParams);
template __global__ void weave::fused_reduce_add_norm_kernel<__half, weave::%(t)s, 4>(
    const __grid_constant__ weave::KernelParams);
%(extra)s
"""
# the copy-engine and one-shot kernels exist for the peer transport only
PEER_ONLY = """
template __global__ void weave::fused_reduce_add_norm_kernel<__nv_bfloat16, weave::PeerTransport,
                                                             2, true>(
    const __grid_constant__ weave::KernelParams);
template __global__ void weave::ce_reduce_add_norm_kernel<__nv_bfloat16, 2>(
    const __grid_constant__ weave::KernelParams);
template __global__ void weave::oneshot_reduce_add_norm_kernel<__half, 4>(
    const __grid_constant__ weave::KernelParams);
"""


def _nvcc(src, out, arch, kind):
  flag = {"ptx": "-ptx", "cubin": "-cubin"}[kind]
  code = f"compute_{arch}" if kind == "ptx" else f"sm_{arch}"
  build = subprocess.run([NVCC, flag, "-std=c++17", "-O3",
                          f"-gencode=arch=compute_{arch},code={code}", "-I", str(ROOT / "ffi"),
                          str(src), "-o", str(out)], capture_output=True, text=True)
  assert build.returncode == 0, build.stderr[-4000:]
  return out


def _compile(tmp_path, transport, arch, kind):
  src = tmp_path / f"{transport}.cu"
  extra = PEER_ONLY if transport == "PeerTransport" else ""
  src.write_text(INSTANTIATE % {"t": transport, "extra": extra})
  return _nvcc(src, tmp_path / f"{transport}_{arch}.{kind}", arch, kind)


def _cuobjdump():
  found = shutil.which("cuobjdump")
  if found:
    return found
  try:
    import triton
    cand = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(cand) if cand.exists() else None
  except ImportError:
    return None


@needs_nvcc
def test_multimem_sm90a_ptx_and_sass(tmp_path):
  ptx = _compile(tmp_path, "MultimemTransport", "90a", "ptx").read_text()
  assert "multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.bf16x2" in ptx
  assert "multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.f16x2" in ptx
  assert "multimem.st.relaxed.sys.global.v4.f32" in ptx
  cubin = _compile(tmp_path, "MultimemTransport", "90a", "cubin")  # ptxas accepts it for sm_90a
  tool = _cuobjdump()
  if tool is None:
    pytest.skip("no cuobjdump to read SASS (PTX checked)")
  sass = subprocess.run([tool, "-sass", str(cubin)], check=True, capture_output=True,
                        text=True).stdout
  assert "LDGMC" in sass, "multimem.ld_reduce did not reach SASS"


@needs_nvcc
def test_peer_path_compiles_with_system_scope_protocol(tmp_path):
  ptx = _compile(tmp_path, "PeerTransport", "90a", "ptx").read_text()
  assert "multimem" not in ptx
  for needle in ("st.release.sys.global.u32", "ld.acquire.sys.global.u32", "%globaltimer", "trap"):
    assert needle in ptx, needle
  assert "ld.global.v4" in ptx or "ld.global.nc.v4" in ptx  # 16-byte accesses
  for kernel in ("ce_reduce_add_norm_kernel", "oneshot_reduce_add_norm_kernel"):
    assert kernel in ptx, kernel
  # the Hopper (kTma) two-shot kernel: bulk copies completing on mbarriers, async-proxy fences
  for needle in ("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes",
                 "cp.async.bulk.global.shared::cta.bulk_group", "mbarrier.try_wait.parity",
                 "fence.proxy.async.global"):
    assert needle in ptx, needle
  _compile(tmp_path, "PeerTransport", "80", "cubin")  # there the kTma kernel only traps


def test_built_library_needs_no_driver():
  lib = ROOT / "weave_jax" / "_native" / "libweave_fused.so"
  if not lib.exists():
    pytest.skip("library not built")
  deps = subprocess.run(["ldd", str(lib)], capture_output=True, text=True).stdout
  assert "libcuda.so" not in deps and "libcudart.so" not in deps, deps


# What left the library for experimental/: the TMA copy-engine local kernel, the direct copy-engine
# variant, the high-priority side stream, the LSU-only algorithm codes.
EXPERIMENTAL_NAMES = ("ce_tma", "kCeTma", "CopyEngineDirect", "CopyEngineLsu", "TwoShotLsu",
                      "side_high", "ce_normed", "experimental/")


def test_library_sources_hold_nothing_experimental():
  found = {}
  for path in sorted((ROOT / "ffi").rglob("*")):
    if path.suffix in (".cu", ".cuh", ".h", ".cc", ".txt"):
      text = path.read_text()
      if path.suffix == ".txt":  # CMake: its comments may say where experimental code lives
        text = "\n".join(line.split("#")[0] for line in text.splitlines())
      hits = [name for name in EXPERIMENTAL_NAMES if name in text]
      if hits:
        found[path.relative_to(ROOT).as_posix()] = hits
  assert not found, found


def test_built_library_holds_no_experimental_kernel():
  lib = ROOT / "weave_jax" / "_native" / "libweave_fused.so"
  if not lib.exists():
    pytest.skip("library not built")
  data = lib.read_bytes()
  assert b"ce_tma_reduce_add_norm_kernel" not in data
  assert b"oneshot_reduce_add_norm_kernel" in data  # the check can see kernel names


@needs_nvcc
def test_experimental_tma_kernel_still_compiles(tmp_path):
  """experimental/ffi/ce_tma_kernel.cuh reuses the library's copy-engine Io and TMA helpers:
  its benches' build commands (experimental/README.md) must keep working."""
  src = tmp_path / "ce_tma.cu"
  src.write_text(f'#include "{ROOT / "experimental" / "ffi" / "ce_tma_kernel.cuh"}"\n'
                 "template __global__ void weave::ce_tma_reduce_add_norm_kernel<__nv_bfloat16, 1>(\n"
                 "    const __grid_constant__ weave::KernelParams);\n")
  ptx = _nvcc(src, tmp_path / "ce_tma.ptx", "90a", "ptx").read_text()
  assert "ce_tma_reduce_add_norm_kernel" in ptx


@pytest.mark.gpu
def test_every_algorithm_with_all_ranks_on_one_gpu(tmp_path):
  """Two-shot (TMA and 16-byte copies), one-shot and the copy-engine local kernel at TP 2 and 4,
  every rank's buffers and kernels on one GPU: new residual bitwise equal to the fp32 sum in
  rank order, normed within tolerance of fp32 RMSNorm and bitwise equal across ranks and
  algorithms (the harness prints each case)."""
  assert NVCC is not None, "nvcc not found: the one-GPU kernel check cannot be built"
  exe = tmp_path / "ranks_on_one_gpu"
  _nvcc_build(ROOT / "ffi" / "check" / "ranks_on_one_gpu.cu", exe)
  run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
  assert run.returncode == 0 and run.stdout.rstrip().endswith("ALL PASSED"), (
      run.stdout[-6000:] + run.stderr[-2000:])


def _nvcc_build(src, exe):
  build = subprocess.run([NVCC, "-std=c++17", "-O3", "-arch=native", "-I", str(ROOT / "ffi"),
                          str(src), "-o", str(exe)], capture_output=True, text=True)
  assert build.returncode == 0, build.stderr[-4000:]
  return exe

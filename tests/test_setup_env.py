"""run/setup_env.sh picks the install from the machine: JAX's CUDA plugin where an NVIDIA driver is
present (cuda12 by default, cuda13 with a CUDA 13 toolkit or on request), none without one, and the
extra of the job (bench or test).  Checked on CPU with fake nvidia-smi and nvcc on PATH and the
script's dry run, which prints the commands instead of running them; and run/bench.sh picks the
job for the machine's GPU count (fake nvidia-smi, a python that records its calls)."""
from __future__ import annotations

import os
import pathlib
import stat
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SETUP = ROOT / "run" / "setup_env.sh"

NVIDIA_SMI = """#!/bin/sh
[ -n "$FAKE_GPU" ] || exit 9
if [ "$1" = "-L" ]; then echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"; exit 0; fi
echo "| NVIDIA-SMI 580.95.05   Driver Version: 580.95.05   CUDA Version: $FAKE_DRIVER_CUDA |"
"""
NVCC = """#!/bin/sh
[ -n "$FAKE_NVCC" ] || exit 1
echo "Cuda compilation tools, release $FAKE_NVCC, V$FAKE_NVCC.88"
"""


def fake_programs(directory: pathlib.Path, **programs: str) -> pathlib.Path:
  """``directory`` (created) holding each named program's script text, executable."""
  directory.mkdir(exist_ok=True)
  for name, text in programs.items():
    (directory / name).write_text(text)
    (directory / name).chmod(stat.S_IRWXU)
  return directory


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory):
  """A directory with fake nvidia-smi and nvcc, driven by FAKE_* variables."""
  return fake_programs(tmp_path_factory.mktemp("fake_bin"), **{"nvidia-smi": NVIDIA_SMI},
                       nvcc=NVCC)


def setup(fake_bin, tmp_path, extra, *, gpu=False, driver="13.0", nvcc="", cuda=None):
  """Runs the dry run; returns (exit status, the pip install line or None, stderr)."""
  env = dict(os.environ, PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
             WEAVE_SETUP_DRY_RUN="1", WEAVE_VENV=str(tmp_path / "venv"), PYTHON=sys.executable,
             FAKE_GPU="1" if gpu else "", FAKE_DRIVER_CUDA=driver, FAKE_NVCC=nvcc)
  env.pop("WEAVE_CUDA", None)
  env.pop("WEAVE_SETUP", None)
  if cuda is not None:
    env["WEAVE_CUDA"] = cuda
  proc = subprocess.run(["bash", str(SETUP), extra], env=env, capture_output=True, text=True,
                        timeout=60)
  out = proc.stdout + proc.stderr
  installs = [line for line in out.splitlines() if " -m pip install -q -e " in line]
  assert len(installs) <= 1, out
  return proc.returncode, (installs[0] if installs else None), out


@pytest.mark.parametrize("extra", ["test", "bench"])
def test_no_gpu_installs_the_job_extra_only(fake_bin, tmp_path, extra):
  rc, pip, out = setup(fake_bin, tmp_path, extra)
  assert rc == 0, out
  assert pip.startswith("[dry-run] ") and pip.endswith(f"-m pip install -q -e {ROOT}[{extra}]")
  assert not (tmp_path / "venv").exists()   # a dry run creates nothing


def test_gpu_installs_cuda12_by_default(fake_bin, tmp_path):
  rc, pip, out = setup(fake_bin, tmp_path, "bench", gpu=True, driver="12.8")
  assert rc == 0, out
  assert pip.endswith("[bench,cuda12]"), pip


def test_cuda13_toolkit_gets_the_cuda13_plugin(fake_bin, tmp_path):
  rc, pip, out = setup(fake_bin, tmp_path, "test", gpu=True, driver="13.0", nvcc="13.0")
  assert rc == 0, out
  assert pip.endswith("[test,cuda13]"), pip
  rc, pip, out = setup(fake_bin, tmp_path, "test", gpu=True, driver="13.0", nvcc="12.9")
  assert rc == 0 and pip.endswith("[test,cuda12]"), out


@pytest.mark.parametrize("cuda, want", [("12", "[bench,cuda12]"), ("13", "[bench,cuda13]"),
                                        ("none", "[bench]")])
def test_weave_cuda_chooses(fake_bin, tmp_path, cuda, want):
  rc, pip, out = setup(fake_bin, tmp_path, "bench", gpu=True, nvcc="13.0", cuda=cuda)
  assert rc == 0, out
  assert pip.endswith(want), pip


def test_driver_too_old_for_the_plugin_is_refused(fake_bin, tmp_path):
  rc, pip, out = setup(fake_bin, tmp_path, "bench", gpu=True, driver="12.4", cuda="13")
  assert rc != 0 and pip is None
  assert "jax[cuda13] needs an NVIDIA driver for CUDA >= 13.0" in out and "CUDA 12" in out


def test_bad_weave_cuda_is_refused(fake_bin, tmp_path):
  rc, pip, out = setup(fake_bin, tmp_path, "bench", gpu=True, cuda="11")
  assert rc != 0 and pip is None
  assert "WEAVE_CUDA must be 12, 13 or none, got '11'" in out


def test_the_job_scripts_install_their_own_extra():
  """bench.sh installs the bench extra (no test-only packages), test.sh the test extra."""
  for script, extra in (("bench.sh", "bench"), ("test.sh", "test")):
    text = (ROOT / "run" / script).read_text()
    assert f'setup_env.sh" {extra}\n' in text, script


def test_extras():
  """The benchmark extra holds no test-only package; the CUDA and Triton extras are as the
  README states them."""
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  names = lambda extra: {req.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip()
                         for req in extras[extra]}
  assert not names("bench") & {"torch", "transformers", "pytest", "pytest-timeout"}
  assert {"torch", "transformers", "pytest"} <= names("test")
  assert extras["cuda12"] == ["jax[cuda12]>=0.11"] and extras["cuda13"] == ["jax[cuda13]>=0.11"]
  assert extras["triton"] == ["jax-triton>=0.3.1,<0.5", "triton>=3.6"]


PYTHON_RECORDER = """#!/bin/sh
echo "python $*" >> "$CALLS"
"""
GPU_LIST = """#!/bin/sh
i=0
while [ "$i" -lt "${FAKE_GPUS:-0}" ]; do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; i=$((i+1)); done
"""


@pytest.mark.parametrize("gpus", [0, 1, 2])
def test_bench_fits_the_machine(tmp_path, gpus):
  """bash run/bench.sh: the prefill benchmark with several GPUs or none; with one GPU the split's
  compute at one TP=2 rank's shapes, then the paged-attention and serving benchmarks."""
  bin_dir = fake_programs(tmp_path / "bin", python3=PYTHON_RECORDER, **{"nvidia-smi": GPU_LIST})
  calls = tmp_path / "calls"
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", WEAVE_SETUP="none",
             FAKE_GPUS=str(gpus), CALLS=str(calls))
  proc = subprocess.run(["bash", str(ROOT / "run" / "bench.sh"), "--iters", "3"], env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  ran = calls.read_text().splitlines()
  if gpus != 1:
    assert ran == ["python run/bench_prefill.py --iters 3"]
    return
  assert ran[0] == ("python run/bench_prefill.py --shard-of 2 --layers 16 --variants nocomm "
                    "nocomm+weave --iters 3")
  assert ran[1:] == ["python run/bench_attention.py", "python run/bench_serve.py"]
  assert "tensor parallelism needs >= 2 GPUs" in proc.stderr


GPU_TEST = """import pytest

@pytest.mark.gpu
def test_on_gpu():
  pass
"""


@pytest.mark.parametrize("driver, platforms, want", [
    (True, "", "1 error"),          # GPUs, CPU-only JAX: the GPU test fails, naming the fix
    (True, "cpu", "1 skipped"),     # CPU-only JAX asked for: skipped
    (False, "", "1 skipped")])      # no GPU: skipped
def test_gpu_tests_fail_where_jax_misses_the_gpus(tmp_path, driver, platforms, want):
  bin_dir = fake_programs(tmp_path / "bin", **{"nvidia-smi": GPU_LIST})
  (tmp_path / "test_gpu_marked.py").write_text(GPU_TEST)
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
             FAKE_GPUS="1" if driver else "0", JAX_PLATFORMS=platforms,
             PYTHONPATH=str(ROOT / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p",
                         "no:cacheprovider", str(tmp_path / "test_gpu_marked.py")], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=300)
  assert want in proc.stdout, proc.stdout[-2000:]
  if driver and not platforms:
    assert "JAX sees none: install JAX's CUDA plugin" in proc.stdout

"""run/gpu_all.sh stays runnable: with fake nvidia-smi (2 GPUs, then 1) and a python that records
its calls, every stage's command line is accepted by its script's own argument parser."""
from __future__ import annotations

import os
import shlex
import subprocess

import pytest
from conftest import ROOT, load_module
from test_setup_env import GPU_LIST, fake_programs   # GPU_LIST: nvidia-smi -L of $FAKE_GPUS

PYTHON_RECORDER = """#!/usr/bin/env bash
printf '%q ' "$@" >> "$CALLS"; echo >> "$CALLS"
echo "ran $1"   # the stages filter the output with grep, which fails on none
"""
STAGES = ["fused", "ce", "grid", "prefill", "serve", "attention", "gemm", "tune"]
PARSED = ("bench_allreduce_norm", "bench_prefill", "bench_serve", "bench_attention",
          "bench_decode_gemm")


def recorded_calls(tmp_path, gpus: int) -> list[list[str]]:
  bin_dir = fake_programs(tmp_path / "bin", recorder=PYTHON_RECORDER, **{"nvidia-smi": GPU_LIST})
  calls = tmp_path / "calls"
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
             PY=str(bin_dir / "recorder"), FAKE_GPUS=str(gpus), CALLS=str(calls),
             OUT=str(tmp_path / "out"))
  proc = subprocess.run(["bash", str(ROOT / "run" / "gpu_all.sh"), *STAGES], env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return [shlex.split(line) for line in calls.read_text().splitlines()]


@pytest.mark.parametrize("gpus", [2, 1])
def test_every_stage_parses(tmp_path, gpus):
  calls = recorded_calls(tmp_path, gpus)
  scripts = [argv[0] for argv in calls]
  want = {"run/bench_prefill.py", "run/bench_serve.py", "run/check_attention_gpu.py",
          "run/bench_attention.py", "run/bench_decode_gemm.py", "run/tune_split.py"}
  if gpus > 1:
    want.add("run/bench_allreduce_norm.py")
  assert set(scripts) == want, scripts
  for script, *argv in calls:
    name = os.path.basename(script)[:-3]
    if name in PARSED:
      module = load_module(ROOT / script, f"gpu_all_{name}")
      extra = ["--allow-cpu"] if name == "bench_prefill" else []
      module.parse_args(argv + extra)   # a usage error raises SystemExit
    else:
      assert argv == [], (script, argv)   # scripts without a parse_args take no arguments here

"""The main job (run/bench_prefill.py) end to end on the tiny preset and 8 virtual CPU devices
(run on JAX's CPU backend on any host), its refusal of the GPU defaults where JAX has no GPU,
and the interleaved timing it uses.  Timings themselves are never asserted."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import load_module

from weave_jax import bench

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_time_interleaved_alternates_calls():
  calls = []
  fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
  out = bench.time_interleaved(fns, warmup=1, iters=3)
  assert calls[:3] == ["a", "b", "c"]                  # warm-up, one function after another
  assert calls[3:] == ["a", "b", "c"] * 3              # then round-robin
  assert set(out) == {"a", "b", "c"} and all(t.samples == 3 for t in out.values())


@pytest.fixture(scope="module")
def bench_prefill():
  return load_module(ROOT / "run" / "bench_prefill.py", "bench_prefill")


def run_on_cpu(*args: str) -> subprocess.CompletedProcess:
  """run/bench_prefill.py on JAX's CPU backend (8 virtual devices), on any host: where an NVIDIA
  driver is present, --allow-cpu says that the CPU run is meant."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, str(ROOT / "run" / "bench_prefill.py"), "--allow-cpu",
                         *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_main_job_on_cpu_writes_table_json_and_chart(tmp_path):
  """The tiny preset end to end, with both utilization figures labelled by what they divide by
  (a given datasheet peak, and the matmul rate measured in the same run)."""
  out, png = tmp_path / "prefill.json", tmp_path / "prefill.png"
  proc = run_on_cpu("--tokens", "64", "96", "--variants", "baseline", "rs_ag+weave", "nocomm",
                    "nocomm+weave", "--iters", "2", "--warmup", "1", "--datasheet-tflops", "2.5",
                    "--json", str(out), "--png", str(png))
  res = json.loads(out.read_text())
  assert res["preset"] == "tiny" and res["tp"] == 8 and res["device"] == "cpu"
  assert [r["tokens"] for r in res["rows"]] == [64, 96]
  for row in res["rows"]:
    for v in ("baseline", "rs_ag+weave", "nocomm", "nocomm+weave"):
      assert row[v]["ms"] > 0, (row["tokens"], v, row[v])
    assert row["rs_ag+weave"]["split"] is not None and row["baseline"]["split"] is None
    assert row["nocomm+weave"]["split"] is not None
    assert row["nocomm_of_datasheet"] == pytest.approx(row["nocomm_tflops"] / 2.5)
    assert row["nocomm_of_matmul"] == pytest.approx(
        row["nocomm_tflops"] / res["matmul_measured_tflops"])
  assert res["datasheet_tflops"] == 2.5 and res["matmul_measured_tflops"] > 0
  table = proc.stdout
  assert "| tokens | baseline ms/layer" in table and "speedup rs_ag+weave" in table
  assert "nocomm / datasheet peak (2.5)" in table
  assert f"nocomm / matmul measured this run ({res['matmul_measured_tflops']:.1f})" in table
  assert "datasheet dense bf16 peak: 2.5 TFLOP/s" in proc.stderr
  assert "bf16 matmul rate measured in this run" in proc.stderr
  assert png.stat().st_size > 0


def test_shard_of_runs_one_ranks_shapes(bench_prefill, tmp_path):
  """--shard-of N: one TP=N rank's heads, KV heads and FFN on --tp 1; bad uses are usage errors."""
  from weave_jax import preset
  cfg = bench_prefill.rank_shapes(preset("llama-3.3-70b"), 2)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.hidden_size) == (
      32, 4, 14336, 8192)
  with pytest.raises(ValueError, match="MoE"):
    bench_prefill.rank_shapes(preset("mixtral-8x22b"), 2)
  replicated = bench_prefill.rank_shapes(preset("tiny", num_kv_heads=2), 4)   # KV heads x2
  assert (replicated.num_heads, replicated.num_kv_heads, replicated.kv_replicas) == (4, 1, 1)
  with pytest.raises(ValueError, match="TP size 8 is larger than num_kv_heads=3"):
    bench_prefill.rank_shapes(preset("tiny", num_heads=24, num_kv_heads=3), 8)
  for bad in (["--shard-of", "2"], ["--shard-of", "2", "--variants", "baseline", "nocomm"],
              ["--shard-of", "3", "--variants", "nocomm"],
              ["--shard-of", "2", "--tp", "2", "--variants", "nocomm"]):
    with pytest.raises(SystemExit):
      bench_prefill.parse_args(bad + ["--allow-cpu"])
  out = tmp_path / "shard.json"
  proc = run_on_cpu("--shard-of", "2", "--tokens", "64", "--variants", "nocomm", "nocomm+weave",
                    "--iters", "1", "--warmup", "1", "--no-matmul-peak", "--json", str(out))
  res = json.loads(out.read_text())
  assert res["tp"] == 1 and res["shard_of"] == 2
  assert res["rows"][0]["nocomm+weave"]["split"] is not None
  assert res["rows"][0]["nocomm"]["ms"] > 0
  # no datasheet figure for a CPU and no matmul measured: neither utilization column is printed
  assert res["datasheet_tflops"] is None and res["matmul_measured_tflops"] is None
  assert "datasheet" not in proc.stdout and "matmul measured" not in proc.stdout


def test_gpu_host_with_cpu_jax_refuses_the_gpu_defaults(bench_prefill, monkeypatch, capsys):
  """An NVIDIA driver but CPU-only JAX: one clear message naming what to install, before any
  model is built; --allow-cpu runs the CPU defaults on purpose."""
  monkeypatch.setattr(bench_prefill, "NVIDIA_DRIVER", True)
  monkeypatch.setattr(bench_prefill, "HAS_GPU", False)
  with pytest.raises(SystemExit):
    bench_prefill.parse_args([])
  err = capsys.readouterr().err
  assert "NVIDIA driver but JAX runs on" in err and "pip install -e '.[bench,cuda12]'" in err
  args = bench_prefill.parse_args(["--allow-cpu"])
  assert args.preset == "tiny" and args.tokens == [128, 1024]


def test_one_device_refuses_variants_that_would_time_one_program(bench_prefill, capsys):
  """TP=1 has no communication: the comparison is refused and --shard-of 2 is named instead."""
  with pytest.raises(SystemExit):
    bench_prefill.parse_args(["--tp", "1", "--variants", "baseline", "nocomm", "--allow-cpu"])
  assert "TP=1" in capsys.readouterr().err
  assert bench_prefill.parse_args(["--shard-of", "2", "--variants", "nocomm", "nocomm+weave",
                                   "--allow-cpu"]).tp == 1


def test_datasheet_peaks(bench_prefill):
  """H100 SXM and H200: 989.5 dense bf16 TFLOP/s; unknown cards have none (never a guess)."""
  assert bench_prefill.datasheet_tflops("NVIDIA H100 80GB HBM3") == 989.5
  assert bench_prefill.datasheet_tflops("NVIDIA H200") == 989.5
  assert bench_prefill.datasheet_tflops("NVIDIA A100-SXM4-80GB") is None
  assert bench_prefill.datasheet_tflops("cpu") is None


def test_variant_names(bench_prefill):
  import run_common  # bench_prefill put run/ on sys.path
  assert run_common.parse_variant("fused+weave@8") == ("fused+weave", {"ctas": 8, "weave_ctas": 8})
  assert run_common.parse_variant("fused+weave@16:weave_algorithm=one_shot,algorithm=two_shot") == (
      "fused+weave", {"ctas": 16, "weave_ctas": 16, "weave_algorithm": "one_shot",
                      "algorithm": "two_shot"})
  assert run_common.parse_variant("fused:ce_ctas=64") == ("fused", {"ce_ctas": 64})
  assert run_common.parse_variant("nocomm+weave") == ("nocomm+weave", {})
  for bad in ("fused+weave@", "fused@x", "baseline@8", "nosuch", "nocomm:a=b", "fused:prio"):
    with pytest.raises(ValueError):
      run_common.parse_variant(bad)
  with pytest.raises(SystemExit):   # argparse usage errors, before any model is built
    bench_prefill.parse_args(["--variants", "baseline@8", "--allow-cpu"])
  with pytest.raises(SystemExit):
    bench_prefill.parse_args(["--variants", "nocomm", "nocomm", "--allow-cpu"])
  for bad_options in ("fused+tuned:weave_algorithm=copy_engine_tma", "fused:side_priority=normal"):
    with pytest.raises(SystemExit):   # FusedOptions refuses them at parse time
      bench_prefill.parse_args(["--variants", bad_options, "--allow-cpu"])
  args = bench_prefill.parse_args(["--variants", "fused@16", "nocomm+weave", "--allow-cpu"])
  assert args.variants == ["fused@16", "nocomm+weave"]


def test_tuned_variant_is_the_library_default(monkeypatch):
  """fused+tuned: RunConfig as a library user writes it (tuned threshold, per-size backend);
  fused+weave: always woven, its own backend at every size."""
  import sys
  sys.path.insert(0, str(ROOT / "run"))
  import run_common
  monkeypatch.setattr(run_common, "Engine", lambda model, mesh, run: run)  # the RunConfig built
  tuned = run_common.engine_for(None, None, "fused+tuned")
  woven = run_common.engine_for(None, None, "fused+weave:weave_algorithm=two_shot")
  assert (tuned.backend, tuned.weave, tuned.weave_min_tokens, tuned.backend_by_size) == (
      "fused_p2p", True, None, True)
  assert (woven.weave_min_tokens, woven.backend_by_size) == (1, False)
  assert woven.options.changed() == {"weave_algorithm": "two_shot"}

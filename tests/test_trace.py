"""Tests for weave_jax.trace: interval math, classification, fixtures, and a real CPU capture."""

import os
import sys

if "jax" not in sys.modules:  # a tests/conftest.py may set this too; only matters before jax loads
  _flag = "--xla_force_host_platform_device_count=8"
  if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from weave_jax import trace as wt

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GPU_SMALL = FIXTURES / "gpu_trace_small.trace.json.gz"  # 2xH200, jax 0.11.2: woven rs_ag, 2 layers
GPU_REAL = FIXTURES / "gpu_h200x2_jax0112.trace.json.gz"  # 2xH200, jax 0.11.2, via capture()
SYNTH = FIXTURES / "synthetic_gpu.trace.json"  # hand-written, GPU-shaped, exact numbers


# ----------------------------------------------------------------------------- interval math
def test_union_overlap_nested_disjoint_touching():
  assert wt.union([(0, 10), (5, 15)]) == [(0, 15)]  # overlap
  assert wt.union([(0, 10), (2, 3)]) == [(0, 10)]  # nested
  assert wt.union([(20, 30), (0, 10)]) == [(0, 10), (20, 30)]  # disjoint, unsorted
  assert wt.union([(0, 10), (10, 12)]) == [(0, 12)]  # touching
  assert wt.union([(5, 5), (7, 6)]) == []  # empty / inverted dropped
  assert wt.measure([(0, 10), (5, 15), (20, 21)]) == 16


def test_subtract():
  assert wt.subtract([(0, 100)], [(10, 20), (50, 60)]) == [(0, 10), (20, 50), (60, 100)]
  assert wt.subtract([(0, 10)], [(0, 10)]) == []
  assert wt.subtract([(0, 10), (20, 30)], [(5, 25)]) == [(0, 5), (25, 30)]
  assert wt.subtract([(0, 10)], []) == [(0, 10)]
  assert wt.subtract([(0, 10)], [(20, 30)]) == [(0, 10)]


def test_overlap_stats_multi_stream():
  # Stream 1: GEMMs [0,40] [60,100]; stream 2 (a second compute stream): [30,70].
  # Collectives: [35,65] fully covered by the union of compute; [90,130] half exposed.
  compute = [(0, 40), (60, 100), (30, 70)]
  s = wt.overlap_stats(compute, [(35, 65), (90, 130)])
  assert (s.compute_us, s.collective_us, s.exposed_us) == (100, 70, 30)
  assert s.hidden_frac == pytest.approx(1 - 30 / 70)
  assert wt.overlap_stats([(0, 1)], []).hidden_frac is None


def test_exposed_time_in_short_compute_gaps():
  """Exposure inside idle stretches of <= SHORT_GAP_US between compute ops is reported apart
  (launch gaps a model without communication has too); longer gaps and the tail are not."""
  assert wt.SHORT_GAP_US == 10.0
  assert wt.short_gaps([(0, 10), (15, 20), (40, 50), (8, 12)], 10) == [(12, 15)]
  assert wt.intersect([(0, 10), (20, 30)], [(5, 25)]) == [(5, 10), (20, 25)]
  # compute [0,10] [14,20] [40,50]: gaps of 4 (short) and 20 (long) µs; collective [5,60]
  s = wt.overlap_stats([(0, 10), (14, 20), (40, 50)], [(5, 60)])
  assert (s.exposed_us, s.exposed_in_gaps_us) == (34, 4)
  assert s.to_dict()["exposed_in_gaps_ms"] == pytest.approx(0.004)
  assert wt.mean_stats([s, wt.Stats()]) == wt.Stats(13, 27.5, 17, 2)


def test_classification_table():
  collectives = [
      "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)",  # real GPU
      "ncclKernel_ReduceScatter_fp32", "psum_invariant.14",  # real CPU op name
      "all-reduce-start.1", "all_gather.3", "collective-permute-done", "all-to-all.2",
      "fused_reduce_add_norm_kernel", "weave_fused_done", "ppermute.1",
      "void weave::ce_reduce_add_norm_kernel<__nv_bfloat16, 2>(weave::KernelParams)",
      "MemcpyP2P",
  ]
  compute = ["gemm_fusion_dot_general_6", "nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NNN",
             "ynn_fusion.1", "fusion.2", "wrapped_tanh", "custom-call.1", "MemcpyD2D"]
  assert all(wt.is_collective(n) for n in collectives)
  assert not any(wt.is_collective(n) for n in compute)
  assert wt.is_collective("custom-call.1", None, "all-reduce")  # via HLO opcode


def test_layer_stats_count_hiding_by_other_layers():
  op = lambda dev, s, e, coll, layer, stream="s0": wt.Op(dev, stream, s, e, "k", coll, layer)
  ops = [op("d0", 0, 50, False, "layer_0"), op("d0", 50, 100, True, "layer_0", "s1"),
         op("d0", 60, 90, False, "layer_1"), op("d0", 100, 120, True, "layer_1", "s1")]
  r = wt.analyze_ops(ops, [])  # no step annotations -> one step over all ops
  assert [s.step for s in r.steps] == [0]
  # exposed: [50,60] + [90,100] + [100,120]; [50,60] is a 10 µs gap between compute ops
  assert r.steps[0].mean == wt.Stats(80, 70, 40, 10)
  assert r.layers["layer_0"] == wt.Stats(50, 50, 20, 10)  # hidden by layer_1's [60,90]
  assert r.layers["layer_1"] == wt.Stats(30, 20, 20)
  assert r.streams == {"d0": ["s0", "s1"]}


def test_hlo_table_from_compiled_text():
  text = """HloModule jit_body, is_scheduled=true
ENTRY %main.0_spmd (param.3: f32[256,64]) -> f32[256,512] {
  %ynn_fusion.1 = f32[8]{0} fusion(%p), metadata={op_name="jit(body)/layer_0/dot_general"}
  ROOT %psum_invariant.15 = f32[8]{0} all-reduce(%y), metadata={op_name="jit(body)/layer_1/psum"}
  %t = (f32[2]{0}, s32[]) tuple(%a, %b)
}"""
  table = wt._hlo_table(text)["jit_body"]
  assert table["ynn_fusion.1"] == {"opcode": "fusion", "op_name": "jit(body)/layer_0/dot_general"}
  assert table["psum_invariant.15"]["opcode"] == "all-reduce"
  assert table["t"] == {"opcode": "tuple", "op_name": ""}


# ----------------------------------------------------------------------------- fixtures
def test_synthetic_gpu_fixture_exact_numbers():
  """SYNTHETIC fixture (hand-written in the real GPU layout); numbers worked out by hand."""
  r = wt.analyze(SYNTH)
  assert r.devices == ["/device:GPU:0", "/device:GPU:1"]
  assert r.streams["/device:GPU:0"] == ["Stream #13(Compute)", "Stream #14(Nccl)",
                                        "Stream #15(Compute)"]
  s0, s1 = r.steps
  # GPU:0 step 0: compute [100,200]+[250,350]; collectives NCCL [180,260], fused [300,420];
  # exposed [200,250] + [350,420].
  assert s0.per_device["/device:GPU:0"] == wt.Stats(200, 200, 120)
  assert s0.per_device["/device:GPU:0"].hidden_frac == pytest.approx(0.4)
  assert s0.per_device["/device:GPU:1"] == wt.Stats(0, 0, 0)
  assert s0.mean == wt.Stats(100, 100, 60)
  assert s1.per_device["/device:GPU:1"] == wt.Stats(100, 100, 50)
  # Layers: mean over 2 steps x 2 devices. NCCL kernels carry no scope -> "other".
  assert r.layers == {"layer_0": wt.Stats(50, 0, 0), "layer_1": wt.Stats(25, 30, 17.5),
                      "other": wt.Stats(0, 45, 25)}
  assert r.layer_source == "trace args"


def test_top_ops_synthetic_exact():
  """Per-step kernel table of the SYNTHETIC fixture (2 steps): time per step on GPU:0."""
  top = wt.analyze(SYNTH).top
  assert [(t.name[:12], t.calls, t.total_us, t.mean_us, t.collective) for t in top] == [
      ("fused_reduce", 0.5, 60.0, 120.0, True), ("gemm_fusion_", 0.5, 50.0, 100.0, False),
      ("nvjet_sm90_t", 0.5, 50.0, 100.0, False), ("ncclDevKerne", 0.5, 40.0, 80.0, True)]
  assert "top ops by time per step" in wt.format_table(wt.analyze(SYNTH))


def test_compare_kernel_by_kernel():
  """--compare: the kernels both traces ran, by per-step slow-down in the first; the rest is
  counted apart.  Two steps each; "gemm" runs twice a step in both, 10% slower in A."""
  def ops(gemm_us, extra):
    out, t = [], 0.0
    for _ in range(2):  # steps [0, 1000), [1000, 2000)
      for name, dur, coll in [("gemm", gemm_us, False), ("gemm", gemm_us, False),
                              ("attn", 50.0, False)] + extra:
        out.append(wt.Op("/device:GPU:0", "s0", t, t + dur, name, coll, "layer_0"))
        t += dur
      t = 1000.0
    return out
  windows = [(0, 0.0, 1000.0), (1, 1000.0, 2000.0)]
  a = wt.analyze_ops(ops(110.0, [("ce_reduce_add_norm_kernel", 30.0, True),
                                 ("fusion_7", 20.0, False)]), windows, "A")
  b = wt.analyze_ops(ops(100.0, [("fusion_9", 40.0, False)]), windows, "B")
  deltas = wt.compare_ops(a.ops, b.ops)
  assert [(d.name, d.calls_a, d.mean_a_us, d.mean_b_us) for d in deltas] == [
      ("gemm", 2.0, 110.0, 100.0), ("attn", 1.0, 50.0, 50.0)]
  assert deltas[0].extra_us == pytest.approx(20.0) and deltas[1].extra_us == 0.0
  text = wt.format_compare(a, b)
  assert "shared kernels' slow-down in A: 0.020 ms" in text
  assert "only A ran: 0.050 ms" in text and "only B ran: 0.040 ms" in text


def test_cli_compare_a_trace_with_itself():
  proc = _cli(GPU_REAL, "--compare", GPU_REAL)
  assert proc.returncode == 0, proc.stderr
  assert "shared kernels' slow-down in A: 0.000 ms" in proc.stdout
  only = re.search(r"only A ran: ([\d.]+) ms per step; only B ran: ([\d.]+) ms", proc.stdout)
  assert only and only[1] == only[2]  # its collectives, on both sides
  assert _cli(GPU_REAL, "--compare", "/nonexistent").returncode == 2


def test_real_gpu_fixture():
  """Real 2xH200 trace (jax 0.11.2): matmul+psum in layer_0/half_A and layer_1, 3 steps."""
  r = wt.analyze(GPU_REAL)
  assert r.devices == ["/device:GPU:0", "/device:GPU:1"]
  assert all(len(s) == 1 and s[0].startswith("Stream #") for s in r.streams.values())
  assert [s.step for s in r.steps] == [0, 1, 2]
  assert r.layer_source == "hlo sidecar"
  for s in r.steps:
    for st in s.per_device.values():  # two GEMMs + tanh, two NCCL all-reduces: all serial
      assert 0.1e3 < st.compute_us < 0.2e3 and 0.1e3 < st.collective_us < 0.3e3
      assert st.hidden_frac < 0.02
  assert set(r.layers) == {"layer_0", "layer_1"}  # sidecar attributes the NCCL kernels too
  assert all(v.collective_us > 0 for v in r.layers.values())


def test_real_gpu_fixture_without_sidecar(tmp_path):
  shutil.copy(GPU_REAL, tmp_path / "t.trace.json.gz")
  r = wt.analyze(tmp_path)
  assert r.layer_source == "trace args"
  assert r.layers["layer_0"].compute_us > 0 and r.layers["layer_1"].compute_us > 0
  assert r.layers["other"].collective_us > 0  # NCCL kernels have no scope arg on GPU


def test_gpu_trace_small_fixture():
  """Woven Llama-70B-shaped layers (2 of them, 4096 tokens, rs_ag) on 2xH200: NCCL runs on its
  own stream beside the GEMMs, so a large part of the collective time is hidden."""
  r = wt.analyze(GPU_SMALL)
  assert sum(len(s) for s in r.streams.values()) > 2, r.streams
  assert sum(s.mean.collective_us for s in r.steps) > 0
  assert any(k.startswith("layer_") for k in r.layers), r.layers
  assert all(0.5 < s.mean.hidden_frac < 0.95 for s in r.steps), [s.mean for s in r.steps]


def test_missing_trace_names_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    wt.analyze(tmp_path)
  proc = _cli(tmp_path)
  assert proc.returncode == 2 and str(tmp_path) in proc.stderr


# ----------------------------------------------------------------------------- real CPU capture
def _cli(*args) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "weave_jax.trace", *map(str, args)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def cpu_capture(tmp_path_factory):
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  n = jax.device_count()
  if n < 2:
    pytest.skip(f"needs >= 2 devices (XLA_FLAGS host device count), have {n}")
  mesh = jax.make_mesh((n,), ("tp",))

  def body(x, w0, w1):
    with jax.named_scope("layer_0"):
      y = jax.lax.psum(x @ w0, "tp")  # (B, D) partial sums -> all-reduce
    with jax.named_scope("layer_1"):
      y = jax.lax.psum(jnp.tanh(y) @ w1, "tp")
    return y

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(None, "tp"), P("tp", None), P()),
                            out_specs=P()))

  def put(shape, spec):
    return jax.device_put(jnp.ones(shape, jnp.float32), NamedSharding(mesh, spec))

  # x (B, D) and w0 (D, F) sharded on D; w1 (F, F) replicated.
  args = (put((128, 32 * n), P(None, "tp")), put((32 * n, 256), P("tp", None)),
          put((256, 256), P()))
  logdir = tmp_path_factory.mktemp("cpu_trace")
  path = wt.capture(f, *args, logdir=logdir, steps=2, warmup=1)
  return logdir, path


def test_cpu_capture_end_to_end(cpu_capture):
  logdir, path = cpu_capture
  assert path.name.endswith(".trace.json.gz") and (path.parent / wt.SIDECAR).is_file()
  r = wt.analyze(logdir)
  assert len(r.steps) >= 1 and [s.step for s in r.steps] == [0, 1]
  assert all(d.startswith("/device:CPU:") for d in r.devices) and len(r.devices) >= 2
  assert sum(s.mean.collective_us for s in r.steps) > 0
  assert sum(s.mean.compute_us for s in r.steps) > 0
  assert {"layer_0", "layer_1"} <= set(r.layers)
  assert r.layers["layer_0"].collective_us > 0 and r.layers["layer_1"].compute_us > 0


def test_cpu_xplane_matches_json(cpu_capture):
  _, path = cpu_capture
  xplanes = list(path.parent.glob("*.xplane.pb"))
  if not xplanes:
    pytest.skip("this jax wrote no .xplane.pb")
  a, b = wt.analyze(path), wt.analyze(xplanes[0])
  as_tuple = lambda r: [(s.mean.compute_us, s.mean.collective_us, s.mean.exposed_us)
                        for s in r.steps]
  assert len(a.steps) == len(b.steps)
  for x, y in zip(as_tuple(a), as_tuple(b)):
    assert x == pytest.approx(y, rel=1e-6, abs=1e-3)


def test_cli_table_and_json(cpu_capture):
  logdir, _ = cpu_capture
  proc = _cli(logdir)
  assert proc.returncode == 0, proc.stderr
  assert "per step" in proc.stdout and "layer_1" in proc.stdout and "streams" in proc.stdout
  proc = _cli(logdir, "--json")
  assert proc.returncode == 0, proc.stderr
  data = json.loads(proc.stdout)
  assert data["steps"][0]["mean"]["collective_ms"] > 0 and "layer_0" in data["layers"]


def test_capture_of_compiled_executable_attributes_layers(tmp_path):
  """The benchmark hands capture() a compiled executable (no .lower): its HLO must still be
  read, so that ops land in their layers rather than in 'other'."""
  import numpy as np
  from weave_jax import Engine, RunConfig, init_random, make_mesh, preset

  cfg = preset("tiny")
  mesh = make_mesh(2)
  eng = Engine(init_random(cfg, mesh), mesh, RunConfig(backend="psum"))
  _, exe, args = eng.prepare(np.arange(16) % cfg.vocab_size)
  report = wt.analyze(wt.capture(exe, *args, logdir=tmp_path, steps=1, warmup=1))
  assert report.layer_source == "hlo sidecar"
  assert {"layer_0", "layer_1"} <= set(report.layers), report.layers


def test_device_span_of_a_cpu_call(tmp_path):
  """The span from a traced call's first device op to its last: positive, and, within one
  trace, no longer than the call's host window (the capture blocks on each call)."""
  import jax
  import jax.numpy as jnp

  f = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x)
  x = jnp.ones((256, 256), jnp.float32)
  span = wt.device_span_ms(f, x, steps=2)
  assert span is not None and span > 0
  path = wt.capture(f, x, logdir=tmp_path, steps=2, hlo_table=False)
  assert not (path.parent / wt.SIDECAR).exists()
  events = wt.load_events(path)
  windows = wt.step_windows(events)
  for (_, t0, t1), (_, mine) in zip(windows, wt.step_ops(wt.device_ops(events), windows)):
    assert mine
    assert 0 < max(o.end for o in mine) - min(o.start for o in mine) <= t1 - t0


def test_step_ops_assign_by_start():
  op = lambda start, end: wt.Op("/device:GPU:0", "s", start, end, "k", False, wt.OTHER)
  ops = [op(0, 5), op(9, 12), op(10, 11), op(25, 30)]
  got = wt.step_ops(ops, [(0, 0, 10), (1, 10, 20)])
  assert [(step, [(o.start, o.end) for o in mine]) for step, mine in got] == [
      (0, [(0, 5), (9, 12)]), (1, [(10, 11)])]

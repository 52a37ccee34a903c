"""Split selection (wave-aware + tuned table) and the compiled-order reader."""
import gzip
import json
import os

import numpy as np
import pytest

from weave_jax import Engine, RunConfig, hlo_order, init_random, make_mesh, preset
from weave_jax import split as split_mod
from weave_jax import tuned

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [256, 1000, 4096, 12345])
def test_wave_aware_split_is_aligned_and_near_middle(tp, n):
  cfg = preset("llama-3.3-70b")
  s = split_mod.wave_aware_split(n, cfg, tp, sms=132)
  assert s % tp == 0 and s % 64 == 0
  assert abs(s - n / 2) <= n / 4


def test_wave_aware_split_avoids_partial_waves():
  # With 132 SMs and the 70B GEMMs at TP=2, some offsets waste a partial wave; the chosen one
  # must cost no more than the plain middle split.
  cfg, sms, n = preset("llama-3.3-70b"), 132, 8192
  gemms = split_mod.layer_gemms(cfg, 2)
  s = split_mod.wave_aware_split(n, cfg, 2, sms)
  cost = lambda off: split_mod.wave_cost(off, gemms, sms) + split_mod.wave_cost(n - off, gemms, sms)
  assert cost(s) <= cost(n // 2)


def test_tuned_table_overrides_heuristic(tmp_path):
  cfg = preset("llama-3.3-70b")
  d = str(tmp_path)
  key = split_mod.model_key(cfg, 2, "rs_ag")
  tuned.save_model_entry("H200", key, {"splits": {"4096": 0.375}, "min_tokens": 2048}, d)
  assert split_mod.choose_split(4096, cfg, 2, "H200", 132, "rs_ag", d) == 1536
  assert split_mod.weave_threshold("H200", cfg, 2, "rs_ag", d) == 2048
  # Another backend or device is not affected: the fallback model's dense threshold.
  with pytest.warns(RuntimeWarning, match="no tuned entry for 'H200' at TP=2"):
    assert split_mod.weave_threshold("H200", cfg, 2, "psum", d) == 1024
  assert split_mod.choose_split(4096, cfg, 2, "H100", 132, "rs_ag", d) != 1536
  # null: woven was never faster where measured -> never weave
  tuned.save_model_entry("H200", split_mod.model_key(cfg, 2, "fused_p2p"), {"min_tokens": None},
                          d)
  assert split_mod.weave_threshold("H200", cfg, 2, "fused_p2p", d) > 10**9


def test_engine_takes_the_tuned_per_bucket_choice(tmp_path, monkeypatch):
  """A measured bucket's verdict wins over the threshold; unmeasured buckets use the threshold."""
  cfg = preset("tiny")
  mesh = make_mesh(4)
  model = init_random(cfg, mesh)
  monkeypatch.setattr(tuned, "DIR", str(tmp_path))
  eng = Engine(model, mesh, RunConfig(backend="rs_ag", weave=True))
  key = split_mod.model_key(cfg, 4, "rs_ag")
  tuned.save_model_entry(eng.device_kind, key, {"min_tokens": 64,
                                                 "weave": {"128": False, "512": True}})
  assert eng.plan(128).split is None         # measured: unsplit was faster
  assert eng.plan(512).split is not None     # measured: woven was faster
  assert eng.plan(256).split is not None     # not measured: threshold 64 applies
  assert eng.plan(32).split is None          # not measured, below the threshold
  # an explicit threshold overrides the table
  forced = Engine(model, mesh, RunConfig(backend="rs_ag", weave=True, weave_min_tokens=16))
  assert forced.plan(128).split is not None


def test_engine_plan_threshold_and_padding():
  cfg = preset("tiny")
  mesh = make_mesh(4)
  model = init_random(cfg, mesh)
  eng = Engine(model, mesh, RunConfig(backend="rs_ag", weave=True, weave_min_tokens=64))
  assert eng.plan(63).split is None and eng.plan(63).padded == 64
  p = eng.plan(101)
  assert p.split is not None and p.split % 4 == 0 and (p.padded - p.split) % 4 == 0
  assert p.padded >= 101
  with pytest.raises(ValueError, match="split"):
    Engine(model, mesh, RunConfig(weave=True, weave_min_tokens=8, split=6)).plan(40)


def test_engine_at_tp1_weaves_only_when_told():
  """One device has no collective for the other half to hide: the default plan never splits;
  an explicit threshold still does (tests and comparisons)."""
  model = init_random(preset("tiny"), make_mesh(1))
  eng = Engine(model, make_mesh(1), RunConfig(backend="psum", weave=True))
  assert eng.plan(1 << 16).split is None
  forced = Engine(model, make_mesh(1), RunConfig(backend="psum", weave=True, weave_min_tokens=8))
  assert forced.plan(64).split is not None


def _fixture(name):
  with gzip.open(os.path.join(FIXTURES, name), "rt") as f:
    return f.read()


def test_hlo_order_on_real_gpu_schedule():
  """Compiled on 2xH200 (JAX 0.11.2), Llama-70B shapes, 2 layers, 4096 tokens: the woven
  program schedules GEMMs/attention between collective starts and dones; the baseline none."""
  woven = hlo_order.collective_windows(_fixture("gpu_h200x2_rs_ag_weave_4096.hlo.txt.gz"))
  base = hlo_order.collective_windows(_fixture("gpu_h200x2_baseline_4096.hlo.txt.gz"))
  assert {w.kind for w in woven} == {"reduce-scatter", "all-gather"}
  assert sum(w.compute_between > 0 for w in woven) >= 4
  assert all(w.compute_between == 0 for w in base) and len(base) == 5


def test_hlo_order_parser_on_synthetic_text():
  text = """HloModule m
ENTRY %main {
  %p = bf16[8,8]{1,0} parameter(0)
  %ars = ((bf16[8,8]{1,0}), bf16[8,8]{1,0}) all-reduce-start(%p), to_apply=%add
  %g = (bf16[8,8]{1,0}, s8[4]{0}) custom-call(%p, %p), custom_call_target="__cublas$lt$matmul"
  %ard = bf16[8,8]{1,0} all-reduce-done(%ars)
  %f = bf16[8,8]{1,0} fusion(%ard, %p), kind=kLoop, calls=%c
  %ar2 = bf16[8,8]{1,0} all-reduce(%f), to_apply=%add
  ROOT %t = (bf16[8,8]{1,0}) tuple(%ar2)
}
"""
  ws = hlo_order.collective_windows(text)
  assert [(w.kind, w.name, w.compute_between) for w in ws] == [
      ("all-reduce", "ars", 1), ("all-reduce", "ar2", 0)]


def test_copies_of_custom_call_outputs():
  """The check the GPU start/done test relies on: a copy of start's outputs is found through
  get-tuple-element / opt-barrier / tuple, and nothing else is reported."""
  hlo = """
ENTRY %main {
  %p0 = bf16[8,16]{1,0} parameter(0)
  %s = (u32[1]{0}, bf16[8,16]{1,0}, bf16[4,16]{1,0}) custom-call(%p0), custom_call_target="weave_fused_start"
  %n = bf16[8,16]{1,0} get-tuple-element(%s), index=1
  %t = (bf16[8,16]{1,0}, bf16[8,16]{1,0}) tuple(%n, %p0)
  %b = (bf16[8,16]{1,0}, bf16[8,16]{1,0}) opt-barrier(%t)
  %n2 = bf16[8,16]{1,0} get-tuple-element(%b), index=0
  %other = bf16[8,16]{1,0} copy(%p0)
  %bad = bf16[8,16]{1,0} copy(%n2)
  ROOT %d = (bf16[8,16]{1,0}, bf16[4,16]{1,0}) custom-call(%s, %bad), custom_call_target="weave_fused_done"
}
"""
  assert hlo_order.copies_of_outputs(hlo, "weave_fused_start") == ["bad"]
  assert hlo_order.copies_of_outputs(hlo.replace("copy(%n2)", "copy(%p0)"), "weave_fused_start") == []
  assert hlo_order.copies_of_outputs(hlo, "no_such_target") == []


def test_engine_takes_the_tuned_backend_per_size(tmp_path, monkeypatch):
  """Buckets where the table measured another backend faster run on it (unsplit plans only);
  other buckets, and RunConfig(backend_by_size=False), keep the configured backend."""
  cfg = preset("tiny")
  mesh = make_mesh(4)
  model = init_random(cfg, mesh)
  monkeypatch.setattr(tuned, "DIR", str(tmp_path))
  eng = Engine(model, mesh, RunConfig(backend="rs_ag", logits="last"))
  key = split_mod.model_key(cfg, 4, "rs_ag")
  tuned.save_model_entry(eng.device_kind, key,
                          {"backend_by_bucket": {"16": "psum", "64": "rs_ag"}})
  assert split_mod.tuned_backend(eng.device_kind, cfg, 4, "rs_ag", 13) == "psum"
  assert split_mod.tuned_backend(eng.device_kind, cfg, 4, "rs_ag", 64) is None  # itself
  assert eng.plan(13).backend == "psum" and eng.plan(16).backend == "psum"
  assert eng.plan(64).backend == "rs_ag" and eng.plan(200).backend == "rs_ag"
  assert eng.backend_of(eng.plan(13)).name == "psum"
  tokens = np.arange(13) % cfg.vocab_size
  ref = Engine(model, mesh, RunConfig(backend="psum", logits="last"))(tokens)
  np.testing.assert_allclose(np.asarray(eng(tokens)), np.asarray(ref), rtol=0, atol=0)
  pinned = Engine(model, mesh, RunConfig(backend="rs_ag", backend_by_size=False))
  assert pinned.plan(13).backend == "rs_ag"
  woven = Engine(model, mesh, RunConfig(backend="rs_ag", weave=True, weave_min_tokens=8))
  assert woven.plan(16).split is not None and woven.plan(16).backend == "rs_ag"


def test_shipped_tuning_tables_are_consistent():
  """Every model entry of the shipped tables (weave_jax/tuning/*.json): its measurements exist
  in the repo, buckets are powers of two, a measured 'weave' map agrees with its 'min_tokens'
  (woven from there on), and 'backend_by_bucket' names backends that exist."""
  from weave_jax.comm import BACKENDS

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  table = tuned.load("NVIDIA H200")["models"]
  assert any("|tp4|" in key for key in table)  # the TP=4 entries measured on 4 x H200
  for name in os.listdir(tuned.DIR):
    if name.endswith(".json"):
      with open(os.path.join(tuned.DIR, name)) as f:
        kind = json.load(f)["device_kind"]
      assert tuned.file_name(kind) == name
      tuned.load(kind)  # validates the format
  for key, entry in table.items():
    assert os.path.exists(os.path.join(root, entry["source"])), (key, entry["source"])
    for field in ("weave", "splits", "backend_by_bucket"):
      for bucket in entry.get(field, {}):
        assert int(bucket) > 0 and int(bucket) & (int(bucket) - 1) == 0, (key, field, bucket)
    weave = {int(b): v for b, v in entry.get("weave", {}).items()}
    if weave:
      woven = sorted(b for b, v in weave.items() if v)
      assert entry["min_tokens"] == (woven[0] if woven else None), key
      assert all(weave[b] for b in weave if b >= woven[0]), (key, "unsplit above the threshold")
    for backend in entry.get("backend_by_bucket", {}).values():
      assert backend in BACKENDS, (key, backend)


def test_tuned_weave_dropped_where_woven_calls_miss_the_copy_engines(tmp_path, monkeypatch):
  """The table's woven verdicts were measured with woven calls on the copy engines; on a
  workspace without them (one process per GPU, or copy_engine=False) those calls would run the
  two-shot kernel, which measured slower than unsplit: the tuned plan runs unsplit and warns
  once.  An explicit threshold or weave_algorithm still weaves.  The plan reads only the
  workspace passed in (no process state)."""
  from weave_jax import FusedOptions, Workspace

  cfg = preset("tiny", dtype="bfloat16")
  mesh = make_mesh(4)
  model = init_random(cfg, mesh)
  monkeypatch.setattr(tuned, "DIR", str(tmp_path))
  key = split_mod.model_key(cfg, 4, "fused_p2p")
  tuned.save_model_entry(mesh.devices.flat[0].device_kind, key,
                         {"min_tokens": 64, "weave": {"512": True}})

  def engine(copy_engine, **run):
    ws = Workspace(mesh, max_tokens=1024, hidden=cfg.hidden_size, dtype=cfg.dtype,
                   copy_engine=copy_engine)
    return Engine(model, mesh, RunConfig(backend="fused_p2p", weave=True, **run), workspace=ws)

  eng = engine(True)
  assert eng.plan(512).split is not None and eng.plan(256).split is not None
  eng = engine(False)
  with pytest.warns(RuntimeWarning, match="without the copy engines") as record:
    assert eng.plan(512).split is None and eng.plan(256).split is None
  assert len(record) == 1
  assert engine(False, weave_min_tokens=16).plan(512).split is not None
  on_ce = engine(True, options=FusedOptions(weave_algorithm="copy_engine"))
  assert on_ce.plan(512).split is not None

"""Per-device tuning tables (weave_jax/tuning/*.json, read by weave_jax.tuned): lookup order,
the fallback model with one warning, format checks, and an H100 entry's format."""
import json
import warnings

import pytest

from weave_jax import tuned


def _write(tmp_path, table):
  path = tmp_path / tuned.file_name(table["device_kind"])
  path.write_text(json.dumps(table))
  return str(tmp_path)


H100 = "NVIDIA H100 80GB HBM3"


def test_h100_entry_is_accepted_and_overrides_by_tp_and_bucket(tmp_path):
  d = _write(tmp_path, {
      "device_kind": H100,
      "kernel": {"2": {"ctas": 64, "weave_ctas": 16, "ce_ctas": 132,
                       "weave_min_tokens": {"dense": 2048, "moe": 4096},
                       "buckets": {"1024": {"ctas": 32}},
                       "note": "one H100, 2026-12-07"}}})
  assert tuned.file_name(H100) == "NVIDIA_H100_80GB_HBM3.json"
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # an entry: no warning
    p = tuned.kernel_params(H100, 2, 4096, directory=d)
    small = tuned.kernel_params(H100, 2, 1000, directory=d)   # bucket 1024
  assert (p.ctas, p.weave_ctas, p.weave_min_tokens_dense, p.weave_min_tokens_moe) == (
      64, 16, 2048, 4096)
  assert small.ctas == 32 and small.weave_ctas == 16
  # fields the entry leaves out come from the fallback model
  assert p.one_shot_max_bytes == tuned.FALLBACK["one_shot_max_bytes"]


def test_missing_device_falls_back_with_one_warning(tmp_path):
  kind = "Imaginary GPU 7"
  tuned._warned.discard((kind, 2))
  with pytest.warns(RuntimeWarning, match="no tuned entry for 'Imaginary GPU 7' at TP=2") as rec:
    p = tuned.kernel_params(kind, 2, 4096, sms=78, directory=str(tmp_path))
  assert len(rec) == 1
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the second lookup is silent
    again = tuned.kernel_params(kind, 2, 64, sms=78, directory=str(tmp_path))
  assert p == again
  assert p.ce_ctas == 78          # the model: one copy-engine reduce block per SM
  assert (p.ctas, p.weave_ctas) == (tuned.FALLBACK["ctas"], tuned.FALLBACK["weave_ctas"])


def test_shipped_h200_table_holds_the_measured_numbers():
  h200 = tuned.kernel_params("NVIDIA H200", 2, 4096)
  assert (h200.ctas, h200.weave_ctas, h200.ce_ctas) == (128, 32, 132)
  assert h200.weave_min_tokens_dense == 1024 and h200.weave_min_tokens_moe == 2048
  assert tuned.load(H100) == {}  # measured entries only: none for H100 yet


@pytest.mark.parametrize("table, msg", [
    ({"device_kind": "X", "kernel": {"two": {}}}, "must be a TP size"),
    ({"device_kind": "X", "kernel": {"2": {"cta": 8}}}, "unknown field 'cta'"),
    ({"device_kind": "X", "kernel": {"2": {"ctas": 0}}}, "ctas=0 must be a positive int"),
    ({"device_kind": "X", "kernel": {"2": {"ctas": "8"}}}, "must be a positive int"),
    ({"device_kind": "X", "kernel": {"2": {"buckets": {"1000": {}}}}}, "not a power of two"),
    ({"device_kind": "X", "kernel": {"2": {"weave_min_tokens": {"big": 1}}}}, "'dense' / 'moe'"),
    ({"device_kind": "X", "splits": {}}, "unknown keys"),
])
def test_malformed_tables_raise(tmp_path, table, msg):
  d = _write(tmp_path, table)
  with pytest.raises(ValueError, match=msg):
    tuned.kernel_params("X", 2, 64, directory=d)


def test_a_table_must_name_its_device(tmp_path):
  (tmp_path / tuned.file_name("A")).write_text(json.dumps({"device_kind": "B"}))
  with pytest.raises(ValueError, match="device_kind 'B' != 'A'"):
    tuned.load("A", str(tmp_path))


def test_model_entries_round_trip(tmp_path):
  d = str(tmp_path)
  path = tuned.save_model_entry(H100, "H64|tp2|rs_ag", {"min_tokens": 512}, d)
  assert path.endswith("NVIDIA_H100_80GB_HBM3.json")
  assert tuned.model_entry(H100, "H64|tp2|rs_ag", d) == {"min_tokens": 512}
  tuned.save_model_entry(H100, "H64|tp4|rs_ag", {"min_tokens": None}, d)
  assert set(tuned.load(H100, d)["models"]) == {"H64|tp2|rs_ag", "H64|tp4|rs_ag"}
  assert tuned.bucket(1) == 1 and tuned.bucket(1000) == 1024 and tuned.bucket(1024) == 1024

"""The explicit Workspace object: validation, TP groups of a multi-axis mesh, independence of
two workspaces, and device ownership.  CPU only: nothing is allocated (``open`` refuses CPU
devices before it loads the library)."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from weave_jax import Engine, RunConfig, Workspace, init_random, make_mesh, preset
from weave_jax.fused import workspace as ws_lib


def _ws(devices=None, **kw):
  return Workspace(jax.devices()[:2] if devices is None else devices,
                   **dict(dict(max_tokens=64, hidden=1024), **kw))


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(max_tokens=0), ValueError, "max_tokens=0 outside 1"),
    (dict(max_tokens=1.5), TypeError, "max_tokens must be an integer"),
    (dict(max_tokens=True), TypeError, "max_tokens must be an integer"),
    (dict(hidden=1020), ValueError, "hidden=1020 must be a multiple of 8"),
    (dict(hidden=32768), ValueError, "hidden=32768 outside 8..16384"),
    (dict(dtype=jnp.float32), ValueError, "dtype=float32 must be bfloat16 or float16"),
    (dict(dtype="no-such-dtype"), TypeError, "is not a dtype"),
    (dict(num_slots=0), ValueError, "num_slots=0 outside 1..4"),
    (dict(num_slots=5), ValueError, "num_slots=5 outside 1..4"),
    (dict(transport="nvls"), ValueError, "transport='nvls'"),
    (dict(timeout_ms=0), ValueError, "timeout_ms=0.0 must be > 0"),
    (dict(timeout_ms="soon"), ValueError, "timeout_ms='soon' is not a number"),
    (dict(axis_name=""), TypeError, "axis_name must be a non-empty str"),
    (dict(copy_engine="yes"), TypeError, "copy_engine must be a bool or None"),
    (dict(transport="multimem", copy_engine=True), ValueError, "copy_engine=True needs"),
])
def test_bad_arguments_raise_naming_them(kw, exc, msg):
  with pytest.raises(exc, match=msg):
    _ws(**kw)


def test_bad_device_sets():
  with pytest.raises(ValueError, match="world size 1 outside 2..8"):
    _ws(jax.devices()[:1])
  with pytest.raises(ValueError, match="devices repeat"):
    _ws([jax.devices()[0]] * 2)
  with pytest.raises(TypeError, match="must be a Mesh or a sequence of devices"):
    _ws("gpu")
  mesh = jax.make_mesh((2, 4), ("data", "tensor"), devices=jax.devices())
  with pytest.raises(ValueError, match="axis_name='tp' is not an axis of the mesh"):
    Workspace(mesh, max_tokens=64, hidden=1024)


def test_groups_of_a_data_by_tensor_mesh():
  """A (2, 4) mesh with axes ("data", "tensor"): two TP groups of 4, in rank order along
  "tensor"; several groups cannot share the process's one copy-engine rendezvous."""
  devs = np.array(jax.devices()).reshape(2, 4)
  mesh = jax.sharding.Mesh(devs, ("data", "tensor"))
  ws = Workspace(mesh, max_tokens=64, hidden=1024, axis_name="tensor")
  assert ws.groups == (tuple(devs[0]), tuple(devs[1]))
  assert (ws.world, ws.mode, ws.copy_engine) == (4, "local", False)
  with pytest.raises(ValueError, match="copy_engine=True needs one process driving the only"):
    Workspace(mesh, max_tokens=64, hidden=1024, axis_name="tensor", copy_engine=True)
  by_data = Workspace(mesh, max_tokens=64, hidden=1024, axis_name="data")
  assert by_data.groups == tuple(tuple(devs[:, j]) for j in range(4)) and by_data.world == 2


def test_two_workspaces_are_independent():
  a = _ws(max_tokens=64, hidden=1024, dtype=jnp.bfloat16, num_slots=2)
  b = _ws(jax.devices()[2:4], max_tokens=4096, hidden=8192, dtype=jnp.float16, num_slots=4,
          copy_engine=False)
  assert (a.max_tokens, a.hidden, a.dtype, a.num_slots, a.copy_engine) == (
      64, 1024, np.dtype(jnp.bfloat16), 2, True)
  assert (b.max_tokens, b.hidden, b.dtype, b.num_slots, b.copy_engine) == (
      4096, 8192, np.dtype(jnp.float16), 4, False)
  assert a.one_shot_rows() == 64 and b.one_shot_rows() == 64   # min(max_tokens, 1 MiB / row)
  assert a.covers(tokens=64, hidden=1024, dtype=jnp.bfloat16)
  assert not a.covers(tokens=65, hidden=1024, dtype=jnp.bfloat16)
  assert not a.covers(tokens=8, hidden=1024, dtype=jnp.float16)
  assert not (a.is_open or b.is_open) and a != b and hash(a) != hash(b)
  assert "closed" in repr(a) and "TP2" in repr(a)


def test_open_refuses_cpu_devices_before_loading_the_library(monkeypatch):
  from weave_jax.fused import _lib
  monkeypatch.setattr(_lib, "load", lambda: pytest.fail("library loaded"))
  ws = _ws()
  with pytest.raises(ValueError, match="every device must be a CUDA GPU"):
    ws.open()
  assert not ws.is_open and not ws_lib._DEVICE_OWNER
  ws.close()  # closing an unopened workspace is a no-op
  with pytest.raises(RuntimeError, match="op: the workspace is not open"):
    ws.require_open("op")
  assert ws.timeout_error() is None  # nothing to read on an unopened workspace


class _FakeDevice:
  """What Workspace reads of a jax device, for an ownership test without GPUs."""

  def __init__(self, i):
    self.id = self.local_hardware_id = i
    self.process_index, self.platform, self.device_kind, self.core_count = 0, "gpu", "GPU", 132

  def __repr__(self):
    return f"gpu:{self.local_hardware_id}"


class _FakeLib:
  def __init__(self):
    self.calls = []

  def __getattr__(self, name):
    def call(*args):
      self.calls.append(name)
      return 0
    return call


@pytest.fixture
def fake_lib(monkeypatch):
  """A library that accepts every call and records its name, with no workspace open yet."""
  from weave_jax.fused import _lib
  lib = _FakeLib()
  monkeypatch.setattr(_lib, "load", lambda: lib)
  monkeypatch.setattr(_lib, "available", lambda: True)
  monkeypatch.setattr(ws_lib, "_DEVICE_OWNER", {})
  monkeypatch.setattr(ws_lib, "_RENDEZVOUS_OWNER", [])
  return lib


def test_device_ownership_and_the_copy_engine_rendezvous(fake_lib):
  """A device belongs to one open workspace; one open workspace may use the copy engines; the
  device memory is freed when the last one closes."""
  lib = fake_lib
  gpus = [_FakeDevice(i) for i in range(6)]
  a = _ws(gpus[0:2]).open()
  assert a.is_open and a.peer_ok and lib.calls.count("weave_ws_init_local") == 1
  with pytest.raises(ValueError, match="CUDA device 1 belongs to another open workspace"):
    _ws(gpus[1:3]).open()
  with pytest.raises(ValueError, match="another open workspace uses the copy engines"):
    _ws(gpus[2:4]).open()
  b = _ws(gpus[2:4], copy_engine=False).open()
  a.close()
  assert "weave_ws_free_all" not in lib.calls   # b still holds its devices
  c = _ws(gpus[4:6]).open()                     # the rendezvous is free again
  b.close()
  c.close()
  assert lib.calls.count("weave_ws_free_all") == 1 and not ws_lib._DEVICE_OWNER


def test_two_engines_with_their_own_workspaces_coexist():
  """Two engines in one process with different configurations and explicit Workspace objects
  (XLA backends run here; fused ones are checked against their workspace at construction)."""
  cfg = preset("tiny", num_layers=1, dtype="bfloat16")
  mesh = make_mesh(2)
  model = init_random(cfg, mesh)
  ws_a = Workspace(mesh, max_tokens=128, hidden=cfg.hidden_size, dtype=cfg.dtype)
  ws_b = Workspace(mesh, max_tokens=256, hidden=cfg.hidden_size, dtype=cfg.dtype,
                   copy_engine=False)
  fused_a = Engine(model, mesh, RunConfig(backend="fused_p2p"), workspace=ws_a)
  fused_b = Engine(model, mesh, RunConfig(backend="fused_p2p", weave=True), workspace=ws_b)
  assert fused_a.workspace is ws_a and fused_b.workspace is ws_b
  assert fused_a.backend.workspace is ws_a and fused_b.backend.workspace is ws_b
  with pytest.raises(ValueError, match="takes no workspace"):
    Engine(model, mesh, RunConfig(backend="psum"), workspace=ws_a)
  with pytest.raises(ValueError, match="TP groups"):
    Engine(model, make_mesh(4), RunConfig(backend="fused_p2p"), workspace=ws_a)
  small = Workspace(mesh, max_tokens=8, hidden=8, dtype=cfg.dtype)
  with pytest.raises(ValueError, match="does not fit the model"):
    Engine(model, mesh, RunConfig(backend="fused_p2p"), workspace=small)
  with pytest.raises(TypeError, match="workspace must be a weave_jax.fused.Workspace"):
    Engine(model, mesh, RunConfig(backend="fused_p2p"), workspace="ws")
  psum = Engine(model, mesh, RunConfig(backend="psum"))
  rs_ag = Engine(model, mesh, RunConfig(backend="rs_ag", weave=True, weave_min_tokens=8))
  tokens = np.arange(24) % cfg.vocab_size
  a, b = np.asarray(psum(tokens), np.float32), np.asarray(rs_ag(tokens), np.float32)
  assert np.linalg.norm(a - b) / np.linalg.norm(a) < 2e-2  # bf16 reductions in another order
  assert psum.workspace is None and rs_ag.workspace is None


def test_engines_without_a_workspace_share_one_that_grows(monkeypatch):
  monkeypatch.setattr(ws_lib, "_SHARED", {})
  cfg = preset("tiny", num_layers=1, dtype="bfloat16")
  mesh = make_mesh(2)
  model = init_random(cfg, mesh)
  a = Engine(model, mesh, RunConfig(backend="fused_p2p"))
  b = Engine(model, mesh, RunConfig(backend="fused_p2p", weave=True))
  assert a.workspace is b.workspace and not a.workspace.is_open
  a.workspace.grow(max_tokens=40000)
  assert b.workspace.max_tokens == 40000 and b.workspace.hidden == cfg.hidden_size
  with pytest.raises(ValueError, match="needs its own Workspace"):
    Engine(init_random(preset("tiny", num_layers=1, dtype="float16"), mesh), mesh,
           RunConfig(backend="fused_p2p"))
  with pytest.raises(ValueError, match="hidden=12 must be a multiple of 8"):
    a.workspace.grow(hidden=12)


def test_grow_reallocates_an_open_workspace(fake_lib):
  lib = fake_lib
  ws = _ws([_FakeDevice(0), _FakeDevice(1)]).open()
  ws.grow(max_tokens=32)              # already covered: nothing happens
  assert lib.calls.count("weave_ws_init_local") == 1
  ws.grow(max_tokens=4096)
  assert ws.is_open and ws.max_tokens == 4096 and lib.calls.count("weave_ws_init_local") == 2
  assert lib.calls.count("weave_ws_free_all") == 1
  ws.close()

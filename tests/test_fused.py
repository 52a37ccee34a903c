"""CPU tests of the fused binding: validation before launch, library-missing error, backend
options, the rs_ag fallback warning and the compute_on shim.  No GPU needed."""
from __future__ import annotations

import itertools
import threading
import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from weave_jax.comm import get_backend
from weave_jax.comm.base import AXIS
from weave_jax.fused import _lib, ops, workspace as ws_lib


def _fake_ws(**kw):
  base = dict(ordinals=(0, 1), ranks=(0, 1), world=2, max_tokens=128, hidden=1024,
              dtype=np.dtype(jnp.bfloat16), num_slots=2, mode="local", transport="peer",
              peer_ok=True)
  return ws_lib.Workspace(**dict(base, **kw))


@pytest.fixture
def fake_ws(monkeypatch):
  monkeypatch.setattr(ws_lib, "_WORKSPACE", _fake_ws())
  monkeypatch.setattr(_lib, "register_targets", lambda: pytest.fail("reached launch"))
  return ws_lib._WORKSPACE


def _args(tokens=64, hidden=1024, dtype=jnp.bfloat16, res_dtype=None, w_dtype=None, shard=None):
  shard = -(-tokens // 2) if shard is None else shard
  return (jnp.zeros((tokens, hidden), dtype), jnp.zeros((shard, hidden), res_dtype or dtype),
          jnp.zeros((hidden,), w_dtype or dtype))


@pytest.mark.parametrize("args, kw, exc, msg", [
    (_args(tokens=129), {}, ValueError, r"fused_reduce_add_norm: tokens=129 outside 1\.\.workspace max_tokens=128"),
    (_args(hidden=1020), {}, ValueError, r"fused_reduce_add_norm: hidden=1020 is not a multiple of 8"),
    (_args(hidden=2048), {}, ValueError, r"fused_reduce_add_norm: hidden=2048 exceeds workspace hidden=1024"),
    (_args(dtype=jnp.float16), {}, TypeError, r"fused_reduce_add_norm: partial dtype float16"),
    (_args(res_dtype=jnp.float16), {}, TypeError, r"fused_reduce_add_norm: dtype mismatch"),
    (_args(w_dtype=jnp.float32), {}, TypeError, r"fused_reduce_add_norm: dtype mismatch"),
    (_args(shard=31), {}, ValueError, r"fused_reduce_add_norm: residual shape \(31, 1024\)"),
    (_args(), {"ctas": 1}, ValueError, r"fused_reduce_add_norm: ctas=1 outside 2\.\.128"),
    (_args(), {"ctas": 129}, ValueError, r"fused_reduce_add_norm: ctas=129 outside 2\.\.128"),
    (_args(), {"transport": "multimem"}, ValueError, r"transport='multimem' but the workspace"),
    (_args(), {"algorithm": "ring"}, ValueError, r"algorithm='ring' must be 'auto' or one of"),
    (_args(), {"algorithm": "copy_engine", "ce_ctas": 1}, ValueError, r"ce_ctas=1 outside 2\.\.1024"),
    (_args(), {"algorithm": "copy_engine", "ce_chunks": 0}, ValueError,
     r"ce_chunks=0 must be 'auto' or an integer in 1\.\.32"),
    (_args(), {"algorithm": "copy_engine", "ce_chunks": 33}, ValueError, r"ce_chunks=33 must be"),
    (_args(), {"ce_chunks": "many"}, ValueError, r"ce_chunks='many' must be"),
    (_args(), {"algorithm": "copy_engine", "cmd_buffer": True}, ValueError,
     r"cmd_buffer=True cannot run algorithm='copy_engine'"),
    (_args(), {"algorithm": "copy_engine_direct", "cmd_buffer": True}, ValueError,
     r"cmd_buffer=True cannot run algorithm='copy_engine_direct'"),
    (_args(), {"algorithm": "copy_engine_lsu", "ce_ctas": 2000}, ValueError,
     r"ce_ctas=2000 outside 2\.\.1024"),
    (_args(), {"algorithm": "copy_engine_tma", "ce_ctas": 1}, ValueError,
     r"ce_ctas=1 outside 2\.\.1024"),
    (_args(), {"algorithm": "copy_engine_tma", "cmd_buffer": True}, ValueError,
     r"cmd_buffer=True cannot run algorithm='copy_engine_tma'"),
])
def test_bad_inputs_raise_before_launch(fake_ws, args, kw, exc, msg):
  with pytest.raises(exc, match=msg):
    ops.fused_reduce_add_norm(*args, eps=1e-6, **kw)


def test_one_shot_capacity_and_auto_choice(monkeypatch):
  ws = _fake_ws(max_tokens=4096, hidden=8192)
  monkeypatch.setattr(ws_lib, "_WORKSPACE", ws)
  monkeypatch.setattr(_lib, "register_targets", lambda: pytest.fail("reached launch"))
  assert ops.one_shot_rows(ws) == 64  # 1 MiB / (8192 * 2 B)
  with pytest.raises(ValueError, match=r"one_shot' needs tokens <= 64 .*got 65"):
    ops.fused_reduce_add_norm(*_args(tokens=65, hidden=8192), eps=1e-6, algorithm="one_shot")
  choose = lambda t: ops.choose_algorithm(t, 8192, 2, ws)
  small = ops.AUTO_ONE_SHOT_MAX_BYTES // (8192 * 2)
  assert choose(1) == choose(small) == "one_shot"
  assert choose(small + 1) == choose(4096) == "two_shot"
  # woven calls go to the copy engines from AUTO_WOVEN_COPY_ENGINE_MIN_BYTES (one process only)
  ce_min = ops.AUTO_WOVEN_COPY_ENGINE_MIN_BYTES // (8192 * 2)
  woven = lambda t, w=ws: ops.choose_algorithm(t, 8192, 2, w, woven=True)
  assert woven(1) == "one_shot" and woven(ce_min - 1) == "two_shot"
  assert woven(ce_min) == woven(4096) == "copy_engine"
  assert woven(4096, _fake_ws(max_tokens=4096, hidden=8192, mode="ipc")) == "two_shot"
  # unsplit calls keep the kernel at any size and TP (the copy engines were slower in the model)
  tp4 = _fake_ws(ordinals=(0, 1, 2, 3), ranks=(0, 1, 2, 3), world=4, max_tokens=32768,
                 hidden=8192)
  assert ops.choose_algorithm(32768, 8192, 2, ws) == ops.choose_algorithm(32768, 8192, 2, tp4) \
      == "two_shot"
  for ce_ctas, msg in ((1, r"ce_ctas=1 outside 2\.\.1024"), (2000, "ce_ctas=2000 outside")):
    with pytest.raises(ValueError, match=msg):
      ops.fused_reduce_add_norm(*_args(tokens=64, hidden=8192), eps=1e-6,
                                algorithm="copy_engine", ce_ctas=ce_ctas)
  assert ops.choose_algorithm(1, 8192, 2, ws, transport="multimem") == "two_shot"
  mm = _fake_ws(max_tokens=4096, hidden=8192, transport="multimem")
  monkeypatch.setattr(ws_lib, "_WORKSPACE", mm)
  with pytest.raises(ValueError, match="multimem transport runs only algorithm='two_shot'"):
    ops.fused_reduce_add_norm(*_args(tokens=64, hidden=8192), eps=1e-6, transport="multimem",
                              algorithm="copy_engine")
  monkeypatch.setattr(ws_lib, "_WORKSPACE", _fake_ws(max_tokens=4096, hidden=8192, mode="ipc"))
  with pytest.raises(ValueError, match="copy_engine' needs one process driving every GPU"):
    ops.fused_start(*_args(tokens=64, hidden=8192), eps=1e-6, algorithm="copy_engine")


def test_copy_engine_chunks_auto():
  # 2 chunks from CE_TWO_CHUNKS_MIN_SLICE_BYTES of a rank's slice (measured faster), else 1
  rows = ops.CE_TWO_CHUNKS_MIN_SLICE_BYTES // (8192 * 2)
  chunks = lambda t, world=2: ops.ce_chunks_for(t, 8192, 2, world)
  assert chunks(1) == chunks(2 * rows - 2) == 1
  assert chunks(2 * rows) == chunks(10 ** 7) == 2
  assert chunks(4 * rows, world=4) == 2 and chunks(4 * rows - 4, world=4) == 1
  for ok in ("auto", 1, 32, np.int32(4)):
    ops.check_chunks("op", ok)
  for bad in (0, 33, True, 2.0, "4"):
    with pytest.raises(ValueError, match="ce_chunks="):
      ops.check_chunks("op", bad)


def test_start_validates_too(fake_ws):
  with pytest.raises(ValueError, match="fused_start: ce_chunks=40"):
    ops.fused_start(*_args(), eps=1e-6, algorithm="copy_engine", ce_chunks=40)
  with pytest.raises(ValueError, match="fused_start: ctas=140"):
    ops.fused_start(*_args(), eps=1e-6, ctas=140)
  with pytest.raises(ValueError, match="fused_start: slot=2"):
    ops.fused_start(*_args(), eps=1e-6, slot=2)
  with pytest.raises(ValueError, match="fused_start: side_priority='urgent'"):
    ops.fused_start(*_args(), eps=1e-6, side_priority="urgent")


def test_uninitialised_workspace_raises(monkeypatch):
  monkeypatch.setattr(ws_lib, "_WORKSPACE", None)
  with pytest.raises(RuntimeError, match="fused_reduce_add_norm: workspace not initialised"):
    ops.fused_reduce_add_norm(*_args(), eps=1e-6)


def test_missing_library_error_is_clear(monkeypatch, tmp_path):
  monkeypatch.setattr(_lib, "candidate_paths", lambda: [tmp_path / "libweave_fused.so"])
  with pytest.raises(_lib.FusedUnavailableError, match="nvcc"):
    _lib.load.__wrapped__()


def test_backend_options():
  if not _lib.available():
    pytest.skip("libweave_fused not built")
  b = get_backend("fused_p2p", ctas=8)
  assert (b.name, b.ctas, b.residual_sharded) == ("fused_p2p", 8, True)
  assert get_backend("fused_multimem").name == "fused_multimem"
  with pytest.raises(ValueError, match="ctas=200"):
    get_backend("fused_p2p", ctas=200)
  with pytest.raises(ValueError, match="unknown options"):
    get_backend("fused_p2p", blocks=8)
  assert get_backend("fused_p2p", algorithm="copy_engine", ce_ctas=128).ce_ctas == 128
  d = get_backend("fused_p2p")
  assert (d.ctas, d.weave_ctas) == (128, 32)  # measured defaults: unsplit / woven
  with pytest.raises(ValueError, match="weave_ctas=1 outside"):
    get_backend("fused_p2p", weave_ctas=1)
  with pytest.raises(ValueError, match="algorithm='ring'"):
    get_backend("fused_p2p", algorithm="ring")
  with pytest.raises(ValueError, match="ce_ctas=1 outside"):
    get_backend("fused_p2p", ce_ctas=1)
  with pytest.raises(ValueError, match="runs only two_shot"):
    get_backend("fused_multimem", algorithm="one_shot")
  assert d.weave_algorithm == "auto"
  assert get_backend("fused_p2p", weave_algorithm="copy_engine")._algo(woven=True) == dict(
      algorithm="copy_engine", ce_ctas=ops.DEFAULT_CE_CTAS, ce_chunks="auto")
  assert get_backend("fused_p2p", weave_algorithm="two_shot", ce_chunks=4)._algo() == dict(
      algorithm="auto", ce_ctas=ops.DEFAULT_CE_CTAS, ce_chunks=4)
  with pytest.raises(ValueError, match="ce_chunks=0"):
    get_backend("fused_p2p", ce_chunks=0)
  with pytest.raises(ValueError, match="weave_algorithm='ring'"):
    get_backend("fused_p2p", weave_algorithm="ring")
  with pytest.raises(ValueError, match="runs only two_shot"):
    get_backend("fused_multimem", weave_algorithm="copy_engine")
  assert d.side_priority == "normal"
  assert get_backend("fused_p2p", side_priority="high").side_priority == "high"
  with pytest.raises(ValueError, match="side_priority='low'"):
    get_backend("fused_p2p", side_priority="low")
  assert d.cmd_buffer is None  # ops.graph_target_default decides
  assert get_backend("fused_p2p", cmd_buffer=1).cmd_buffer is True  # "fused:cmd_buffer=1"
  assert get_backend("fused_p2p", cmd_buffer=0).cmd_buffer is False
  with pytest.raises(ValueError, match="cmd_buffer='yes' must be a bool"):
    get_backend("fused_p2p", cmd_buffer="yes")
  with pytest.raises(ValueError, match="cannot run algorithm='copy_engine'"):
    get_backend("fused_p2p", cmd_buffer=True, algorithm="copy_engine")


def test_graph_target_is_registered_command_buffer_compatible(monkeypatch):
  """XLA takes a target's traits from its registration: only the graph target may be captured
  into a command buffer, and only because it is registered so."""
  from jaxlib import xla_client

  seen = {}
  monkeypatch.setattr(_lib, "load", lambda: type("Lib", (), dict.fromkeys(_lib.TARGETS.values())))
  monkeypatch.setattr(jax.ffi, "pycapsule", lambda fn: fn)
  monkeypatch.setattr(jax.ffi, "register_ffi_target",
                      lambda name, fn, platform, **kw: seen.__setitem__(name, (platform, kw)))
  _lib.register_targets.__wrapped__()
  graph = xla_client.CustomCallTargetTraits.COMMAND_BUFFER_COMPATIBLE
  assert seen == {name: ("CUDA", {"traits": graph} if name == "weave_fused_ran_graph" else {})
                  for name in _lib.TARGETS}

  def refuse_traits(name, fn, platform, **kw):  # what jaxlib says for a plugin without traits
    if kw:
      raise RuntimeError("UNIMPLEMENTED: The plugin does not support custom call traits.")
    seen[name] = (platform, kw)

  seen.clear()
  monkeypatch.setattr(jax.ffi, "register_ffi_target", refuse_traits)
  _lib.register_targets.__wrapped__()
  assert seen == {name: ("CUDA", {}) for name in _lib.TARGETS}


def test_failed_probe_falls_back_to_rs_ag_with_one_warning(monkeypatch):
  if not _lib.available():
    pytest.skip("libweave_fused not built")
  from weave_jax.comm import fused as comm_fused
  monkeypatch.setattr(ws_lib, "_WORKSPACE", _fake_ws(peer_ok=False, probe_message="no NVLink"))
  monkeypatch.setattr(comm_fused, "_warned", set())
  tp, tokens, hidden = 8, 16, 64
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:tp]), (AXIS,))
  fused_b, rs_ag = get_backend("fused_p2p"), get_backend("rs_ag")

  def run(b):
    f = jax.shard_map(lambda p, r, w: b.reduce_add_norm(p, r, w, eps=1e-6), mesh=mesh,
                      in_specs=(P(AXIS), P(AXIS), P()), out_specs=(P(AXIS), P(AXIS)))
    k = jax.random.split(jax.random.key(0), 3)
    return f(jax.random.normal(k[0], (tp * tokens, hidden)),
             jax.random.normal(k[1], (tokens, hidden)), jnp.ones((hidden,)))

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = run(fused_b)
    run(fused_b)
  msgs = [str(w.message) for w in caught if "rs_ag" in str(w.message)]
  assert len(msgs) == 1 and "no NVLink" in msgs[0]
  want = run(rs_ag)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_on_stream_shim_traces_compute_on():
  jaxpr = jax.make_jaxpr(ops.on_stream(lambda x: (x + 1,)))(jnp.ones(4))
  assert "compute_on" in str(jaxpr)


def test_phase_summary_from_stamps():
  from weave_jax.fused import phases

  arr = np.zeros((phases.MAX_CTAS, phases.STAMPS), np.uint64)
  # two blocks of a two-shot call (ns): block 1 starts 1 µs later and each phase takes longer
  arr[0, :6] = [1000, 3000, 4000, 9000, 10000, 12000]
  arr[1, :6] = [2000, 6000, 7000, 14000, 15000, 19000]
  arr[2, :3] = [5, 6, 7]  # a block that did not record every point: ignored
  s = phases.summary({0: arr}, "two_shot")
  assert list(s) == ["phase 0 push", "barrier 0", "phase 1 reduce+norm", "barrier 1",
                     "phase 2 copy-out", "span"]
  assert s["phase 0 push"] == pytest.approx(3.0)          # median of 2 and 4 µs
  assert s["phase 1 reduce+norm"] == pytest.approx(6.0)   # median of 5 and 7 µs
  assert s["span"] == pytest.approx(18.0)                 # 1 µs -> 19 µs
  with pytest.raises(ValueError, match="no block recorded"):
    phases.summary({0: np.zeros_like(arr)}, "two_shot")
  with pytest.raises(ValueError, match="algorithm 'bogus'"):
    phases.summary({0: arr}, "bogus")


def test_woven_start_done_lowers_with_aliasing(monkeypatch):
  """The weave schedule with the fused backend lowers (CPU: lowering only, nothing runs):
  start returns its pending outputs, done aliases them (no copy), priority reaches the call."""
  if not _lib.available():
    pytest.skip("libweave_fused not built")
  from weave_jax import weave
  monkeypatch.setattr(ws_lib, "_WORKSPACE", _fake_ws())
  monkeypatch.setattr(_lib, "register_targets", lambda: None)
  backend = get_backend("fused_p2p", weave_ctas=8, side_priority="high")
  mesh = jax.make_mesh((2,), (AXIS,), devices=jax.devices()[:2])
  hidden, half = 1024, 16
  stage = (lambda n, half_info, ctx: (n * 2, ctx), jnp.ones((hidden,), jnp.bfloat16), "s")

  def local(n_a, n_b, r_a, r_b):
    (n_a, n_b), (r_a, r_b), _ = weave.run([stage, stage], (None, None), (r_a, r_b), backend,
                                          eps=1e-6, normed=(n_a, n_b))
    return n_a, n_b, r_a, r_b

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS),) * 4, out_specs=(P(AXIS),) * 4))
  spec = lambda rows: jax.ShapeDtypeStruct((rows, hidden), jnp.bfloat16,
                                           sharding=jax.sharding.NamedSharding(mesh, P(AXIS)))
  x, r = spec(2 * 2 * half), spec(2 * half)   # global: each rank holds 2*half, half rows
  text = f.lower(x, x, r, r).as_text()
  assert text.count("custom_call @weave_fused_start(") == 4
  dones = [l for l in text.splitlines() if "custom_call @weave_fused_done(" in l]
  assert len(dones) == 4
  assert all("output_operand_aliases" in l and "operand_index = 1" in l and "operand_index = 2" in l
             for l in dones)
  assert "priority = 1 : i32" in text


def _unsplit_lowered(**kw):
  """(the lowered program's line calling a weave_fused_ran* target, the jaxpr's effects) of one
  unsplit call on a 2-device mesh (CPU: lowering only, nothing runs)."""
  mesh = jax.make_mesh((2,), (AXIS,), devices=jax.devices()[:2])

  def local(p, r, w):
    return ops.fused_reduce_add_norm(p, r, w, eps=1e-6, **kw)

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P()),
                            out_specs=(P(AXIS), P(AXIS))))
  sds = lambda shape, spec: jax.ShapeDtypeStruct(
      shape, jnp.bfloat16, sharding=jax.sharding.NamedSharding(mesh, spec))
  args = (sds((128, 1024), P(AXIS)), sds((64, 1024), P(AXIS)), sds((1024,), P()))
  line = next(l for l in f.lower(*args).as_text().splitlines() if "@weave_fused_ran" in l)
  return line, jax.make_jaxpr(f)(*args).effects


def test_unsplit_call_declares_no_side_effect(fake_ws, monkeypatch):
  """The synchronous fused call lowers without a side effect, so JAX keeps its fast dispatch
  path for programs made of it (effects would route every call through the slow path)."""
  monkeypatch.setattr(_lib, "register_targets", lambda: None)
  for cmd_buffer in (None, False):
    line, effects = _unsplit_lowered(ctas=8, cmd_buffer=cmd_buffer)
    assert "has_side_effect = true" not in line
    assert not effects


def test_graph_target_by_default_only_where_replay_was_verified(fake_ws, monkeypatch):
  """Unsplit calls go through the command-buffer target by default for the kernels of the peer
  transport, one-process and IPC workspaces alike (replay verified on GPU); the copy engines,
  the multimem transport and an explicit cmd_buffer=False take the plain target;
  cmd_buffer=True with the copy engines is an error before anything launches."""
  monkeypatch.setattr(_lib, "register_targets", lambda: None)
  graph, plain = "@weave_fused_ran_graph(", "@weave_fused_ran("
  assert graph in _unsplit_lowered()[0]
  assert graph in _unsplit_lowered(algorithm="one_shot", ctas=4)[0]
  assert plain in _unsplit_lowered(cmd_buffer=False)[0]
  for algorithm in ops.COPY_ENGINE_ALGORITHMS:
    assert plain in _unsplit_lowered(algorithm=algorithm)[0]
  assert graph in _unsplit_lowered(algorithm="two_shot", cmd_buffer=True)[0]
  with pytest.raises(ValueError, match="cmd_buffer=True cannot run algorithm='copy_engine'"):
    _unsplit_lowered(algorithm="copy_engine", cmd_buffer=True)
  monkeypatch.setattr(ws_lib, "_WORKSPACE", _fake_ws(mode="ipc"))
  assert graph in _unsplit_lowered()[0]
  assert not ops.graph_target_default("two_shot", "multimem")
  # XLA told to run a command buffer's independent commands concurrently: two fused calls could
  # overlap on one workspace, so the default falls back and an explicit request is refused
  monkeypatch.setattr(ws_lib, "_WORKSPACE", _fake_ws())
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                     "--xla-gpu-command-buffer-scheduling-mode=concurrent")
  assert plain in _unsplit_lowered()[0]
  with pytest.raises(ValueError, match="CONCURRENT in XLA_FLAGS"):
    _unsplit_lowered(cmd_buffer=True)
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_command_buffer_scheduling_mode=LHS")
  assert graph in _unsplit_lowered()[0]


class _FakeKV:
  """The distributed runtime's key-value store, shared by threads that play the ranks."""

  def __init__(self):
    self.data, self.cv = {}, threading.Condition()

  def key_value_set_bytes(self, key, value):
    with self.cv:
      self.data[key] = value
      self.cv.notify_all()

  def blocking_key_value_get_bytes(self, key, timeout_ms):
    with self.cv:
      assert self.cv.wait_for(lambda: key in self.data, timeout_ms / 1e3), f"no {key}"
      return self.data[key]


class _FakeIpcLib:
  """libweave_fused's IPC entry points: handles are the rank's id; ``bad_check`` ranks fail
  the probe's check step."""

  def __init__(self, bad_check=()):
    self.bad_check, self.opened = set(bad_check), {}

  def weave_ws_ipc_handle_bytes(self):
    return 2

  def weave_ws_init_ipc_export(self, ordinal, rank, world, tmax, hidden, itemsize, slots, out,
                               err, n):
    out[0], out[1] = rank, world
    return 0

  def weave_ws_init_ipc_open(self, ordinal, handles, err, n):
    self.opened[ordinal] = bytes(handles)
    return 0

  def weave_ws_probe_ipc_write(self, ordinal, err, n):
    return 0

  def weave_ws_probe_ipc_check(self, ordinal, err, n):
    if ordinal in self.bad_check:
      err.value = f"ipc probe: rank 0's stores did not land in rank {ordinal}'s memory".encode()
      return -2
    return 0


@pytest.mark.parametrize("bad_check", [(), (1,)])
def test_ipc_init_exchanges_handles_and_agrees_on_the_probe(monkeypatch, bad_check):
  """Every rank opens every rank's handles, and all ranks reach the same verdict: one rank's
  failed probe makes every rank fall back (a mix would leave the kernels' barriers unpaired)."""
  from jax._src import distributed

  monkeypatch.setattr(distributed.global_state, "client", _FakeKV())
  monkeypatch.setattr(ws_lib, "_IPC_GENERATION", itertools.repeat(0))
  lib, results = _FakeIpcLib(bad_check), {}
  threads = [threading.Thread(target=lambda r=r: results.__setitem__(
      r, ws_lib._init_ipc(lib, r, r, 2, 64, 1024, 2, 2))) for r in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(30)
  assert lib.opened == {0: bytes([0, 2, 1, 2]), 1: bytes([0, 2, 1, 2])}
  if bad_check:
    assert results[0] == results[1] == (
        False, "rank 1: ipc probe: rank 0's stores did not land in rank 1's memory")
  else:
    assert results[0] == results[1] == (True, "ipc write/read-back probe passed on 2 ranks")

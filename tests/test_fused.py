"""CPU tests of the fused binding: validation before launch, library-missing error, backend
options, the rs_ag fallback warning and the compute_on shim.  No GPU needed: the workspaces
here are real ``Workspace`` objects over CPU devices, marked open without allocating."""
from __future__ import annotations

import itertools
import threading
import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from weave_jax import tuned
from weave_jax.comm import fused_available, get_backend
from weave_jax.comm.base import AXIS
from weave_jax.fused import _lib, ops, workspace as ws_lib
from weave_jax.options import FusedOptions

FB = tuned.FALLBACK  # the CPU "device" has no table: the fallback model's numbers


def _fake_ws(world=2, mode=None, peer_ok=True, probe_message="", **kw):
  """A Workspace on CPU devices, marked open (nothing allocated)."""
  base = dict(max_tokens=128, hidden=1024, dtype=jnp.bfloat16)
  ws = ws_lib.Workspace(jax.devices()[:world], **dict(base, **kw))
  ws._open, ws.peer_ok, ws.probe_message = True, peer_ok, probe_message
  if mode == "ipc":  # one process per GPU: what a rank's workspace records
    ws.mode, ws.copy_engine = "ipc", False
  return ws


@pytest.fixture
def fake_ws(monkeypatch):
  monkeypatch.setattr(_lib, "register_targets", lambda: pytest.fail("reached launch"))
  return _fake_ws()


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
    (_args(), {"ctas": 1}, ValueError, r"fused_reduce_add_norm: ctas=1 must be an integer in 2\.\.128"),
    (_args(), {"ctas": 129}, ValueError, r"fused_reduce_add_norm: ctas=129 must be"),
    (_args(), {"ctas": 8.0}, ValueError, r"fused_reduce_add_norm: ctas=8.0 must be"),
    (_args(), {"algorithm": "ring"}, ValueError, r"algorithm='ring' must be 'auto' or one of"),
    (_args(), {"algorithm": "copy_engine", "ce_ctas": 1}, ValueError, r"ce_ctas=1 must be an integer in 2\.\.1024"),
    (_args(), {"algorithm": "copy_engine", "ce_chunks": 0}, ValueError,
     r"ce_chunks=0 must be 'auto' or an integer in 1\.\.32"),
    (_args(), {"algorithm": "copy_engine", "ce_chunks": 33}, ValueError, r"ce_chunks=33 must be"),
    (_args(), {"ce_chunks": "many"}, ValueError, r"ce_chunks='many' must be"),
    (_args(), {"algorithm": "copy_engine", "cmd_buffer": True}, ValueError,
     r"cmd_buffer=True cannot run algorithm='copy_engine'"),
    # the comparison-only variants are not part of the product: rejected by name
    (_args(), {"algorithm": "two_shot_lsu"}, ValueError, r"algorithm='two_shot_lsu' must be"),
    (_args(), {"algorithm": "copy_engine_direct"}, ValueError, r"algorithm='copy_engine_direct'"),
    (_args(), {"algorithm": "copy_engine_lsu"}, ValueError, r"algorithm='copy_engine_lsu'"),
    (_args(), {"algorithm": "copy_engine_tma"}, ValueError, r"algorithm='copy_engine_tma'"),
])
def test_bad_inputs_raise_before_launch(fake_ws, args, kw, exc, msg):
  with pytest.raises(exc, match=msg):
    ops.fused_reduce_add_norm(*args, eps=1e-6, workspace=fake_ws, **kw)


def test_only_the_product_algorithms_have_codes():
  """The FFI ABI: 0 two_shot, 1 copy_engine, 2 one_shot; codes 3-6 (comparison variants) are
  never sent."""
  from weave_jax import options
  assert ops.ALGORITHMS == {"two_shot": 0, "copy_engine": 1, "one_shot": 2}
  assert set(options.ALGORITHMS) == set(ops.ALGORITHMS)


def test_one_shot_capacity_and_auto_choice(monkeypatch):
  ws = _fake_ws(max_tokens=4096, hidden=8192)
  monkeypatch.setattr(_lib, "register_targets", lambda: pytest.fail("reached launch"))
  assert ws.one_shot_rows() == 64  # 1 MiB / (8192 * 2 B)
  with pytest.raises(ValueError, match=r"one_shot' needs tokens <= 64 .*got 65"):
    ops.fused_reduce_add_norm(*_args(tokens=65, hidden=8192), eps=1e-6, workspace=ws,
                              algorithm="one_shot")
  choose = lambda t: ops.choose_algorithm(t, 8192, 2, ws)
  small = FB["one_shot_max_bytes"] // (8192 * 2)
  assert choose(1) == choose(small) == "one_shot"
  assert choose(small + 1) == choose(4096) == "two_shot"
  # woven calls go to the copy engines from the tuned size (workspaces that allow them only)
  ce_min = FB["woven_copy_engine_min_bytes"] // (8192 * 2)
  woven = lambda t, w=ws: ops.choose_algorithm(t, 8192, 2, w, woven=True)
  assert woven(1) == "one_shot" and woven(ce_min - 1) == "two_shot"
  assert woven(ce_min) == woven(4096) == "copy_engine"
  assert woven(4096, _fake_ws(max_tokens=4096, hidden=8192, mode="ipc")) == "two_shot"
  assert woven(4096, _fake_ws(max_tokens=4096, hidden=8192, copy_engine=False)) == "two_shot"
  # unsplit calls keep the kernel at any size and TP (the copy engines were slower in the model)
  tp4 = _fake_ws(world=4, max_tokens=32768, hidden=8192)
  assert ops.choose_algorithm(32768, 8192, 2, ws) == ops.choose_algorithm(32768, 8192, 2, tp4) \
      == "two_shot"
  for ce_ctas, msg in ((1, r"ce_ctas=1 must be"), (2000, "ce_ctas=2000 must be")):
    with pytest.raises(ValueError, match=msg):
      ops.fused_reduce_add_norm(*_args(tokens=64, hidden=8192), eps=1e-6, workspace=ws,
                                algorithm="copy_engine", ce_ctas=ce_ctas)
  mm = _fake_ws(max_tokens=4096, hidden=8192, transport="multimem")
  assert ops.choose_algorithm(1, 8192, 2, mm) == "two_shot"
  with pytest.raises(ValueError, match="multimem transport runs only algorithm='two_shot'"):
    ops.fused_reduce_add_norm(*_args(tokens=64, hidden=8192), eps=1e-6, workspace=mm,
                              algorithm="copy_engine")
  ipc = _fake_ws(max_tokens=4096, hidden=8192, mode="ipc")
  with pytest.raises(ValueError, match="copy_engine' needs a workspace with copy_engine=True"):
    ops.fused_start(*_args(tokens=64, hidden=8192), eps=1e-6, workspace=ipc, slot=0,
                    algorithm="copy_engine")


def test_copy_engine_chunks_auto():
  # 2 chunks from the tuned slice size of a rank's slice (measured faster), else 1
  rows = FB["ce_two_chunks_min_slice_bytes"] // (8192 * 2)
  ws2, ws4 = _fake_ws(world=2, hidden=8192), _fake_ws(world=4, hidden=8192)
  chunks = lambda t, ws=ws2: ops.ce_chunks_for(t, 8192, 2, ws)
  assert chunks(1) == chunks(2 * rows - 2) == 1
  assert chunks(2 * rows) == chunks(10 ** 7) == 2
  assert chunks(4 * rows, ws4) == 2 and chunks(4 * rows - 4, ws4) == 1
  for ok in ("auto", 1, 32, np.int32(4)):
    ops.check_chunks("op", ok)
  for bad in (0, 33, True, 2.0, "4"):
    with pytest.raises(ValueError, match="ce_chunks="):
      ops.check_chunks("op", bad)


def test_start_validates_too(fake_ws):
  kw = dict(eps=1e-6, workspace=fake_ws)
  with pytest.raises(ValueError, match="fused_start: ce_chunks=40"):
    ops.fused_start(*_args(), slot=0, algorithm="copy_engine", ce_chunks=40, **kw)
  with pytest.raises(ValueError, match="fused_start: ctas=140"):
    ops.fused_start(*_args(), slot=0, ctas=140, **kw)
  for slot in (2, -1, 0.5):
    with pytest.raises(ValueError, match=f"fused_start: slot={slot}"):
      ops.fused_start(*_args(), slot=slot, **kw)
  with pytest.raises(TypeError, match="side_priority"):  # the option is gone
    ops.fused_start(*_args(), slot=0, side_priority="high", **kw)


def test_unopened_or_missing_workspace_raises():
  ws = _fake_ws()
  ws._open = False
  with pytest.raises(RuntimeError, match="fused_reduce_add_norm: the workspace is not open"):
    ops.fused_reduce_add_norm(*_args(), eps=1e-6, workspace=ws)
  with pytest.raises(TypeError, match="workspace must be a weave_jax.fused.Workspace"):
    ops.fused_reduce_add_norm(*_args(), eps=1e-6, workspace=None)


def test_missing_library_error_is_clear(monkeypatch, tmp_path):
  monkeypatch.setattr(_lib, "candidate_paths", lambda: [tmp_path / "libweave_fused.so"])
  with pytest.raises(_lib.FusedUnavailableError, match="nvcc"):
    _lib.load.__wrapped__()


def test_backend_options():
  """Options are a typed FusedOptions, validated at construction; the backend checks them
  against its transport and workspace.  Needs no library."""
  ws, mm = _fake_ws(), _fake_ws(transport="multimem")
  b = get_backend("fused_p2p", workspace=ws, options=FusedOptions(ctas=8))
  assert (b.name, b.options.ctas, b.residual_sharded, b.workspace) == ("fused_p2p", 8, True, ws)
  assert get_backend("fused_multimem", workspace=mm).name == "fused_multimem"
  d = get_backend("fused_p2p", workspace=ws)
  assert d.options == FusedOptions() and d.options.ctas is None  # None: the tuned value
  with pytest.raises(ValueError, match="ctas=200"):
    FusedOptions(ctas=200)
  with pytest.raises(TypeError, match="unexpected keyword"):
    FusedOptions(blocks=8)
  with pytest.raises(ValueError, match="unknown options"):
    FusedOptions.from_dict({"blocks": 8})
  with pytest.raises(ValueError, match="unknown options"):
    FusedOptions.from_dict({"side_priority": "high"})
  assert FusedOptions.from_dict({"ce_ctas": 128}).ce_ctas == 128
  for bad, msg in (({"weave_ctas": 1}, "weave_ctas=1"), ({"algorithm": "ring"}, "algorithm='ring'"),
                   ({"ce_ctas": 1}, "ce_ctas=1"), ({"ce_chunks": 0}, "ce_chunks=0"),
                   ({"weave_algorithm": "ring"}, "weave_algorithm='ring'"),
                   ({"weave_algorithm": "copy_engine_tma"}, "copy_engine_tma"),
                   ({"ctas": True}, "ctas=True"),
                   ({"cmd_buffer": 1}, "cmd_buffer=1 must be True, False or None"),
                   ({"cmd_buffer": "yes"}, "cmd_buffer='yes'"),
                   ({"cmd_buffer": True, "algorithm": "copy_engine"},
                    "cannot run algorithm='copy_engine'")):
    with pytest.raises(ValueError, match=msg):
      FusedOptions(**bad)
  with pytest.raises(ValueError, match="runs only two_shot"):
    get_backend("fused_multimem", workspace=mm, options=FusedOptions(algorithm="one_shot"))
  with pytest.raises(ValueError, match="runs only two_shot"):
    get_backend("fused_multimem", workspace=mm, options=FusedOptions(weave_algorithm="copy_engine"))
  with pytest.raises(ValueError, match="runs the peer transport"):
    get_backend("fused_p2p", workspace=mm)
  with pytest.raises(TypeError, match="workspace must be"):
    get_backend("fused_p2p")
  with pytest.raises(TypeError, match="options must be a FusedOptions"):
    get_backend("fused_p2p", workspace=ws, options={"ctas": 8})
  with pytest.raises(ValueError, match="takes no options"):
    get_backend("psum", options=FusedOptions())
  with pytest.raises(ValueError, match="copy_engine=True"):
    get_backend("fused_p2p", workspace=_fake_ws(mode="ipc"),
                options=FusedOptions(weave_algorithm="copy_engine"))
  assert FusedOptions(ctas=8, ce_chunks=4).changed() == {"ctas": 8, "ce_chunks": 4}
  assert hash(FusedOptions(ctas=8)) == hash(FusedOptions(ctas=8))


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
  """Needs no library: the fallback is decided from the workspace's probe record."""
  from weave_jax.comm import fused as comm_fused
  tp, tokens, hidden = 8, 16, 64
  ws = _fake_ws(world=tp, hidden=hidden, peer_ok=False, probe_message="no NVLink")
  monkeypatch.setattr(comm_fused, "_warned", set())
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:tp]), (AXIS,))
  fused_b, rs_ag = get_backend("fused_p2p", workspace=ws), get_backend("rs_ag")

  def run(b):
    f = jax.shard_map(lambda p, r, w: b.reduce_add_norm(p, r, w, eps=1e-6), mesh=mesh,
                      in_specs=(P(AXIS), P(AXIS), P()), out_specs=(P(AXIS), P(AXIS)))
    k = jax.random.split(jax.random.key(0), 3)
    bf16 = lambda key, shape: jax.random.normal(key, shape).astype(jnp.bfloat16)
    return f(bf16(k[0], (tp * tokens, hidden)), bf16(k[1], (tokens, hidden)),
             jnp.ones((hidden,), jnp.bfloat16))

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


def _woven_text(backend, hidden=1024, half=16):
  from weave_jax import weave
  mesh = jax.make_mesh((2,), (AXIS,), devices=jax.devices()[:2])
  stage = (lambda n, half_info, ctx: (n * 2, ctx), jnp.ones((hidden,), jnp.bfloat16), "s")

  def local(n_a, n_b, r_a, r_b):
    (n_a, n_b), (r_a, r_b), _ = weave.run([stage, stage], (None, None), (r_a, r_b), backend,
                                          eps=1e-6, normed=(n_a, n_b))
    return n_a, n_b, r_a, r_b

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(AXIS),) * 4, out_specs=(P(AXIS),) * 4))
  spec = lambda rows: jax.ShapeDtypeStruct((rows, hidden), jnp.bfloat16,
                                           sharding=jax.sharding.NamedSharding(mesh, P(AXIS)))
  x, r = spec(2 * 2 * half), spec(2 * half)   # global: each rank holds 2*half, half rows
  return f.lower(x, x, r, r).as_text()


def test_woven_slots_follow_the_schedule_and_lowering_is_pure(monkeypatch):
  """Half A's starts take slot 0, half B's slot 1 (no process-global counter): lowering the
  same program twice gives the same text, and no start passes a priority attribute."""
  monkeypatch.setattr(_lib, "register_targets", lambda: None)
  backend = get_backend("fused_p2p", workspace=_fake_ws(),
                        options=FusedOptions(weave_ctas=8))
  first, second = _woven_text(backend), _woven_text(backend)
  assert first == second
  starts = [l for l in first.splitlines() if "custom_call @weave_fused_start(" in l]
  assert [("slot = 0" in l, "slot = 1" in l) for l in starts] == [(True, False), (False, True)] * 2
  assert not any("priority" in l for l in starts)


def test_woven_start_done_lowers_with_aliasing(monkeypatch):
  """The weave schedule with the fused backend lowers (CPU: lowering only, nothing runs):
  start returns its pending outputs, done aliases them (no copy)."""
  monkeypatch.setattr(_lib, "register_targets", lambda: None)
  backend = get_backend("fused_p2p", workspace=_fake_ws(), options=FusedOptions(weave_ctas=8))
  text = _woven_text(backend)
  assert text.count("custom_call @weave_fused_start(") == 4
  dones = [l for l in text.splitlines() if "custom_call @weave_fused_done(" in l]
  assert len(dones) == 4
  assert all("output_operand_aliases" in l and "operand_index = 1" in l and "operand_index = 2" in l
             for l in dones)


def _unsplit_lowered(ws=None, **kw):
  """(the lowered program's line calling a weave_fused_ran* target, the jaxpr's effects) of one
  unsplit call on a 2-device mesh (CPU: lowering only, nothing runs)."""
  mesh = jax.make_mesh((2,), (AXIS,), devices=jax.devices()[:2])
  ws = ws or _fake_ws()

  def local(p, r, w):
    return ops.fused_reduce_add_norm(p, r, w, eps=1e-6, workspace=ws, **kw)

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
  assert plain in _unsplit_lowered(algorithm="copy_engine")[0]
  assert graph in _unsplit_lowered(algorithm="two_shot", cmd_buffer=True)[0]
  with pytest.raises(ValueError, match="cmd_buffer=True cannot run algorithm='copy_engine'"):
    _unsplit_lowered(algorithm="copy_engine", cmd_buffer=True)
  assert graph in _unsplit_lowered(_fake_ws(mode="ipc"))[0]
  assert not ops.graph_target_default("two_shot", "multimem")
  # XLA told to run a command buffer's independent commands concurrently: two fused calls could
  # overlap on one workspace, so the default falls back and an explicit request is refused
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


@pytest.mark.gpu
def test_library_loads_where_a_gpu_is_visible():
  """On a GPU machine the fused library must load and register its targets (one GPU is
  enough); a missing or broken build fails here instead of skipping the multi-GPU tests."""
  _lib.load()
  _lib.register_targets()
  ok, why = fused_available()
  assert ok, why

"""The public surface: weave_jax.ops.reduce_add_norm on any axis of a multi-axis mesh against a
float32 reference, weave.run's contract, plan purity, and bad input at every entry point."""
import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import weave_jax
from weave_jax import (Engine, FusedOptions, FusedTimeoutError, RunConfig, Workspace, init_random,
                       make_mesh, ops, preset, weave)

EPS = 1e-5


def test_exports():
  for name in ("Engine", "RunConfig", "FusedOptions", "FusedTimeoutError", "Workspace", "ops",
               "weave"):
    assert name in weave_jax.__all__ and hasattr(weave_jax, name)
  assert callable(weave_jax.ops.reduce_add_norm) and callable(weave_jax.weave.run)


# --- the op on a data x tensor mesh ---------------------------------------------------------

T, H = 16, 32


def _mesh_2x4():
  return jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))


def _reference(partial, residual, weight, backend):
  """float32 numpy: per (data, tensor) rank, (normed (T, H), its new residual rows)."""
  out = {}
  for d in range(2):
    total = partial[d].sum(0) if backend != "nocomm" else None
    for r in range(4):
      x = (partial[d, r] if backend == "nocomm" else total) + residual[d]
      normed = weight * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS)
      rows = x[r * T // 4:(r + 1) * T // 4] if backend == "rs_ag" else x
      out[d, r] = normed, rows
  return out


@pytest.mark.parametrize("backend", ["psum", "rs_ag", "nocomm"])
def test_op_on_data_by_tensor_mesh_matches_float32(backend):
  mesh = _mesh_2x4()
  rng = np.random.default_rng(0)
  partial = rng.standard_normal((2, 4, T, H)).astype(np.float32)
  residual = rng.standard_normal((2, T, H)).astype(np.float32)
  weight = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
  b = ops.backend(backend, axis_name="tensor")

  def local(p, r, w):
    r = ops.shard_residual(r[0], axis_name="tensor", backend=b)
    normed, new_res = ops.reduce_add_norm(p[0, 0], r, w, eps=EPS, axis_name="tensor",
                                          backend=backend)
    return normed[None, None], new_res[None, None]

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data", "tensor"), P("data"), P()),
                            out_specs=(P("data", "tensor"),) * 2, check_vma=False))
  normed, new_res = (np.asarray(x) for x in f(partial, residual, weight))
  want = _reference(partial, residual, weight, backend)
  assert normed.shape == (2, 4, T, H)
  assert new_res.shape == (2, 4, T // 4 if b.residual_sharded else T, H)
  for (d, r), (n, x) in want.items():
    np.testing.assert_allclose(normed[d, r], n, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(new_res[d, r], x, rtol=2e-5, atol=2e-5)


def _trace(fn, mesh=None, axis="tensor", partial=(T, H), residual=(T // 4, H), weight=(H,),
           dtype=jnp.float32):
  mesh = mesh or _mesh_2x4()
  sm = jax.shard_map(lambda p, r, w: fn(p, r, w), mesh=mesh, in_specs=(P(), P(), P()),
                     out_specs=P(), check_vma=False)
  args = [jax.ShapeDtypeStruct(s, dtype) if s is not None else None
          for s in (partial, residual, weight)]
  return jax.make_jaxpr(sm)(*args)


@pytest.mark.parametrize("kw, shapes, exc, msg", [
    (dict(backend="nccl"), {}, ValueError, "backend='nccl' must be one of"),
    (dict(backend=3), {}, TypeError, "backend must be a name or a CommBackend"),
    (dict(backend="fused_p2p"), {}, ValueError, "needs workspace="),
    (dict(axis_name=""), {}, TypeError, "axis_name must be a non-empty str"),
    (dict(axis_name="model"), {}, ValueError, "axis_name='model' is not an axis"),
    (dict(eps=0.0), {}, ValueError, "eps=0.0 must be a positive number"),
    (dict(eps=True), {}, ValueError, "eps=True"),
    (dict(eps="1e-5"), {}, ValueError, "eps='1e-5'"),
    ({}, dict(residual=(T, H)), ValueError, r"residual shape \(16, 32\) != \(4, 32\)"),
    ({}, dict(weight=(H + 8,)), ValueError, r"weight shape \(40,\) != \(32,\)"),
    ({}, dict(partial=(T, H, 1)), ValueError, "partial must be 2-D"),
    ({}, dict(partial=(18, H), residual=(5, H)), ValueError, "tokens=18 must be a multiple"),
    ({}, dict(dtype=jnp.int32), TypeError, "partial must be floating point"),
    (dict(options=FusedOptions()), {}, ValueError, "takes no options"),
])
def test_op_rejects_bad_input_naming_it(kw, shapes, exc, msg):
  call = dict(dict(eps=EPS, axis_name="tensor", backend="rs_ag"), **kw)
  with pytest.raises(exc, match=msg):
    _trace(lambda p, r, w: ops.reduce_add_norm(p, r, w, **call)[0], **shapes)


def test_op_takes_a_backend_object_on_its_own_axis():
  b = ops.backend("psum", axis_name="tensor")
  _trace(lambda p, r, w: ops.reduce_add_norm(p, r, w, eps=EPS, axis_name="tensor",
                                             backend=b)[0], residual=(T, H))
  with pytest.raises(ValueError, match="backend reduces over 'tensor', axis_name='data'"):
    _trace(lambda p, r, w: ops.reduce_add_norm(p, r, w, eps=EPS, axis_name="data", backend=b)[0])
  with pytest.raises(ValueError, match="pass workspace/options when building the backend"):
    _trace(lambda p, r, w: ops.reduce_add_norm(p, r, w, eps=EPS, axis_name="tensor", backend=b,
                                               options=FusedOptions())[0])
  assert ops.residual_shape(b, 10, H, 4) == (10, H)
  assert ops.residual_shape(ops.backend("rs_ag", axis_name="x"), 16, H, 4) == (4, H)


def test_fused_op_lowers_on_a_data_by_tensor_mesh(monkeypatch):
  """The fused backend on a (2, 4) mesh's "tensor" axis: one workspace covering both TP groups
  (CPU: lowering only); a workspace on another axis size is refused at trace time."""
  from weave_jax.fused import _lib
  monkeypatch.setattr(_lib, "register_targets", lambda: None)
  mesh = _mesh_2x4()
  ws = Workspace(mesh, max_tokens=64, hidden=H, axis_name="tensor")
  ws._open, ws.peer_ok = True, True   # as if opened on GPUs

  def fn(p, r, w):
    return ops.reduce_add_norm(p, r, w, eps=EPS, axis_name="tensor", backend="fused_p2p",
                               workspace=ws)[0]

  jaxpr = _trace(fn, dtype=jnp.bfloat16)
  assert "weave_fused_ran" in str(jaxpr)
  with pytest.raises(ValueError, match="axis_name='data' but the workspace's TP axis is 'tensor'"):
    _trace(lambda p, r, w: ops.reduce_add_norm(p, r, w, eps=EPS, axis_name="data",
                                               backend="fused_p2p", workspace=ws)[0],
           dtype=jnp.bfloat16)


def test_run_checked_turns_a_timeout_into_the_rank_and_barrier_error(monkeypatch):
  ws = Workspace(jax.devices()[:2], max_tokens=8, hidden=8)
  err = FusedTimeoutError("weave_fused_ran: rank 1 ... barrier 0")
  monkeypatch.setattr(ws, "timeout_error", lambda: err)

  def launch_fails():
    raise RuntimeError("INTERNAL: CUDA error: unspecified launch failure")

  with pytest.raises(FusedTimeoutError, match="rank 1") as info:
    ops.run_checked(launch_fails, workspace=ws)
  assert isinstance(info.value.__cause__, RuntimeError)
  monkeypatch.setattr(ws, "timeout_error", lambda: None)
  with pytest.raises(RuntimeError, match="launch failure"):   # not a timeout: unchanged
    ops.run_checked(launch_fails, workspace=ws)
  assert ops.run_checked(lambda x: x + 1, jnp.ones(2))[0] == 2


# --- weave.run --------------------------------------------------------------------------------

def _chain(hidden=H, n_stages=3):
  """Row-wise stages; each returns as ctx the running sum of its input rows (half B's call
  adds its rows to half A's)."""
  ws = [jnp.asarray(np.random.default_rng(k).standard_normal((hidden, hidden)) / hidden ** 0.5,
                    jnp.float32) for k in range(n_stages)]

  def stage(k):
    def fn(normed, half, ctx):
      x = half if normed is None else normed
      prefix = jnp.zeros((hidden,)) if ctx is None else ctx
      return x @ ws[k], prefix + x.sum(0)
    return (fn, jnp.ones((hidden,), jnp.float32), f"stage_{k}")

  return [stage(k) for k in range(n_stages)]


def test_weave_run_unsplit_and_woven_agree_and_return_ctx():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("tp",))
  b = ops.backend("rs_ag", axis_name="tp")
  stages = _chain()
  x = np.random.default_rng(1).standard_normal((32, H)).astype(np.float32)

  def local(x):
    res = lambda n: jnp.zeros(b.residual_shape(n, H, 4), jnp.float32)
    one = weave.run(stages, (x,), (res(32),), b, eps=EPS)
    two = weave.run(stages, (x[:16], x[16:]), (res(16), res(16)), b, eps=EPS)
    assert len(one.ctxs) == len(two.ctxs) == len(stages)
    return one.normed[0], jnp.concatenate(two.normed), one.ctxs[-1], two.ctxs[-1]

  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))
  unsplit, woven, ctx_one, ctx_two = (np.asarray(v) for v in f(x))
  assert unsplit.shape == woven.shape == (32, H)
  np.testing.assert_allclose(woven, unsplit, rtol=1e-4, atol=1e-4)
  # half B received half A's ctx: the last stage's ctx sums all 32 rows, as unsplit's does
  np.testing.assert_allclose(ctx_two, ctx_one, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("call, exc, msg", [
    (lambda b, s: weave.run([], ("h",), ("r",), b, eps=EPS), ValueError, "stages is empty"),
    (lambda b, s: weave.run(s, ("a", "b", "c"), ("r",) * 3, b, eps=EPS), ValueError,
     "1 \\(unsplit\\) or 2 \\(woven\\) halves, got 3"),
    (lambda b, s: weave.run(s, ("a", "b"), ("r",), b, eps=EPS), ValueError,
     "1 residuals for 2 halves"),
    (lambda b, s: weave.run(s, ("a",), ("r",), b, eps=EPS, normed=(1, 2)), ValueError,
     "2 normed inputs for 1 halves"),
    (lambda b, s: weave.run([(1, 2, 3)], ("a",), ("r",), b, eps=EPS), TypeError,
     r"stages\[0\] must be \(fn, weight, scope\)"),
    (lambda b, s: weave.run(s, ("a",), ("r",), "psum", eps=EPS), TypeError,
     "backend must be a CommBackend"),
    (lambda b, s: weave.run(s, ("a",), ("r",), b, eps=-1.0), ValueError, "eps=-1.0"),
])
def test_weave_run_rejects_bad_input(call, exc, msg):
  with pytest.raises(exc, match=msg):
    call(ops.backend("psum", axis_name="tp"), _chain())


# --- plan purity ------------------------------------------------------------------------------

def test_same_config_lowers_to_identical_programs(monkeypatch):
  """The compiled program is a function of (config, mesh, device kind, token count): two
  engines with equal configs lower to the same HLO text, and the fused backend has no
  trace-time counter (its woven calls lower identically twice)."""
  from weave_jax.comm import fused as comm_fused
  from weave_jax.fused import _lib
  assert not hasattr(comm_fused, "_slots")
  cfg = preset("tiny", num_layers=1)
  mesh = make_mesh(4)
  model = init_random(cfg, mesh)
  run = RunConfig(backend="rs_ag", weave=True, weave_min_tokens=16)

  def text(eng, n):
    plan = eng.plan(n)
    return eng._build(plan, False).lower(*eng._example_args(plan, False)).as_text()

  a, b = Engine(model, mesh, run), Engine(model, mesh, dataclasses.replace(run))
  assert text(a, 64) == text(b, 64)
  monkeypatch.setattr(_lib, "register_targets", lambda: None)
  bf = preset("tiny", num_layers=1, dtype="bfloat16")
  bmodel = init_random(bf, mesh)
  ws = Workspace(mesh, max_tokens=1024, hidden=bf.hidden_size, dtype=bf.dtype)
  ws._open, ws.peer_ok = True, True
  fused = RunConfig(backend="fused_p2p", weave=True, weave_min_tokens=16)
  e1, e2 = Engine(bmodel, mesh, fused, workspace=ws), Engine(bmodel, mesh, fused, workspace=ws)
  t1, t2 = text(e1, 64), text(e2, 64)
  assert t1 == t2 and "weave_fused_start" in t1


# --- configs and engine inputs ----------------------------------------------------------------

@pytest.mark.parametrize("kw, exc, msg", [
    (dict(backend="nccl"), ValueError, "backend must be one of"),
    (dict(backend="psum", options=FusedOptions(ctas=8)), ValueError, "takes none"),
    (dict(backend="fused_p2p", options={"ctas": 8}), TypeError, "options must be a FusedOptions"),
    (dict(weave="yes"), TypeError, "weave must be a bool"),
    (dict(backend_by_size=1), TypeError, "backend_by_size must be a bool"),
    (dict(weave_min_tokens=0), ValueError, "weave_min_tokens=0 must be >= 1"),
    (dict(weave_min_tokens=2.5), TypeError, "weave_min_tokens must be an int"),
    (dict(split=-64), ValueError, "split=-64 must be >= 1"),
    (dict(split=True), TypeError, "split must be an int"),
    (dict(attn_impl=3), TypeError, "attn_impl must be a str"),
    (dict(logits="first"), ValueError, "logits must be 'all' or 'last'"),
    (dict(paged_attention="flash"), ValueError, "paged_attention must be one of"),
    (dict(backend_options=(("ctas", 8),)), TypeError, "backend_options"),
])
def test_run_config_rejects_bad_values(kw, exc, msg):
  with pytest.raises(exc, match=msg):
    RunConfig(**kw)


def test_run_config_is_hashable_and_typed():
  a = RunConfig(backend="fused_p2p", options=FusedOptions(ctas=8), paged_attention="reference")
  assert hash(a) == hash(RunConfig(backend="fused_p2p", options=FusedOptions(ctas=8),
                                   paged_attention="reference"))
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.backend = "psum"


@pytest.fixture(scope="module")
def engine():
  cfg = preset("tiny", num_layers=1)
  mesh = make_mesh(2)
  return Engine(init_random(cfg, mesh), mesh, RunConfig(backend="psum"))


@pytest.mark.parametrize("args, exc, msg", [
    (dict(tokens=[[1, 2]]), ValueError, "tokens must be 1-D"),
    (dict(tokens=[]), ValueError, "empty batch"),
    (dict(tokens=[1.0, 2.0]), TypeError, "tokens must be integers"),
    (dict(tokens=[True, False]), TypeError, "tokens must be integers"),
    (dict(tokens=["a", "b"]), TypeError, "tokens must be integers"),
    (dict(tokens=[[1], [2, 3]]), TypeError, "tokens must be an integer array"),
    (dict(tokens=[1, 10**6]), ValueError, "token ids must be in"),
    (dict(tokens=[-1, 2]), ValueError, "token ids must be in"),
    (dict(tokens=[1, 2, 3], positions=[0, 1]), ValueError, "positions shape"),
    (dict(tokens=[1, 2, 3], positions=[0, -1, 2]), ValueError,
     "positions must be >= 0, got -1 at index 1"),
    (dict(tokens=[1, 2, 3], positions=[0, 1, 2**40]), ValueError, "positions must fit int32"),
    (dict(tokens=[1, 2, 3], positions=[0.0, 1.0, 2.0]), TypeError, "positions must be integers"),
    (dict(tokens=[1, 2, 3, 4], segment_ids=[0, 1, 0, 1]), ValueError,
     "segment_ids must be contiguous runs.*id 0 appears in 2 separate runs"),
    (dict(tokens=[1, 2, 3], segment_ids=[0, -1, -1]), ValueError, "segment_ids must be >= 0"),
    (dict(tokens=[1, 2, 3], segment_ids=[0, 0]), ValueError, "segment_ids shape"),
])
def test_engine_rejects_bad_batches_before_running(engine, args, exc, msg):
  with pytest.raises(exc, match=msg):
    engine(**args)


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "8"])
def test_engine_plan_rejects_bad_token_counts(engine, n):
  with pytest.raises(ValueError, match="Engine.plan: n_tokens="):
    engine.plan(n)


def test_engine_rejects_bad_construction(engine):
  from flax import nnx
  mesh = make_mesh(2)
  model = nnx.merge(engine.graphdef, engine.state)
  with pytest.raises(TypeError, match="model must be a weave_jax Transformer"):
    Engine("model", mesh)
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    Engine(model, jax.devices())
  with pytest.raises(ValueError, match="needs a 'tp' axis"):
    Engine(model, jax.make_mesh((2,), ("x",), devices=jax.devices()[:2]))
  with pytest.raises(TypeError, match="run must be a RunConfig"):
    Engine(model, mesh, {"backend": "psum"})
  with pytest.raises(ValueError, match="dtype=float32 must be bfloat16 or float16"):
    Engine(model, mesh, RunConfig(backend="fused_p2p"))  # fused kernels: 16-bit models only


def test_engine_call_turns_a_timeout_into_the_rank_and_barrier_error(engine, monkeypatch):
  """Engine.__call__ runs under the workspace's timeout reader (here a workspace whose record
  shows a timeout, and an executable that fails as a trapped kernel does)."""
  ws = Workspace(jax.devices()[:2], max_tokens=8, hidden=8)
  monkeypatch.setattr(ws, "timeout_error", lambda: FusedTimeoutError("rank 0 barrier 1"))
  monkeypatch.setattr(engine, "workspace", ws)

  def failing(*args):
    raise RuntimeError("INTERNAL: an illegal instruction was encountered")

  plan = engine.plan(4)
  monkeypatch.setattr(engine, "prepare", lambda *a: (plan, failing, ()))
  with pytest.raises(FusedTimeoutError, match="rank 0 barrier 1"):
    engine(np.arange(4))


JUNK = (None, -1, 0, 1, 2, 7, 129, 2000, 1.5, float("nan"), True, "", "auto", "x", [], {},
        (1,), object(), np.int32(8), np.float32(2.0))


@pytest.mark.parametrize("cls", [FusedOptions, RunConfig])
def test_fuzzed_fields_raise_only_value_or_type_errors(cls):
  """Any junk value in any field either builds a hashable config or raises ValueError /
  TypeError naming the class (never another exception, never a silent bad config)."""
  for field in dataclasses.fields(cls):
    for value in JUNK:
      try:
        obj = cls(**{field.name: value})
      except (ValueError, TypeError) as e:
        assert cls.__name__ in str(e), (field.name, value, e)
        continue
      hash(obj)
      assert getattr(obj, field.name) is value


@pytest.mark.parametrize("value", JUNK)
def test_fuzzed_op_arguments_raise_only_value_or_type_errors(value):
  for name in ("eps", "axis_name", "backend"):
    call = {**dict(eps=EPS, axis_name="tensor", backend="rs_ag"), name: value}
    try:
      _trace(lambda p, r, w: ops.reduce_add_norm(p, r, w, **call)[0])
    except (ValueError, TypeError):
      continue

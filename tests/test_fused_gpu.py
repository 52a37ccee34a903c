"""GPU tests of the fused AllReduce + residual + RMSNorm kernel (fused_p2p), >= 2 CUDA GPUs.

Reference: XLA psum in float32, residual add rounded to the dtype, float32 RMSNorm.  Tolerance:
rel-L2 < 1e-2 (bf16) / 2e-3 (fp16) against the float32 reference; NaN never passes.
Run with run/gpu_fused_check.sh.  The multimem transport is never run here.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from weave_jax.comm.base import AXIS

pytestmark = pytest.mark.gpu

EPS = 1e-6
TOL = {jnp.dtype(jnp.bfloat16): 1e-2, jnp.dtype(jnp.float16): 2e-3}
MAX_TOKENS, MAX_HIDDEN = 32768, 16384


def _gpus():
  try:
    return jax.devices("gpu")
  except RuntimeError:
    return []


TP = int(os.environ.get("WEAVE_TEST_TP", "2"))  # conftest.gpu_tp (children import this file)
if len(_gpus()) < max(TP, 2):
  pytest.skip(f"needs >= {max(TP, 2)} CUDA GPUs (WEAVE_TEST_TP={TP})", allow_module_level=True)

from weave_jax import fused, hlo_order  # noqa: E402
from weave_jax.fused import ops  # noqa: E402
from weave_jax.options import FusedOptions  # noqa: E402

MESH = jax.sharding.Mesh(np.array(_gpus()[:TP]), (AXIS,))
_OPEN: list = []  # the workspace the helpers below call with (this process's only one)


def open_ws(devices=MESH, **kw) -> fused.Workspace:
  """Opens a workspace for the helpers (closing the previous one).  A missing library raises
  FusedUnavailableError here: on a GPU machine that fails the tests, it does not skip them."""
  while _OPEN:
    _OPEN.pop().close()
  w = fused.Workspace(devices, **kw).open()
  _OPEN.append(w)
  return w


def _ws() -> fused.Workspace:
  return _OPEN[-1]


def _ran(*args, **kw):
  return ops.fused_reduce_add_norm(*args, workspace=_ws(), **kw)


def _start(*args, **kw):
  return ops.fused_start(*args, workspace=_ws(), **kw)


@pytest.fixture(scope="module", params=[jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def ws(request):
  w = open_ws(max_tokens=MAX_TOKENS, hidden=MAX_HIDDEN, dtype=request.param)
  assert w.peer_ok, w.probe_message
  yield w
  w.close()


def _smap(f, in_specs, out_specs):
  return jax.shard_map(f, mesh=MESH, in_specs=in_specs, out_specs=out_specs)


def _call_kw(algorithm, ctas):
  """ops keyword arguments: `ctas` is the grid of whichever kernel the algorithm runs;
  "copy_engine:K" is the copy-engine algorithm pipelined in K chunks ("auto" without K)."""
  if algorithm.startswith("copy_engine"):
    name, _, chunks = algorithm.partition(":")
    return dict(algorithm=name, ce_ctas=ctas, ce_chunks=int(chunks) if chunks else "auto")
  return dict(algorithm=algorithm, ctas=ctas)


@functools.lru_cache(maxsize=None)
def _check_fn(tokens, hidden, dtype, ctas, algorithm="two_shot"):
  """jit: random inputs -> (rel-L2 normed, rel-L2 residual, nan count, cross-rank diffs)."""
  shard = -(-tokens // TP)

  def local(partial, residual, weight):
    normed, new_res = _ran(partial, residual, weight, eps=EPS,
                                                **_call_kw(algorithm, ctas))
    # reference: fp32 psum, x rounded to dtype, fp32 norm (kept in fp32 for the comparison)
    total = jax.lax.psum(partial.astype(jnp.float32), AXIS)
    res_full = jax.lax.all_gather(residual, AXIS, axis=0, tiled=True)[:tokens]
    x = (total + res_full.astype(jnp.float32)).astype(dtype)
    xf = x.astype(jnp.float32)
    ref = weight.astype(jnp.float32) * (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + EPS))
    r = jax.lax.axis_index(AXIS)
    ref_res = jax.lax.dynamic_slice_in_dim(
        jnp.concatenate([x, jnp.zeros((shard * TP - tokens, hidden), dtype)]), r * shard, shard)
    # rows of my shard past T are padding: new residual = residual there
    valid = (r * shard + jnp.arange(shard)) < tokens
    ref_res = jnp.where(valid[:, None], ref_res, residual)
    return normed[None], new_res, ref[None], ref_res

  sm = _smap(local, (P(AXIS), P(AXIS), P()), (P(AXIS), P(AXIS), P(AXIS), P(AXIS)))

  @jax.jit
  def run(key):
    k1, k2, k3 = jax.random.split(key, 3)
    partial = jax.random.normal(k1, (TP * tokens, hidden), jnp.float32).astype(dtype)
    residual = jax.random.normal(k2, (TP * shard, hidden), jnp.float32).astype(dtype)
    weight = (1 + 0.1 * jax.random.normal(k3, (hidden,), jnp.float32)).astype(dtype)
    normed, new_res, ref, ref_res = sm(partial, residual, weight)
    nf = normed.astype(jnp.float32)
    rel = jnp.linalg.norm(nf - ref) / jnp.linalg.norm(ref)
    rel_res = (jnp.linalg.norm(new_res.astype(jnp.float32) - ref_res.astype(jnp.float32))
               / jnp.linalg.norm(ref_res.astype(jnp.float32)))
    nans = jnp.sum(jnp.isnan(nf)) + jnp.sum(jnp.isnan(new_res.astype(jnp.float32)))
    bits = jax.lax.bitcast_convert_type(normed, jnp.uint16)
    cross = jnp.sum(bits[0] != bits[1])
    return rel, rel_res, nans, cross

  return run


ONE_SHOT_ROWS = (1 << 20) // (MAX_HIDDEN * 2)  # ops.one_shot_rows of the fixture's workspace


def _random_shapes(n, seed, algorithm):
  rng = np.random.default_rng(seed)
  shapes = []
  max_tokens = ONE_SHOT_ROWS if algorithm == "one_shot" else MAX_TOKENS
  for _ in range(n):
    tokens = int(np.exp(rng.uniform(0, np.log(max_tokens + 1))))
    tokens = max(1, min(tokens, max_tokens))
    hidden = 8 * int(rng.integers(1024 // 8, MAX_HIDDEN // 8 + 1))
    while tokens * hidden > 2**27:  # keep each case <= 256 MiB per rank: time, not correctness
      tokens //= 2
    ce = algorithm.startswith("copy_engine")
    grids = [2, 16, 64, 132, 264] if ce else [2, 4, 8, 16, 32, 64, 128]
    name = algorithm
    if ce:  # pipelined in 1..32 chunks (more than rows: clamped)
      name += f":{int(rng.choice([1, 2, 3, 7, 32]))}"
    shapes.append((max(tokens, 1), hidden, int(rng.choice(grids)), name))
  return shapes


# Per dtype: 100 two-shot + 30 one-shot + 20 copy-engine random shapes (2 dtypes: 300), plus
# fixed edge cases.  WEAVE_TEST_SHAPES scales them down for a smoke run.
EDGE = [(1, 1024, 2, "two_shot"), (2, 1024, 32, "two_shot"), (3, 8, 2, "two_shot"),
        (33, 16384, 4, "two_shot"), (32768, 4096, 16, "two_shot"), (1025, 8192, 8, "two_shot"),
        (1, 16384, 2, "one_shot"), (3, 8, 32, "one_shot"),
        (ONE_SHOT_ROWS, 16384, 16, "one_shot"), (31, 8192, 5, "one_shot")]


N_SHAPES = int(os.environ.get("WEAVE_TEST_SHAPES", "100"))  # per dtype; a smoke run may lower it
CASES = (EDGE + _random_shapes(N_SHAPES, 4, "two_shot")
         + _random_shapes(max(1, 3 * N_SHAPES // 10), 6, "one_shot"))
CASES += [(1, 1024, 2, "copy_engine"), (3, 8, 1024, "copy_engine:32"),
          (1025, 8192, 7, "copy_engine:3"), (32768, 4096, 132, "copy_engine"),
          (32768, 4096, 16, "copy_engine:32"), (4097, 2048, 64, "copy_engine:5")]
CASES += _random_shapes(max(2, N_SHAPES // 5), 8, "copy_engine")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_psum_reference(ws, case):
  tokens, hidden, ctas, algorithm = case
  ws.poison_slots()
  rel, rel_res, nans, cross = jax.device_get(
      _check_fn(tokens, hidden, ws.dtype, ctas, algorithm)(jax.random.key(hash(case) % 2**31)))
  assert nans == 0, f"{case}: {nans} NaN outputs (unwritten rows?)"
  assert rel < TOL[ws.dtype], f"{case}: normed rel-L2 {rel}"
  assert rel_res < TOL[ws.dtype], f"{case}: residual rel-L2 {rel_res}"
  assert cross == 0, f"{case}: ranks differ in {cross} elements"


@pytest.mark.parametrize("algorithm", ["two_shot", "one_shot", "copy_engine", "copy_engine:4"])
def test_start_done_matches_sync(ws, algorithm):
  """start/done (side stream, results written into start's own outputs, aliased by done) give
  the same bits as the synchronous call, with a GEMM of the other operands between them.
  Kernels on 8 blocks."""
  tokens, hidden = (24, 4096) if algorithm == "one_shot" else (4096, 4096)
  kw = _call_kw(algorithm, 8)

  def local(partial, residual, weight):
    a = _ran(partial, residual, weight, eps=EPS, **kw)
    pending = _start(partial, residual, weight, eps=EPS, slot=1, **kw)
    busy = jnp.tanh(partial[:, :512] @ partial[:, :512].T)  # compute while the kernel runs
    pending, busy = jax.lax.optimization_barrier((pending, busy))
    b = ops.fused_done(pending, partial, residual, weight, slot=1)
    return a[0][None], b[0][None], a[1], b[1], jnp.sum(busy)[None]

  f = jax.jit(_smap(local, (P(AXIS), P(AXIS), P()), (P(AXIS),) * 5))
  k = jax.random.split(jax.random.key(1), 3)
  partial = jax.random.normal(k[0], (TP * tokens, hidden)).astype(ws.dtype)
  residual = jax.random.normal(k[1], (tokens, hidden)).astype(ws.dtype)
  weight = jnp.ones((hidden,), ws.dtype)
  hlo = f.lower(partial, residual, weight).compile().as_text()
  copies = hlo_order.copies_of_outputs(hlo, "weave_fused_start")
  assert not copies, f"XLA copies start's outputs before done (would race): {copies}"
  ws.poison_slots()
  a0, b0, a1, b1, _ = jax.device_get(f(partial, residual, weight))
  np.testing.assert_array_equal(np.asarray(a0).view(np.uint16), np.asarray(b0).view(np.uint16))
  np.testing.assert_array_equal(np.asarray(a1).view(np.uint16), np.asarray(b1).view(np.uint16))


@pytest.mark.parametrize("tokens,hidden,chunks,grid", [
    (3000, 8192, 1, None), (3000, 8192, 2, None), (3000, 8192, 5, 16), (777, 6144, 3, 7),
    (1, 4104, 1, 16), (2001, 4096, 2, 32), (4097, 2048, 2, 16), (2001, 4096, 1, 528),
    (777, 6144, 3, 1024)])
def test_copy_engine_bitwise_equals_two_shot(ws, tokens, hidden, chunks, grid):
  """Both reduce my slice in the same source order with the same per-row sums: identical bits,
  however the copy-engine call is cut into chunks and whatever its grid (odd token counts: the
  last rank's padding row; grids that do not divide the rows; None: the tuned grid)."""

  def local(partial, residual, weight):
    a = _ran(partial, residual, weight, eps=EPS, algorithm="two_shot", ctas=32)
    b = _ran(partial, residual, weight, eps=EPS,
                                  algorithm="copy_engine", ce_chunks=chunks,
                                  **({"ce_ctas": grid} if grid else {}))
    return a[0][None], b[0][None], a[1], b[1]

  f = jax.jit(_smap(local, (P(AXIS), P(AXIS), P()), (P(AXIS),) * 4))
  # inputs differ per case: a buffer left by an earlier case cannot hold this case's answer
  seed = zlib.crc32(repr((tokens, hidden, chunks, grid)).encode())
  k = jax.random.split(jax.random.key(seed), 3)
  partial = jax.random.normal(k[0], (TP * tokens, hidden)).astype(ws.dtype)
  residual = jax.random.normal(k[1], (tokens, hidden)).astype(ws.dtype)
  weight = (1 + 0.1 * jax.random.normal(k[2], (hidden,))).astype(ws.dtype)
  a0, b0, a1, b1 = [np.asarray(x).view(np.uint16) for x in f(partial, residual, weight)]
  np.testing.assert_array_equal(a0, b0)
  np.testing.assert_array_equal(a1, b1)


def test_backend_seam(ws):
  from weave_jax.comm import get_backend

  tokens, hidden = 2048, 2048
  fused_b = get_backend("fused_p2p", workspace=ws, options=FusedOptions(ctas=4, weave_ctas=4))
  rs_ag = get_backend("rs_ag")

  def local(partial, residual, weight):
    n1, r1 = fused_b.reduce_add_norm(partial, residual, weight, eps=EPS)
    n2, r2 = rs_ag.reduce_add_norm(partial, residual, weight, eps=EPS)
    n3, r3 = fused_b.done(fused_b.start(partial, residual, weight, eps=EPS, slot=1))
    return n1[None], n2[None], n3[None], r1, r2, r3

  f = jax.jit(_smap(local, (P(AXIS), P(AXIS), P()), (P(AXIS),) * 6))
  k = jax.random.split(jax.random.key(2), 3)
  partial = jax.random.normal(k[0], (TP * tokens, hidden)).astype(ws.dtype)
  residual = jax.random.normal(k[1], (tokens, hidden)).astype(ws.dtype)
  weight = jnp.ones((hidden,), ws.dtype)
  n1, n2, n3, r1, r2, r3 = [np.asarray(x, np.float32) for x in f(partial, residual, weight)]
  for a, b in ((n1, n2), (r1, r2)):
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < TOL[ws.dtype]
  np.testing.assert_array_equal(n1, n3)
  np.testing.assert_array_equal(r1, r3)


# (tokens, algorithm, grid) of the calls each loop iteration makes, in order: every algorithm
# and two sizes, so buffers and barrier words are handed between algorithms back to back.
LOOP_CALLS = ((1000, "two_shot", 16), (20, "one_shot", 4), (257, "two_shot", 4),
              (3, "one_shot", 32))


def _loop_fn(n_iter, cmd_buffer, dtype, calls=LOOP_CALLS):
  """n_iter iterations x len(LOOP_CALLS) calls (H=4096) in one fori_loop; counts elements that
  differ from each call's standalone result (the kernels are deterministic: must stay 0)."""
  hidden = 4096

  def local(w, *args):
    inputs, expected = args[:2 * len(calls)], args[2 * len(calls):]

    def body(i, count):
      for k, (_, algorithm, grid) in enumerate(calls):
        n, _ = _ran(inputs[2 * k], inputs[2 * k + 1], w, eps=EPS,
                                         cmd_buffer=cmd_buffer, **_call_kw(algorithm, grid))
        count = count + jnp.sum(n != expected[k][0])
      return count
    zero = (inputs[0][0, 0] != inputs[0][0, 0]).astype(jnp.int32)  # 0, varying over tp
    return jax.lax.fori_loop(0, n_iter, body, zero)[None]

  spec = (P(),) + (P(AXIS),) * (3 * len(calls))
  return jax.jit(_smap(local, spec, P(AXIS))), hidden


def _handler_counts():
  """(invocations, under capture) of the synchronous handler on rank 0's device so far."""
  return _ws().handler_calls()[MESH.devices.flat[0].local_hardware_id]


def _counted_run(f, *args, counts=_handler_counts):
  """(f(*args), ready; handler invocations during it; of them under capture), from `counts`
  (default: rank 0's device in this process)."""
  before = counts()
  out = jax.block_until_ready(f(*args))
  after = counts()
  return out, after[0] - before[0], after[1] - before[1]


def _loop_check(n_iter, cmd_buffer, dtype, calls=LOOP_CALLS):
  """(elements that differ from the standalone results, (handler invocations, of them under
  capture, calls executed)) of n_iter loop iterations, counted on rank 0's device."""
  f, hidden = _loop_fn(n_iter, cmd_buffer, dtype, calls)
  k = iter(jax.random.split(jax.random.key(3), 2 * len(calls)))
  w = jnp.ones((hidden,), dtype)
  inputs, expected = [], []
  for tokens, algorithm, grid in calls:
    p = jax.random.normal(next(k), (TP * tokens, hidden)).astype(dtype)
    r = jax.random.normal(next(k), (TP * (-(-tokens // TP)), hidden)).astype(dtype)
    kw = _call_kw(algorithm, grid)
    g = jax.jit(_smap(lambda p, r, kw=kw: _ran(p, r, w, eps=EPS, **kw)[0][None],
                      (P(AXIS), P(AXIS)), P(AXIS)))
    inputs += [p, r]
    expected.append(g(p, r))
  compiled = f.lower(w, *inputs, *expected).compile()
  counts, invocations, captured = _counted_run(compiled, w, *inputs, *expected)
  return int(np.asarray(counts).sum()), (invocations, captured, n_iter * len(calls))


def test_10k_calls_alternating_sizes(ws):
  mismatches, _ = _loop_check(2500, cmd_buffer=False, dtype=ws.dtype)
  assert mismatches == 0


def _child(code, env_extra, timeout=300, **fmt):
  env = dict(os.environ, **env_extra)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, "-c", code.format(root=root, **fmt)], env=env,
                        capture_output=True, text=True, timeout=timeout)


def _child_result(r):
  """{key: int} from a child's "RESULT k=v ..." line."""
  assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
  line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


def _check_replay(child_code, label):
  """Runs a child that prints "RESULT mismatches= invocations= captured= executed=": no
  mismatch, and a replayed graph -- the handler ran under capture, and fewer times than the
  calls executed.  Skips when XLA recorded nothing (graph replay then went untested)."""
  res = _child_result(_child(child_code, {}))
  print(label, res)
  assert res["mismatches"] == 0
  if res["captured"] == 0:
    pytest.skip(f"XLA ran the call outside any command buffer: replay untested ({res})")
  assert res["invocations"] < res["executed"], f"recorded but re-recorded at every call: {res}"


CHAIN_CHILD = textwrap.dedent("""
  import sys, numpy as np, jax, jax.numpy as jnp
  sys.path.insert(0, {root!r})
  from tests import test_fused_gpu as t
  from weave_jax.fused import ops
  t.open_ws(t.MESH, max_tokens=4096, hidden=8192, dtype=jnp.bfloat16)
  algos = [("one_shot", 8), ("two_shot", 16), ("one_shot", 32), ("two_shot", 128)] * 4
  def chain(cmd_buffer):
    def local(p, r, w):
      for algorithm, ctas in algos:  # chained by data: each call consumes the last one's outputs
        p, r = t._ran(p, r, w, eps=1e-6, algorithm=algorithm, ctas=ctas,
                                         cmd_buffer=cmd_buffer)
      return p[None], r
    return jax.jit(t._smap(local, (t.P(t.AXIS), t.P(t.AXIS), t.P()), (t.P(t.AXIS), t.P(t.AXIS))))
  plain, graph = chain(False), chain(True)
  w = (1 + 0.1 * jax.random.normal(jax.random.key(0), (8192,))).astype(jnp.bfloat16)
  diffs = invocations = captured = executed = 0
  for i in range(6):  # fresh inputs (new buffers) on even runs, the same ones again on odd runs
    if i % 2 == 0:
      k = jax.random.split(jax.random.key(i + 1), 2)
      p = jax.random.normal(k[0], (t.TP * 32, 8192)).astype(jnp.bfloat16)
      r = jax.random.normal(k[1], (t.TP * -(-32 // t.TP), 8192)).astype(jnp.bfloat16)
    got, n_inv, n_cap = t._counted_run(graph, p, r, w)
    invocations += n_inv
    captured += n_cap
    executed += len(algos)
    want = plain(p, r, w)
    diffs += sum(int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in zip(got, want))
  print(f"RESULT mismatches={{diffs}} invocations={{invocations}} captured={{captured}} "
        f"executed={{executed}}", flush=True)
""")


def _mixed_chains(cmd_buffer, repeats, calls=LOOP_CALLS):
  """jit (w, p_0, r_0, p_1, r_1, ...) -> the final (p_k, r_k) of one chain per entry of `calls`:
  each chain makes `repeats` calls of its size, algorithm and grid, each call consuming the last
  one's outputs (so XLA cannot merge them), the chains' calls interleaved in program order."""
  def local(w, *args):
    state = [list(args[2 * k:2 * k + 2]) for k in range(len(calls))]
    for _ in range(repeats):
      for k, (_, algorithm, grid) in enumerate(calls):
        state[k] = list(_ran(*state[k], w, eps=EPS, cmd_buffer=cmd_buffer,
                                                  **_call_kw(algorithm, grid)))
    return tuple(x[None] for pair in state for x in pair)
  spec = (P(),) + (P(AXIS),) * (2 * len(calls))
  return jax.jit(_smap(local, spec, (P(AXIS),) * (2 * len(calls))))


def _chain_inputs(seed, calls=LOOP_CALLS, hidden=4096, dtype=jnp.bfloat16):
  k = iter(jax.random.split(jax.random.key(seed), 2 * len(calls)))
  out = []
  for tokens, _, _ in calls:
    out.append(jax.random.normal(next(k), (TP * tokens, hidden)).astype(dtype))
    out.append(jax.random.normal(next(k), (TP * -(-tokens // TP), hidden)).astype(dtype))
  return out


CMDBUF_10K_CHILD = textwrap.dedent("""
  import sys, numpy as np, jax, jax.numpy as jnp
  sys.path.insert(0, {root!r})
  from tests import test_fused_gpu as t
  t.open_ws(t.MESH, max_tokens=4096, hidden=4096, dtype=jnp.bfloat16)
  repeats, executions = 25, 100  # 4 chains x 25 calls = 100 calls per execution
  graph, plain = t._mixed_chains(True, repeats), t._mixed_chains(False, repeats)
  w = jnp.ones((4096,), jnp.bfloat16)
  sets = [t._chain_inputs(seed) for seed in (1, 2)]
  want = [[np.asarray(x) for x in plain(w, *inputs)] for inputs in sets]
  diffs = invocations = captured = executed = 0
  for i in range(executions):  # the two input sets alternate
    got, n_inv, n_cap = t._counted_run(graph, w, *sets[i % 2])
    invocations += n_inv
    captured += n_cap
    executed += repeats * len(t.LOOP_CALLS)
    diffs += sum(int(np.sum(np.asarray(a) != b)) for a, b in zip(got, want[i % 2]))
  print(f"RESULT mismatches={{diffs}} invocations={{invocations}} captured={{captured}} "
        f"executed={{executed}}", flush=True)
""")


def test_10k_calls_under_command_buffers():
  """10,000 calls through the command-buffer target under XLA's default command-buffer flags:
  100 executions of one program of 100 calls (four chains of different sizes, algorithms and
  grids, interleaved), with two input sets alternating; every execution's outputs bitwise equal
  to the plain target's, and the recorded graph replayed (the kernels' device-side epochs carry
  every replay).  (A fori_loop of these calls is not converted to a command buffer by XLA on JAX
  0.11.2, even with WHILE enabled: its handler ran outside capture at every iteration.)"""
  _check_replay(CMDBUF_10K_CHILD, "command-buffer 10k:")


PENDING_CHILD = textwrap.dedent("""
  import sys, numpy as np, jax, jax.numpy as jnp
  sys.path.insert(0, {root!r})
  from tests import test_fused_gpu as t
  from weave_jax.fused import ops
  t.open_ws(t.MESH, max_tokens=64, hidden=1024, dtype=jnp.bfloat16)
  def program(cmd_buffer):
    def local(p, r, w):  # start, then 6 chained synchronous calls (a graph's worth), then done
      pend = t._start(p, r, w, eps=1e-6, slot=0, algorithm="two_shot", ctas=32)
      pend, n2 = jax.lax.optimization_barrier((pend, p))
      r2 = r
      for _ in range(6):
        n2, r2 = t._ran(n2, r2, w, eps=1e-6, algorithm="two_shot", ctas=32,
                                           cmd_buffer=cmd_buffer)
      n1, _ = ops.fused_done(pend, p, r, w, slot=0)
      return n1[None], n2[None]
    return jax.jit(t._smap(local, (t.P(t.AXIS), t.P(t.AXIS), t.P()), (t.P(t.AXIS), t.P(t.AXIS))))
  p = jax.random.normal(jax.random.key(0), (t.TP * 64, 1024)).astype(jnp.bfloat16)
  r = jax.random.normal(jax.random.key(1), (t.TP * 32, 1024)).astype(jnp.bfloat16)
  w = jnp.ones((1024,), jnp.bfloat16)
  n1, n2 = program(False)(p, r, w)
  ref = jax.jit(t._smap(lambda p, r, w: t._ran(
      p, r, w, eps=1e-6, algorithm="two_shot", ctas=32, cmd_buffer=False)[0][None],
      (t.P(t.AXIS), t.P(t.AXIS), t.P()), t.P(t.AXIS)))(p, r, w)
  print("PLAIN", int(np.sum(np.asarray(n1) != np.asarray(ref))), flush=True)
  try:
    jax.block_until_ready(program(True)(p, r, w))
    print("GRAPH RAN", t._handler_counts(), flush=True)
  except Exception as e:
    print("GRAPH ERROR", str(e)[:2000], flush=True)
""")


def test_recorded_call_refuses_a_pending_start():
  """A synchronous call recorded into a CUDA graph while a fused_start is pending could not wait
  for the side stream (the plain target waits): the handler must return an error, not race.
  In the plain program the start's result equals a standalone call's (the synchronous calls
  after it waited for it)."""
  r = _child(PENDING_CHILD, {})
  out = r.stdout + r.stderr
  print(r.stdout[-1500:])
  assert "PLAIN 0" in r.stdout, out[-4000:]
  if "GRAPH RAN" in r.stdout:
    pytest.skip(f"XLA did not record the calls into a command buffer: {r.stdout[-300:]}")
  assert "GRAPH ERROR" in r.stdout and "fused_start) is pending" in r.stdout, out[-4000:]


def test_command_buffer_chain_matches_plain_target():
  """16 chained calls (one-shot and two-shot, four grids) through the command-buffer target
  under XLA's default command-buffer flags, bitwise equal to the plain target's results, over
  runs with fresh inputs and repeated inputs; the graph must be replayed, not re-recorded at
  every call."""
  _check_replay(CHAIN_CHILD, "command-buffer chain:")


TIMEOUT_CHILD = textwrap.dedent("""
  import sys, jax, jax.numpy as jnp
  sys.path.insert(0, {root!r})
  from weave_jax import fused
  from weave_jax.fused import ops
  gpus = jax.devices("gpu")[:2]
  ws = fused.Workspace(gpus, max_tokens=64, hidden=1024, dtype=jnp.bfloat16, timeout_ms=300)
  ws.open()
  algorithm = {algorithm!r}
  # only rank 0 launches: rank 1 is left out, so rank 0's start barrier must time out
  x = jax.device_put(jnp.ones((64, 1024), jnp.bfloat16), gpus[0])
  r = jax.device_put(jnp.ones((32, 1024), jnp.bfloat16), gpus[0])
  w = jax.device_put(jnp.ones((1024,), jnp.bfloat16), gpus[0])
  f = jax.jit(lambda x, r, w: ops.fused_reduce_add_norm(x, r, w, eps=1e-6, workspace=ws, ctas=2,
                                                        ce_ctas=2, algorithm=algorithm))
  try:
    with ws.raise_on_timeout():
      jax.block_until_ready(f(x, r, w))
  except fused.FusedTimeoutError as e:
    print("TIMEOUT-ERROR:", e, flush=True)
    import os; os._exit(0)
  print("no error raised", flush=True)
  import os; os._exit(1)
""")


@pytest.mark.parametrize("algorithm, barrier",
                         [("two_shot", 0), ("copy_engine", 2), ("one_shot", 4)])
def test_timeout_names_rank_and_barrier(algorithm, barrier):
  r = _child(TIMEOUT_CHILD, {}, timeout=120, algorithm=algorithm)
  out = r.stdout + r.stderr
  assert "TIMEOUT-ERROR:" in out, out[-4000:]
  assert ("rank 0" in out and f"barrier {barrier}" in out and "waiting for rank 1" in out), out[-4000:]


def test_bad_inputs_raise_before_launch(ws):
  good = dict(partial=jnp.zeros((64, 1024), ws.dtype),
              residual=jnp.zeros((-(-64 // TP), 1024), ws.dtype), weight=jnp.zeros((1024,), ws.dtype))
  other = jnp.float16 if ws.dtype == jnp.bfloat16 else jnp.bfloat16
  bad = [
      (dict(partial=jnp.zeros((MAX_TOKENS + 2, 1024), ws.dtype),
            residual=jnp.zeros((-(-(MAX_TOKENS + 2) // TP), 1024), ws.dtype)), "tokens="),
      (dict(partial=jnp.zeros((64, 1020), ws.dtype),
            residual=jnp.zeros((-(-64 // TP), 1020), ws.dtype),
            weight=jnp.zeros((1020,), ws.dtype)), "hidden=1020"),
      (dict(residual=jnp.zeros((-(-64 // TP), 1024), other)), "dtype"),
  ]
  for override, msg in bad:
    args = dict(good, **override)
    with pytest.raises((ValueError, TypeError), match=msg):
      _ran(args["partial"], args["residual"], args["weight"], eps=EPS)
  with pytest.raises(ValueError, match="ctas=129"):
    _ran(**good, eps=EPS, ctas=129)
  with pytest.raises(ValueError, match="one_shot' needs tokens"):
    _ran(jnp.zeros((ONE_SHOT_ROWS + 1, 1024), ws.dtype),
                              jnp.zeros((-(-(ONE_SHOT_ROWS + 1) // TP), 1024), ws.dtype),
                              good["weight"], eps=EPS, algorithm="one_shot")
  # nothing launched: a real call afterwards still pairs with the peer
  mism, _ = _loop_check(2, cmd_buffer=False, dtype=ws.dtype)
  assert mism == 0


def test_on_stream_variant(ws):
  tokens, hidden = 1024, 2048

  def local(partial, residual, weight):
    a = _ran(partial, residual, weight, eps=EPS, ctas=8)
    b = ops.on_stream(functools.partial(ops.fused_reduce_add_norm, eps=EPS, ctas=8))(
        partial, residual, weight)
    return a[0][None], b[0][None]

  f = jax.jit(_smap(local, (P(AXIS), P(AXIS), P()), (P(AXIS),) * 2))
  k = jax.random.split(jax.random.key(5), 2)
  partial = jax.random.normal(k[0], (TP * tokens, hidden)).astype(ws.dtype)
  residual = jax.random.normal(k[1], (tokens, hidden)).astype(ws.dtype)
  a, b = f(partial, residual, jnp.ones((hidden,), ws.dtype))
  np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("algorithm, ctas", [("two_shot", 8), ("one_shot", 4)])
def test_phase_stamps(ws, algorithm, ctas):
  from weave_jax.fused import phases

  tokens = 24 if algorithm == "one_shot" else 2048
  check = _check_fn(tokens, 4096, ws.dtype, ctas, algorithm)
  jax.block_until_ready(check(jax.random.key(0)))  # compiled, stamps still off
  phases.enable(ws, True)
  rel, *_ = jax.device_get(check(jax.random.key(1)))
  stamps = phases.read(ws)
  phases.enable(ws, False)
  assert rel < TOL[ws.dtype]  # stamping does not change the results
  n = len(phases.POINTS[algorithm])
  assert set(stamps) == set(ws.ordinals)
  for arr in stamps.values():
    assert (arr[:ctas, :n] > 0).all(), arr[:ctas]              # every block, every point
    assert (np.diff(arr[:ctas, :n].astype(np.int64), axis=1) >= 0).all()
    assert (arr[ctas:] == 0).all() and (arr[:, n:] == 0).all()  # nothing else written
  summary = phases.summary(stamps, algorithm)
  assert list(summary) == list(phases.POINTS[algorithm][1:]) + ["span"]
  assert summary["span"] > 0
  # off again: a further call leaves the stamps alone
  jax.block_until_ready(check(jax.random.key(2)))
  after = phases.read(ws)
  assert all((after[o] == stamps[o]).all() for o in stamps)


def test_closed_workspace_raises_and_reopens(ws):
  ws.close()
  try:
    with pytest.raises(RuntimeError, match="the workspace is not open"):
      _ran(jnp.zeros((4, 1024), ws.dtype), jnp.zeros((2, 1024), ws.dtype),
           jnp.zeros((1024,), ws.dtype), eps=EPS)
  finally:
    ws.open()
  mism, _ = _loop_check(2, cmd_buffer=False, dtype=ws.dtype)
  assert mism == 0


# The calls of CE_CHILD's mixed loop: copy-engine calls between the kernels' algorithms, so a
# copy waiting behind a peer's spinning kernel (the old protocol's deadlock) would show.
CE_LOOP_CALLS = ((1000, "copy_engine:4", 64), (20, "one_shot", 4), (257, "two_shot", 4),
                 (3, "copy_engine", 2), (2048, "two_shot", 32), (4096, "copy_engine:32", 16),
                 (1001, "copy_engine:2", 16), (77, "copy_engine", 132))

CE_CHILD = textwrap.dedent("""
  import os, sys, numpy as np, jax, jax.numpy as jnp
  sys.path.insert(0, {root!r})
  from tests import test_fused_gpu as t
  from weave_jax.fused import ops
  t.open_ws(t.MESH, max_tokens=4096, hidden=8192, dtype=jnp.bfloat16, timeout_ms=5000)
  # back to back: 128 chained tiny calls, 3 times
  def local(p, r, w):
    for _ in range(128):
      p, r = t._ran(p, r, w, eps=1e-6, algorithm="copy_engine", ce_ctas=132)
    return p[None], r
  f = jax.jit(t._smap(local, (t.P(t.AXIS), t.P(t.AXIS), t.P()), (t.P(t.AXIS), t.P(t.AXIS))))
  p = jnp.ones((t.TP * 8, 8192), jnp.bfloat16)
  r = jnp.ones((t.TP * -(-8 // t.TP), 8192), jnp.bfloat16)
  with t._ws().raise_on_timeout():
    for _ in range(3):
      jax.block_until_ready(f(p, r, jnp.ones((8192,), jnp.bfloat16)))
    print("BACK-TO-BACK OK", flush=True)
    print("MIXED", t._loop_check(2000, cmd_buffer=False, dtype=jnp.bfloat16,
                                 calls=t.CE_LOOP_CALLS)[0], flush=True)
  os._exit(0)
""")


def test_copy_engine_back_to_back_and_mixed():
  """Chained copy-engine calls, and 10,000 calls mixing it with the kernels' algorithms in one
  jitted loop (mismatches against each call's standalone result must be 0), in a child process
  with a 5 s rendezvous timeout and a 300 s limit, so a hang fails the test instead of the run."""
  r = _child(CE_CHILD, {}, timeout=300)
  out = r.stdout + r.stderr
  assert "BACK-TO-BACK OK" in r.stdout, out[-4000:]
  assert "MIXED 0" in r.stdout, out[-4000:]


TWO_WS_CHILD = textwrap.dedent("""
  import sys, numpy as np, jax, jax.numpy as jnp
  sys.path.insert(0, {root!r})
  from jax.sharding import Mesh, PartitionSpec as P
  from weave_jax import ops, Workspace
  gpus = jax.devices("gpu")
  pairs = [gpus[0:2], gpus[2:4]]
  hidden = [1024, 2048]
  wss = [Workspace(p, max_tokens=256, hidden=h, copy_engine=False).open()
         for p, h in zip(pairs, hidden)]
  try:
    Workspace(gpus[1:3], max_tokens=256, hidden=1024, copy_engine=False).open()
    print("OVERLAP NOT REFUSED", flush=True)
  except ValueError as e:
    print("OVERLAP REFUSED", e, flush=True)
  def check(k):
    mesh, ws, h = Mesh(np.array(pairs[k]), ("tensor",)), wss[k], hidden[k]
    def local(p, r, w):
      n, _ = ops.reduce_add_norm(p, r, w, eps=1e-6, axis_name="tensor", backend="fused_p2p",
                                 workspace=ws)
      m, _ = ops.reduce_add_norm(p, r, w, eps=1e-6, axis_name="tensor", backend="rs_ag")
      return n[None], m[None]
    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("tensor"), P("tensor"), P()),
                              out_specs=(P("tensor"), P("tensor"))))
    key = jax.random.split(jax.random.key(k), 2)
    p = jax.random.normal(key[0], (2 * 64, h)).astype(jnp.bfloat16)
    r = jax.random.normal(key[1], (64, h)).astype(jnp.bfloat16)
    n, m = (np.asarray(x, np.float32) for x in ops.run_checked(f, p, r, jnp.ones((h,),
                                                               jnp.bfloat16), workspace=ws))
    return float(np.linalg.norm(n - m) / np.linalg.norm(m))
  print("REL", check(0), check(1), flush=True)
  wss[0].close()
  print("AFTER CLOSE", check(1), flush=True)
  wss[1].close()
""")


def test_two_workspaces_in_one_process():
  """Two TP=2 workspaces on disjoint GPU pairs in one process: each runs the public op on its
  own mesh (axis "tensor") against rs_ag; a third on an overlapping pair is refused; closing
  one leaves the other working."""
  if len(_gpus()) < 4:
    pytest.skip("needs 4 CUDA GPUs (two disjoint pairs)")
  r = _child(TWO_WS_CHILD, {}, timeout=300)
  out = r.stdout + r.stderr
  assert r.returncode == 0, out[-4000:]
  assert "OVERLAP REFUSED" in r.stdout and "belongs to another open workspace" in r.stdout, out
  rel = [float(x) for x in next(l for l in r.stdout.splitlines() if l.startswith("REL")).split()[1:]]
  after = float(next(l for l in r.stdout.splitlines() if l.startswith("AFTER CLOSE")).split()[-1])
  assert max(rel + [after]) < TOL[jnp.dtype(jnp.bfloat16)], out[-2000:]

"""One process per GPU (jax.distributed): the workspace's CUDA IPC path on real GPUs.

Each rank is a child process that owns one GPU, exchanges IPC handles through the distributed
runtime's key-value store, passes the write/read-back probe, and runs the fused kernels against
XLA psum + float32 RMSNorm (the checks of ``test_fused_gpu._check_fn``), start/done included,
and a chain of calls recorded into CUDA graphs and replayed, bitwise equal to the plain target.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import gpu_count, gpu_tp

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RANK_CHILD = textwrap.dedent("""
  import sys
  rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  import jax
  jax.distributed.initialize(coordinator_address=f"localhost:{{port}}", num_processes=world,
                             process_id=rank, local_device_ids=[rank])
  import jax.numpy as jnp, numpy as np
  sys.path.insert(0, {root!r})
  from jax.sharding import NamedSharding, PartitionSpec as P
  from tests import test_fused_gpu as t
  assert jax.process_count() == world and len(jax.local_devices()) == 1
  ws = t.open_ws(t.MESH, max_tokens=t.MAX_TOKENS, hidden=t.MAX_HIDDEN, dtype=jnp.bfloat16,
                 timeout_ms=20000)
  assert not ws.copy_engine  # one process per GPU: the copy engines cannot run
  print("WORKSPACE", ws.mode, ws.peer_ok, ws.probe_message, flush=True)
  rep = NamedSharding(t.MESH, P())
  for case in {cases!r}:
    tokens, hidden, ctas, algorithm = case
    check = jax.jit(t._check_fn(tokens, hidden, jnp.bfloat16, ctas, algorithm),
                    out_shardings=(rep,) * 4)
    rel, rel_res, nans, cross = (float(x) for x in check(jax.random.key(sum(case[:3]))))
    tol = t.TOL[jnp.dtype(jnp.bfloat16)]
    ok = rel < tol and rel_res < tol and nans == 0 and cross == 0
    print("CASE", case, "ok" if ok else "BAD", rel, rel_res, nans, cross, flush=True)
  # the copy engines need one process driving every GPU: refused before any launch
  try:
    t._ran(jnp.zeros((8, 1024), jnp.bfloat16), jnp.zeros((-(-8 // world), 1024), jnp.bfloat16),
           jnp.zeros((1024,), jnp.bfloat16), eps=1e-6, algorithm="copy_engine")
    print("COPY-ENGINE NOT REFUSED", flush=True)
  except ValueError as e:
    print("COPY-ENGINE REFUSED", e, flush=True)
  # CUDA graphs: a 16-call chain through the command-buffer target, replayed, bitwise equal to
  # the plain target's (inputs drawn inside the program from a key: every rank passes the same)
  algos = [("one_shot", 8), ("two_shot", 16), ("one_shot", 32), ("two_shot", 128)] * 4
  def chain(cmd_buffer):
    def local(key):
      k = jax.random.fold_in(key, jax.lax.axis_index(t.AXIS))
      p = jax.random.normal(k, (32, 4096)).astype(jnp.bfloat16)
      r = jax.random.normal(jax.random.fold_in(k, 1), (-(-32 // world), 4096)).astype(jnp.bfloat16)
      w = (1 + 0.1 * jax.random.normal(key, (4096,))).astype(jnp.bfloat16)
      for algorithm, ctas in algos:
        p, r = t._ran(p, r, w, eps=1e-6, algorithm=algorithm, ctas=ctas, cmd_buffer=cmd_buffer)
      return p[None], r[None]
    return jax.jit(jax.shard_map(local, mesh=t.MESH, in_specs=(P(),), out_specs=(P(t.AXIS),) * 2,
                                 check_vma=False))
  graph, plain = chain(True), chain(False)
  local_data = lambda xs: [np.asarray(x.addressable_shards[0].data) for x in xs]
  counts = lambda: next(iter(ws.handler_calls().values()))
  diffs = invocations = captured = executed = 0
  for i in range(6):
    key = jax.random.key(i % 2)
    out, n_inv, n_cap = t._counted_run(graph, key, counts=counts)
    got = local_data(out)
    invocations += n_inv
    captured += n_cap
    executed += len(algos)
    diffs += sum(int(np.sum(a != b)) for a, b in zip(got, local_data(plain(key))))
  print(f"GRAPH mismatches={{diffs}} invocations={{invocations}} captured={{captured}} "
        f"executed={{executed}}", flush=True)
  print("RANK DONE", rank, flush=True)
""")

# (tokens, hidden, ctas, algorithm): the kernels' algorithms that run through peer pointers,
# edge sizes included (a token count not divisible by the world size, a 1-row call)
CASES = [(1, 1024, 2, "one_shot"), (24, 8192, 16, "one_shot"), (1, 1024, 2, "two_shot"),
         (3001, 8192, 32, "two_shot"), (4096, 4096, 128, "two_shot"), (777, 2048, 7, "two_shot")]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_one_process_per_gpu_ipc_workspace():
  world = gpu_tp()
  if gpu_count() < world:
    pytest.skip(f"needs {world} GPUs")
  env = dict(os.environ, WEAVE_TEST_TP=str(world), XLA_PYTHON_CLIENT_MEM_FRACTION="0.1")
  env.pop("XLA_FLAGS", None)  # no virtual CPU devices in the children
  code, port = RANK_CHILD.format(root=ROOT, cases=CASES), str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(world), port], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for r in range(world)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=400)[0])
  finally:
    for p in procs:
      p.kill()
  for r, (p, out) in enumerate(zip(procs, outs)):
    tail = out[-4000:]
    assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{tail}"
    assert "WORKSPACE ipc True ipc write/read-back probe passed" in out, tail
    cases = [line for line in out.splitlines() if line.startswith("CASE")]
    assert len(cases) == len(CASES) and all(" ok " in c for c in cases), tail
    assert "COPY-ENGINE REFUSED" in out and "copy_engine=True" in out, tail
    assert f"RANK DONE {r}" in out, tail
  graphs = []
  for out in outs:
    line = next(l for l in out.splitlines() if l.startswith("GRAPH "))
    graphs.append({k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])})
  print("IPC command-buffer chain per rank:", graphs)
  for g in graphs:
    assert g["mismatches"] == 0, graphs
    assert g["captured"] == 0 or g["invocations"] < g["executed"], f"re-recorded: {graphs}"
  if any(g["captured"] == 0 for g in graphs):
    pytest.skip(f"XLA ran the IPC chain outside command buffers: graph replay untested ({graphs})")

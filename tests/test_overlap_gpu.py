"""GPU: the compiled woven program really places one half's collective around the other half's
compute.  Needs 2 GPUs; skipped with fewer."""
import pytest

from conftest import gpu_count
from weave_jax import Engine, RunConfig, hlo_order, init_random, make_mesh, preset

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model_and_mesh():
  if gpu_count() < 2:
    pytest.skip("needs 2 GPUs")
  cfg = preset("llama-3.1-8b", num_layers=2)
  mesh = make_mesh(2)
  return init_random(cfg, mesh), mesh


@pytest.mark.parametrize("backend", ["psum", "rs_ag"])
def test_half_a_collective_spans_half_b_compute(model_and_mesh, backend):
  model, mesh = model_and_mesh
  eng = Engine(model, mesh, RunConfig(backend=backend, weave=True, weave_min_tokens=1024,
                                      logits="last"))
  plan, exe = eng.compiled(4096)
  assert plan.split is not None
  windows = hlo_order.collective_windows(exe.as_text())
  spanning = [w for w in windows
              if "comm_A" in w.scope and any("half_B" in b for b in w.between)]
  # At least one of A's collectives per layer starts before a GEMM/attention of half B and is
  # done after it.
  assert len(spanning) >= 2, hlo_order.summary(exe.as_text())


def test_unsplit_baseline_has_nothing_between(model_and_mesh):
  model, mesh = model_and_mesh
  _, exe = Engine(model, mesh, RunConfig(backend="psum", logits="last")).compiled(4096)
  windows = hlo_order.collective_windows(exe.as_text())
  assert windows and all(w.compute_between == 0 for w in windows)

"""TP 1/2/4/8 on virtual CPU devices: every collective backend equals TP=1, ``nocomm`` does not,
and the woven schedule equals the unsplit one for every XLA backend (odd token counts, packed
prompts straddling the split).

Engines and their logits are cached per (model, TP, RunConfig, batch), so each shape compiles
once for the whole module.
"""
import numpy as np
import pytest
from conftest import rel_err
from flax import nnx

from weave_jax import Engine, RunConfig, init_random, make_mesh, preset
from weave_jax.config import ModelConfig
from weave_jax.sharding import shard_state

MODELS = {
    "dense": preset("tiny"),
    # Mixtral-style, one layer (still 3 chained stages): 8 experts (divisible by TP 8), top-2.
    "moe": ModelConfig("mixtral", 512, 128, 64, 1, 16, 8, 16, 1e-5, 10000.0, num_experts=8,
                       experts_per_token=2, dtype="float32"),
}
TPS = (1, 2, 4, 8)
TOKEN_COUNTS = (1, 7, 37)
N_WEAVE = 37
PACKED_SEGMENTS = np.repeat([0, 1, 2], [11, 18, 8])      # 37 tokens; split=16 cuts segment 1
PACKED_SPLIT = 16                                         # a multiple of every TP size
_rng = np.random.RandomState(0)
TOKENS = {n: _rng.randint(0, 512, n) for n in TOKEN_COUNTS}


@pytest.fixture(scope="module")
def runner():
  """run(model, tp, RunConfig, n, packed) -> (logits, plan), cached across the module."""
  base = {name: init_random(cfg, make_mesh(1), seed=1) for name, cfg in MODELS.items()}
  models, engines, results = {}, {}, {}

  def model_at(name, tp):
    if (name, tp) not in models:
      graphdef, state = nnx.split(base[name])        # same weights, resharded: no re-init
      models[(name, tp)] = nnx.merge(graphdef, shard_state(state, make_mesh(tp)))
    return models[(name, tp)]

  def run(name, tp, cfg: RunConfig, n, packed=False):
    key = (name, tp, cfg, n, packed)
    if key not in results:
      if (name, tp, cfg) not in engines:
        engines[(name, tp, cfg)] = Engine(model_at(name, tp), make_mesh(tp), cfg)
      eng = engines[(name, tp, cfg)]
      seg = PACKED_SEGMENTS if packed else None
      results[key] = (np.asarray(eng(TOKENS[n], segment_ids=seg)), eng.plan(n))
    return results[key]

  return run


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("n", TOKEN_COUNTS)
@pytest.mark.parametrize("tp", TPS[1:])
@pytest.mark.parametrize("backend", ["psum", "rs_ag"])
def test_collectives_match_tp1(runner, model, n, tp, backend):
  ref, _ = runner(model, 1, RunConfig(), n)
  out, _ = runner(model, tp, RunConfig(backend=backend), n)
  assert out.shape == (n, MODELS[model].vocab_size)
  assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("tp", TPS[1:])
def test_nocomm_differs(runner, model, tp):
  """Proves the comparison above sees the communication: dropping it changes the logits."""
  ref, _ = runner(model, 1, RunConfig(), N_WEAVE)
  out, _ = runner(model, tp, RunConfig(backend="nocomm"), N_WEAVE)
  assert rel_err(out, ref) > 1e-2


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("tp", TPS)
@pytest.mark.parametrize("backend", ["psum", "rs_ag", "nocomm"])
@pytest.mark.parametrize("packed", [False, True], ids=["odd", "packed_straddle"])
def test_weave_equals_unsplit(runner, model, tp, backend, packed):
  split = PACKED_SPLIT if packed else None      # explicit offset / wave-aware default
  unsplit, plan_u = runner(model, tp, RunConfig(backend=backend), N_WEAVE, packed)
  woven, plan_w = runner(model, tp, RunConfig(backend=backend, weave=True, weave_min_tokens=2,
                                              split=split), N_WEAVE, packed)
  assert plan_u.split is None and plan_w.split is not None, "the batch was not woven"
  if packed:
    assert plan_w.split == PACKED_SPLIT
    assert PACKED_SEGMENTS[plan_w.split - 1] == PACKED_SEGMENTS[plan_w.split]
  assert rel_err(woven, unsplit) < 1e-5


def test_packed_equals_separate(runner):
  """Packed prompts at TP=4 (woven, split inside a prompt) equal each prompt run alone at TP=1."""
  packed, _ = runner("dense", 4, RunConfig(backend="rs_ag", weave=True, weave_min_tokens=2,
                                           split=PACKED_SPLIT), N_WEAVE, True)
  mesh = make_mesh(1)
  engine = Engine(init_random(MODELS["dense"], mesh, seed=1), mesh)
  bounds = np.r_[0, np.cumsum(np.bincount(PACKED_SEGMENTS))]
  toks = TOKENS[N_WEAVE]
  alone = [np.asarray(engine(toks[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
  assert rel_err(packed, np.concatenate(alone)) < 1e-5

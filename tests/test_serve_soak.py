"""Soak: 2,000 requests of random lengths through one small engine, arriving while others run,
with a page pool far too small for them all (preemption by recompute all along).

Every request must finish exactly once with what it generates when run alone.  The reference is
cheap: the requests draw their prompts from 64 distinct ones and differ in max_tokens, and a
greedy continuation cut at max_tokens is the prefix of the longest one, so 64 requests run
alone (one at a time through the same engine) give every reference.  Afterwards every page is
free again.
"""
import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from weave_jax import ModelConfig, abstract_model, make_mesh
from weave_jax.serve.llm import LLM
from weave_jax.serve.sampling_params import SamplingParams
from weave_jax.sharding import logical_to_spec

N_REQUESTS = 2000
N_PROMPTS = 64
MAX_TOKENS = 12
CFG = ModelConfig("llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=1,
                  num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32")


def numpy_random_model(cfg: ModelConfig, mesh, seed: int = 0):
  """Random weights drawn by numpy and placed sharded (XLA on CPU takes far longer to compile
  ``init_random``'s program than this test spends serving): matrices ~ N(0, 1/fan_in), vectors
  (norm weights) ~ 1 + N(0, 0.1^2)."""
  graphdef, abstract = nnx.split(abstract_model(cfg))
  rng = np.random.default_rng(seed)

  def fill(var):
    shape = (var.get_value() if hasattr(var, "get_value") else var.value).shape
    noise = rng.standard_normal(shape).astype(np.float32)
    value = 1 + 0.1 * noise if len(shape) == 1 else noise * shape[0] ** -0.5
    spec = logical_to_spec(var.get_metadata()["axes"])
    return var.replace(jax.device_put(value.astype(cfg.dtype), NamedSharding(mesh, spec)))

  state = jax.tree.map(fill, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


def test_soak_2000_requests_equal_alone_runs_and_free_every_page():
  llm = LLM(numpy_random_model(CFG, make_mesh(1)), tp=1, backend="psum", weave=False,
            max_model_len=64, page_size=4, num_pages=40, max_num_batched_tokens=32,
            max_num_seqs=16, compile_ahead=False)
  free_at_start = llm.scheduler.blocks.num_free_pages
  rng = np.random.RandomState(0)
  prompts = [rng.randint(0, CFG.vocab_size, rng.randint(1, 41)).tolist()
             for _ in range(N_PROMPTS)]
  greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
  alone = [llm.generate([p], greedy, progress=False)[0].token_ids for p in prompts]

  which = rng.randint(0, N_PROMPTS, N_REQUESTS)
  max_tokens = rng.randint(1, MAX_TOKENS + 1, N_REQUESTS)
  ids = {}
  added = 0
  while added < N_REQUESTS or llm.has_unfinished:
    if added < N_REQUESTS:                      # arrivals in bursts while others run
      for _ in range(min(rng.randint(0, 40), N_REQUESTS - added)):
        params = SamplingParams(temperature=0, max_tokens=int(max_tokens[added]),
                                ignore_eos=True)
        ids[llm.add_request(prompts[which[added]], params)] = added
        added += 1
    llm.step()
  assert len(ids) == N_REQUESTS
  outputs = {rid: llm.output(rid) for rid in ids}      # raises KeyError for a lost request
  for rid, i in ids.items():
    out = outputs[rid]
    assert out.finish_reason == "length"
    assert out.token_ids == alone[which[i]][:max_tokens[i]], f"request {i}"
  assert llm.scheduler.num_preemptions > 100
  assert llm.scheduler.blocks.num_free_pages == free_at_start
  assert not llm.scheduler.running and not llm.scheduler.waiting

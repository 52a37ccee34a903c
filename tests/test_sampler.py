"""The on-device sampler: greedy, top-k = 1, seeds, and the distribution of temperature / top-k /
top-p draws against the exact one (chi-square)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from weave_jax.serve import sampler

_sample = jax.jit(sampler.sample)


def draw(logits, temperature=1.0, top_k=-1, top_p=1.0, seeds=0, steps=None):
  """Rows of ``logits`` (R, V) with per-row params broadcast from scalars."""
  r = logits.shape[0]
  full = lambda x, dt: np.broadcast_to(np.asarray(x, dt), (r,)).copy()
  steps = np.arange(r) if steps is None else steps
  tokens, logprobs = _sample(jnp.asarray(logits, jnp.float32), full(temperature, np.float32),
                             full(top_k, np.int32), full(top_p, np.float32),
                             full(seeds, np.uint32), full(steps, np.int32))
  return np.asarray(tokens), np.asarray(logprobs)


def log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def expected_probs(logits, temperature, top_k, top_p):
  """vLLM's order: temperature, top-k, then top-p over the renormalised softmax."""
  p = np.exp(log_softmax(np.asarray(logits) / temperature))
  order = np.argsort(-p, kind="stable")
  keep = np.zeros_like(p, bool)
  keep[order[:top_k if top_k > 0 else p.size]] = True
  q = np.where(keep, p, 0)
  q /= q.sum()
  before = np.cumsum(q[order]) - q[order]
  keep_p = np.zeros_like(keep)
  keep_p[order[(before < top_p) | (np.arange(p.size) == 0)]] = True
  q = np.where(keep & keep_p, q, 0)
  return q / q.sum()


@pytest.fixture(scope="module")
def logits():
  return np.random.RandomState(0).randn(64, 300).astype(np.float32) * 3


def test_greedy_is_argmax_with_raw_logprob(logits):
  tokens, logprobs = draw(logits, temperature=0.0)
  np.testing.assert_array_equal(tokens, logits.argmax(-1))
  want = log_softmax(logits)[np.arange(64), tokens]
  np.testing.assert_allclose(logprobs, want, rtol=1e-5, atol=1e-5)


def test_top_k_one_equals_greedy(logits):
  tokens, _ = draw(logits, temperature=1.3, top_k=1, seeds=np.arange(64))
  np.testing.assert_array_equal(tokens, logits.argmax(-1))


def test_same_seed_same_tokens_other_seed_other_tokens(logits):
  a, la = draw(logits, temperature=1.0, seeds=7)
  b, lb = draw(logits, temperature=1.0, seeds=7)
  c, _ = draw(logits, temperature=1.0, seeds=8)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  assert (a != c).mean() > 0.5                      # 300 tokens, flat-ish: seeds must matter


def test_row_does_not_depend_on_its_neighbours(logits):
  """A request's draw is a function of its seed and step, not of the batch it shares."""
  full, _ = draw(logits, temperature=1.0, seeds=np.arange(64), steps=np.full(64, 5))
  alone, _ = draw(logits[10:11], temperature=1.0, seeds=10, steps=np.array([5]))
  assert full[10] == alone[0]


def test_logprob_is_of_the_tempered_distribution(logits):
  tokens, logprobs = draw(logits, temperature=0.7, top_p=0.5, seeds=3)
  want = log_softmax(logits / 0.7)[np.arange(64), tokens]
  np.testing.assert_allclose(logprobs, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, -1, 0.8),
                                                     (1.5, 4, 1.0), (0.9, 5, 0.7)])
def test_distribution_chi_square(temperature, top_k, top_p):
  """20000 draws from one logit vector (one seed, steps 0..N-1) against the exact law."""
  vec = np.array([2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, 0.8], np.float32)
  n = 20000
  tokens, _ = draw(np.broadcast_to(vec, (n, vec.size)), temperature, top_k, top_p, seeds=1234)
  want = expected_probs(vec, temperature, top_k, top_p)
  counts = np.bincount(tokens, minlength=vec.size)
  assert counts[want == 0].sum() == 0, f"filtered tokens drawn: {counts} vs {want}"
  live = want > 0
  p = stats.chisquare(counts[live], want[live] * n).pvalue
  assert p > 1e-3, f"counts {counts} vs expected {want * n} (p={p:.2e})"


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_cheaper_modes_equal_filtered_where_chosen(logits, temperature):
  """The runner runs "sample" (no sort) or "greedy" (no draw) when ``mode_for`` picks them:
  on such rows they give the filtered mode's tokens and logprobs."""
  args = (jnp.asarray(logits), jnp.full(64, temperature), jnp.full(64, -1, jnp.int32),
          jnp.ones(64), jnp.full(64, 5, jnp.uint32), jnp.arange(64, dtype=jnp.int32))
  cheap = "greedy" if temperature == 0 else "sample"
  a = jax.jit(lambda *x: sampler.sample(*x, mode="filtered"))(*args)
  b = jax.jit(lambda *x: sampler.sample(*x, mode=cheap))(*args)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_allclose(a[1], b[1], rtol=1e-6)


def test_mode_for():
  from weave_jax.serve import SamplingParams
  v = 300
  assert sampler.mode_for([SamplingParams(temperature=0.0, top_k=5)], v) == "greedy"
  assert sampler.mode_for([SamplingParams(), SamplingParams(top_k=v)], v) == "sample"
  mixed = [SamplingParams(temperature=0.0), SamplingParams(top_k=5)]
  assert sampler.mode_for(mixed, v) == "filtered"
  assert sampler.mode_for([SamplingParams(top_p=0.9)], v) == "filtered"
  with pytest.raises(ValueError, match="mode"):
    sampler.sample(*([jnp.zeros((1, 4))] + [jnp.zeros(1)] * 5), mode="nucleus")

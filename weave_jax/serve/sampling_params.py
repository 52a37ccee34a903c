"""How one request samples its tokens (vLLM's ``SamplingParams``, the fields this engine uses)."""
from __future__ import annotations

import dataclasses
import numbers

from weave_jax.checks import is_int


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 = greedy; top_k -1 = off; top_p 1.0 = off; seed None = the engine derives one
  from its own seed and the request id.

  A request stops at ``max_tokens`` generated tokens, at the model's EOS (unless
  ``ignore_eos``), at any of ``stop_token_ids`` (kept in the output, as EOS is), or when
  prompt + output reach the engine's ``max_model_len``.  ``logprobs``: return the log-probability
  of each sampled token.
  """
  temperature: float = 1.0
  top_k: int = -1
  top_p: float = 1.0
  seed: int | None = None
  max_tokens: int = 16
  stop_token_ids: tuple = ()
  ignore_eos: bool = False
  logprobs: bool = False

  def __post_init__(self):
    if not _is_real(self.temperature) or not self.temperature >= 0:
      raise ValueError(f"SamplingParams: temperature must be >= 0, got {self.temperature!r}")
    if not is_int(self.top_k) or not (self.top_k == -1 or self.top_k >= 1):
      raise ValueError(f"SamplingParams: top_k must be -1 (off) or >= 1, got {self.top_k!r}")
    if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingParams: top_p must be in (0, 1], got {self.top_p!r}")
    if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**32):
      raise ValueError(f"SamplingParams: seed must be None or an int in [0, 2**32), got "
                       f"{self.seed!r}")
    if not is_int(self.max_tokens) or self.max_tokens <= 0:
      raise ValueError(f"SamplingParams: max_tokens must be a positive int, got "
                       f"{self.max_tokens!r}")
    stops = tuple(self.stop_token_ids)
    if not all(is_int(t) and t >= 0 for t in stops):
      raise ValueError(f"SamplingParams: stop_token_ids must be non-negative ints, got "
                       f"{self.stop_token_ids!r}")
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stops))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

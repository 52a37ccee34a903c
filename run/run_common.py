"""Shared by the scripts in run/: the benchmark variants and how to build their engines."""
from __future__ import annotations

from weave_jax import Engine, RunConfig

# name -> (communication backend, weave)
VARIANTS = {
    "baseline": ("psum", False),
    "psum+weave": ("psum", True),
    "rs_ag": ("rs_ag", False),
    "rs_ag+weave": ("rs_ag", True),
    "fused": ("fused_p2p", False),
    "fused+weave": ("fused_p2p", True),
    "nocomm": ("nocomm", False),
}


def engine_for(model, mesh, variant: str, *, ctas: int | None = None,
               weave_min_tokens: int | None = None, logits: str = "last") -> Engine:
  backend, weave = VARIANTS[variant]
  # --ctas sets the grid of unsplit and woven calls alike (the benchmark compares one setting)
  opts = (("ctas", ctas), ("weave_ctas", ctas)) if backend.startswith("fused") and ctas else ()
  # A "+weave" variant always weaves (threshold 1) unless told otherwise: it measures the woven
  # layer.  What library users get by default is the engine's tuned threshold, which may decide
  # not to weave (weave_jax/tuning/splits.json).
  if weave_min_tokens is None and weave:
    weave_min_tokens = 1
  kw = {} if weave_min_tokens is None else {"weave_min_tokens": weave_min_tokens}
  return Engine(model, mesh, RunConfig(backend=backend, backend_options=opts, weave=weave,
                                       logits=logits, **kw))

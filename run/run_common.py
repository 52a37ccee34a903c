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
    # the split and its schedule without communication: what weaving costs in compute alone
    "nocomm+weave": ("nocomm", True),
}

VARIANT_HELP = ("a name from " + ", ".join(VARIANTS) + "; a fused one may end in @N to run its "
                "kernel on N CTAs (e.g. fused+weave@8)")


def parse_variant(name: str) -> tuple[str, int | None]:
  """``"fused+weave@8"`` -> ``("fused+weave", 8)``; ``"baseline"`` -> ``("baseline", None)``.

  Raises ValueError for an unknown name, or a CTA suffix on a variant without the fused kernel.
  """
  base, at, ctas = name.partition("@")
  if base not in VARIANTS:
    raise ValueError(f"unknown variant {name!r}: {VARIANT_HELP}")
  if not at:
    return base, None
  if not VARIANTS[base][0].startswith("fused"):
    raise ValueError(f"variant {name!r}: only fused variants take @CTAS")
  if not ctas.isdigit():
    raise ValueError(f"variant {name!r}: @ must be followed by a CTA count, e.g. {base}@16")
  return base, int(ctas)


def variant_arg(name: str) -> str:
  """argparse ``type`` for variant names (argparse turns the ValueError into a usage error)."""
  parse_variant(name)
  return name


def is_fused(name: str) -> bool:
  return VARIANTS[parse_variant(name)[0]][0].startswith("fused")


def engine_for(model, mesh, variant: str, *, ctas: int | None = None,
               weave_min_tokens: int | None = None, logits: str = "last") -> Engine:
  base, own_ctas = parse_variant(variant)
  backend, weave = VARIANTS[base]
  ctas = own_ctas or ctas
  # --ctas / @N set the grid of unsplit and woven calls alike (the benchmark compares one setting)
  opts = (("ctas", ctas), ("weave_ctas", ctas)) if backend.startswith("fused") and ctas else ()
  # A "+weave" variant always weaves (threshold 1) unless told otherwise: it measures the woven
  # layer.  What library users get by default is the engine's tuned threshold, which may decide
  # not to weave (weave_jax/tuning/splits.json).
  if weave_min_tokens is None and weave:
    weave_min_tokens = 1
  kw = {} if weave_min_tokens is None else {"weave_min_tokens": weave_min_tokens}
  return Engine(model, mesh, RunConfig(backend=backend, backend_options=opts, weave=weave,
                                       logits=logits, **kw))

"""Shared by the scripts in run/: the benchmark variants and how to build their engines."""
from __future__ import annotations

from weave_jax import Engine, FusedOptions, RunConfig

# name -> (communication backend, weave)
VARIANTS = {
    "baseline": ("psum", False),
    "psum+weave": ("psum", True),
    "rs_ag": ("rs_ag", False),
    "rs_ag+weave": ("rs_ag", True),
    "fused": ("fused_p2p", False),
    "fused+weave": ("fused_p2p", True),
    # what RunConfig(backend="fused_p2p", weave=True) gives library users: per token bucket the
    # device's tuning table (weave_jax/tuning/<device kind>.json) picks woven or unsplit, and
    # maybe the backend
    "fused+tuned": ("fused_p2p", True),
    "nocomm": ("nocomm", False),
    # the split and its schedule without communication: what weaving costs in compute alone
    "nocomm+weave": ("nocomm", True),
}

TUNED = "fused+tuned"

VARIANT_HELP = ("a name from " + ", ".join(VARIANTS) + "; a fused one may add @N to run its "
                "kernel on N CTAs and :key=value,... for other backend options, e.g. "
                "fused+weave@8 or fused+weave@16:weave_algorithm=two_shot")


def parse_variant(name: str) -> tuple[str, dict]:
  """``"fused+weave@8:weave_algorithm=two_shot"`` -> ``("fused+weave", {"ctas": 8,
  "weave_ctas": 8, "weave_algorithm": "two_shot"})``; ``"baseline"`` -> ``("baseline", {})``.

  Raises ValueError for an unknown name, or options on a variant without the fused kernel.
  (``variant_arg`` and the engine validate the option names and values with
  ``FusedOptions.from_dict``.)
  """
  head, _, opts = name.partition(":")
  base, at, ctas = head.partition("@")
  if base not in VARIANTS:
    raise ValueError(f"unknown variant {name!r}: {VARIANT_HELP}")
  options: dict = {}
  if (at or opts) and not VARIANTS[base][0].startswith("fused"):
    raise ValueError(f"variant {name!r}: only fused variants take @CTAS or :options")
  if at:
    if not ctas.isdigit():
      raise ValueError(f"variant {name!r}: @ must be followed by a CTA count, e.g. {base}@16")
    # one grid for unsplit and woven calls alike (the benchmark compares one setting)
    options.update(ctas=int(ctas), weave_ctas=int(ctas))
  for item in filter(None, opts.split(",")):
    key, eq, value = item.partition("=")
    if not eq or not key:
      raise ValueError(f"variant {name!r}: options are key=value, got {item!r}")
    options[key] = int(value) if value.isdigit() else value
  return base, options


def variant_arg(name: str) -> str:
  """argparse ``type`` for variant names: the name and its fused options are validated at
  parse time (argparse turns the ValueError into a usage error), before any model is built."""
  _, options = parse_variant(name)
  if options:
    FusedOptions.from_dict(options)
  return name


def is_fused(name: str) -> bool:
  return VARIANTS[parse_variant(name)[0]][0].startswith("fused")


def engine_for(model, mesh, variant: str, *, ctas: int | None = None,
               weave_min_tokens: int | None = None, logits: str = "last") -> Engine:
  base, options = parse_variant(variant)
  backend, weave = VARIANTS[base]
  opts = {}
  if backend.startswith("fused") and ctas:   # --ctas: both grids, unless the name sets them
    opts.update(ctas=ctas, weave_ctas=ctas)
  opts.update(options)
  tuned = base == TUNED
  # A "+weave" variant always weaves (threshold 1) unless told otherwise: it measures the woven
  # layer.  What library users get by default ("fused+tuned") is the engine's tuned choice,
  # which may decide not to weave (weave_jax/tuning/<device kind>.json).
  if weave_min_tokens is None and weave and not tuned:
    weave_min_tokens = 1
  kw = {} if weave_min_tokens is None else {"weave_min_tokens": weave_min_tokens}
  # A variant measures its own backend at every size: no per-size substitution by the tuning
  # table (RunConfig.backend_by_size), except the tuned variant, which is the library default.
  options = FusedOptions.from_dict(opts) if backend.startswith("fused") else None
  return Engine(model, mesh, RunConfig(backend=backend, options=options,
                                       weave=weave, logits=logits, backend_by_size=tuned, **kw))

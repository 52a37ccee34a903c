"""weave_jax: TokenWeave for JAX — tensor-parallel LLM prefill that overlaps communication.

Typical use::

    from weave_jax import Engine, RunConfig, make_mesh, preset, init_random
    cfg = preset("tiny")
    mesh = make_mesh()                      # all local devices on the "tp" axis
    model = init_random(cfg, mesh)          # or weights.load_hf_checkpoint(path, mesh)
    logits = Engine(model, mesh, RunConfig(backend="rs_ag", weave=True))(tokens)

In another stack's model (inside its shard_map, any axis name): ``weave_jax.ops.reduce_add_norm``
for the all-reduce + residual + RMSNorm, ``weave_jax.weave.run`` for the two-half schedule,
``weave_jax.Workspace`` for the fused kernel's buffers, ``weave_jax.FusedOptions`` for its
settings.
"""
from weave_jax import ops, weave
from weave_jax.config import ModelConfig, from_hf_config, preset, PRESETS
from weave_jax.engine import Engine, RunConfig
from weave_jax.fused.workspace import FusedTimeoutError, Workspace
from weave_jax.init import init_random, abstract_model
from weave_jax.options import FusedOptions
from weave_jax.sharding import make_mesh

__all__ = ["ModelConfig", "from_hf_config", "preset", "PRESETS", "Engine", "RunConfig",
           "FusedOptions", "FusedTimeoutError", "Workspace", "init_random", "abstract_model",
           "make_mesh", "ops", "weave"]
__version__ = "0.1.0"
from weave_jax.serve import LLM, SamplingParams  # noqa: E402  (serving API; imports the above)
__all__ += ["LLM", "SamplingParams"]

"""Bring your own model: a Llama written as plain JAX functions, in the style of
jax-ml/jax-llm-examples (its own weight dict, shardings and shard_map; no weave_jax model class),
made TokenWeave-fast with weave_jax's public op and schedule only:

- ``weave_jax.ops.reduce_add_norm`` replaces each row-parallel sublayer's
  ``psum -> residual add -> RMSNorm`` (``layers_unsplit``);
- ``weave_jax.weave.run`` runs the same sublayers over two halves of the batch, so that one
  half's reduction overlaps the other half's compute (``layers_woven``).

Backends: "psum" and "rs_ag" anywhere (CPU included); "fused_p2p" on NVLink GPUs, with an open
``weave_jax.fused.Workspace`` passed as ``workspace``.  examples/README.md shows the diff.

    python examples/byo_llama.py [--backend rs_ag|psum|fused_p2p] [--tp N]   # random weights
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from weave_jax import ops, weave

AXIS = "tensor"          # any shard_map axis name works; weave_jax's own model calls it "tp"


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int
  hidden: int
  ffn: int
  layers: int
  heads: int
  kv_heads: int          # a multiple of the TP size
  head_dim: int
  eps: float = 1e-5
  rope_theta: float = 10000.0


def param_specs(cfg: Config) -> dict:
  """Megatron TP: heads and FFN columns split over AXIS; norms and the embedding replicated.
  Shapes: embed (V, H), wq (H, N, D), wk/wv (H, K, D), wo (N, D, H), w_gate/w_up (H, F),
  w_down (F, H), lm_head (H, V)."""
  layer = {"attn_norm": P(), "wq": P(None, AXIS, None), "wk": P(None, AXIS, None),
           "wv": P(None, AXIS, None), "wo": P(AXIS, None, None), "mlp_norm": P(),
           "w_gate": P(None, AXIS), "w_up": P(None, AXIS), "w_down": P(AXIS, None)}
  return {"embed": P(), "layers": [layer] * cfg.layers, "final_norm": P(),
          "lm_head": P(None, AXIS)}


def init(cfg: Config, key: jax.Array, dtype=jnp.float32) -> dict:
  """Random weights of the shapes in ``param_specs``."""
  h, n, k, d, f = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.ffn
  shapes = {"attn_norm": (h,), "wq": (h, n, d), "wk": (h, k, d), "wv": (h, k, d),
            "wo": (n, d, h), "mlp_norm": (h,), "w_gate": (h, f), "w_up": (h, f), "w_down": (f, h)}
  keys = iter(jax.random.split(key, 3 + cfg.layers * len(shapes)))
  rand = lambda s: (jax.random.normal(next(keys), s) * (1.0 if len(s) == 1 else s[0] ** -0.5))
  layers = [{name: rand(s).astype(dtype) for name, s in shapes.items()}
            for _ in range(cfg.layers)]
  return {"embed": rand((cfg.vocab, h)).astype(dtype), "layers": layers,
          "final_norm": rand((h,)).astype(dtype), "lm_head": rand((h, cfg.vocab)).astype(dtype)}


# --- layers: per-rank math on local shards; each row-parallel one returns a partial sum -------

def rms_norm(x, weight, eps):
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (weight.astype(jnp.float32) * y).astype(x.dtype)


def rope(x, start: int, theta: float):
  """Rotate-half RoPE of x (T, heads, D) at positions start .. start + T - 1."""
  d = x.shape[-1]
  inv = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  angles = jnp.arange(start, start + x.shape[0], dtype=jnp.float32)[:, None] * inv
  cos, sin = jnp.cos(angles)[:, None], jnp.sin(angles)[:, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def attention(w, x, start: int, prefix, cfg: Config):
  """x (T, H) normed, tokens start .. start+T-1 of one sequence; ``prefix``: (k, v) of the
  tokens before ``start`` or None.  Returns (partial (T, H), (k, v) up to this chunk)."""
  q = rope(jnp.einsum("th,hnd->tnd", x, w["wq"]), start, cfg.rope_theta)     # (T, N, D)
  k = rope(jnp.einsum("th,hkd->tkd", x, w["wk"]), start, cfg.rope_theta)     # (T, K, D)
  v = jnp.einsum("th,hkd->tkd", x, w["wv"])
  if prefix is not None:
    k, v = jnp.concatenate([prefix[0], k]), jnp.concatenate([prefix[1], v])  # (S, K, D)
  t, s, kv = q.shape[0], k.shape[0], k.shape[1]
  q = q.reshape(t, kv, -1, q.shape[-1])                                       # (T, K, G, D)
  scores = jnp.einsum("tkgd,skd->kgts", q, k, preferred_element_type=jnp.float32)
  causal = jnp.arange(s)[None, :] <= (s - t + jnp.arange(t))[:, None]         # (T, S)
  probs = jax.nn.softmax(jnp.where(causal, scores * q.shape[-1] ** -0.5, -jnp.inf), axis=-1)
  out = jnp.einsum("kgts,skd->tkgd", probs.astype(v.dtype), v).reshape(t, -1, v.shape[-1])
  return jnp.einsum("tnd,ndh->th", out, w["wo"]), (k, v)


def mlp(w, x):
  return (jax.nn.silu(x @ w["w_gate"]) * (x @ w["w_up"])) @ w["w_down"]


def _next_norm(weights, i: int):
  """The RMSNorm weight after layer i's MLP: layer i+1's attention norm, or the final norm."""
  layers = weights["layers"]
  return layers[i + 1]["attn_norm"] if i + 1 < len(layers) else weights["final_norm"]


# --- step 1: the op, in place of  x = x + psum(partial); h = rms_norm(x, next_norm) ----------

def layers_unsplit(weights, x, cfg: Config, backend):
  """x (T, H) embeddings -> final normed hidden states (T, H), one chunk."""
  h = rms_norm(x, weights["layers"][0]["attn_norm"], cfg.eps)
  residual = ops.shard_residual(x, axis_name=AXIS, backend=backend)
  for i, w in enumerate(weights["layers"]):
    partial, _ = attention(w, h, 0, None, cfg)
    h, residual = ops.reduce_add_norm(partial, residual, w["mlp_norm"], eps=cfg.eps,
                                      axis_name=AXIS, backend=backend)
    h, residual = ops.reduce_add_norm(mlp(w, h), residual, _next_norm(weights, i),
                                      eps=cfg.eps, axis_name=AXIS, backend=backend)
  return h


# --- step 2: the schedule.  The same sublayers as stages, over halves A and B -----------------

def layers_woven(weights, x, cfg: Config, backend):
  """As ``layers_unsplit``, the batch cut in two halves whose communication overlaps."""
  stages = []
  for i, w in enumerate(weights["layers"]):
    # fn(normed, half, ctx) -> (partial, ctx'): a half is its first token; half B's ctx is half
    # A's keys and values at the same stage.
    attn = lambda n, start, prefix, w=w: attention(w, n, start, prefix, cfg)
    stages.append((attn, w["mlp_norm"], f"layer_{i}/attn"))
    stages.append((lambda n, start, ctx, w=w: (mlp(w, n), None), _next_norm(weights, i),
                   f"layer_{i}/mlp"))
  cut = x.shape[0] // 2
  halves, chunks = (0, cut), (x[:cut], x[cut:])
  normed = tuple(rms_norm(c, weights["layers"][0]["attn_norm"], cfg.eps) for c in chunks)
  residuals = tuple(ops.shard_residual(c, axis_name=AXIS, backend=backend) for c in chunks)
  result = weave.run(stages, halves, residuals, backend, eps=cfg.eps, normed=normed)
  return jnp.concatenate(result.normed)


def forward(weights, tokens, cfg: Config, mesh: Mesh, *, backend: str = "rs_ag",
            woven: bool = True, workspace=None):
  """tokens (T,) of one sequence -> logits (T, V) float32.  T must be a multiple of the TP size
  (of twice the TP size when woven)."""
  tp = mesh.shape[AXIS]
  if tokens.shape[0] % (2 * tp if woven else tp):
    raise ValueError(f"forward: {tokens.shape[0]} tokens do not split evenly over TP={tp}"
                     f"{' in two halves' if woven else ''}")
  comm = ops.backend(backend, axis_name=AXIS, workspace=workspace)
  layers = layers_woven if woven else layers_unsplit

  def rank(weights, tokens):
    x = weights["embed"][tokens]                                # (T, H), replicated
    h = layers(weights, x, cfg, comm)
    return jnp.einsum("th,hv->tv", h, weights["lm_head"], preferred_element_type=jnp.float32)

  # check_vma=False: the fused backends are opaque FFI calls, whose outputs JAX cannot type.
  sharded = jax.shard_map(rank, mesh=mesh, in_specs=(param_specs(cfg), P()),
                          out_specs=P(None, AXIS), check_vma=False)
  return jax.jit(sharded)(weights, tokens)


def main():
  """Random weights: the woven ``--backend`` against the unsplit psum baseline."""
  import argparse
  import numpy as np
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--backend", default="rs_ag", help="psum | rs_ag | fused_p2p")
  parser.add_argument("--tp", type=int, default=min(4, len(jax.devices())))
  args = parser.parse_args()
  fused = args.backend.startswith("fused")
  dtype = jnp.bfloat16 if fused else jnp.float32          # the fused kernel takes bf16/fp16
  cfg = Config(vocab=256, hidden=128, ffn=256, layers=2, heads=8, kv_heads=4, head_dim=16)
  mesh = Mesh(np.array(jax.devices()[:args.tp]), (AXIS,))
  weights, tokens = init(cfg, jax.random.key(0), dtype), jnp.arange(64) % cfg.vocab
  workspace = None
  if fused:
    from weave_jax.fused import Workspace
    workspace = Workspace(mesh, max_tokens=64, hidden=cfg.hidden, dtype=dtype, axis_name=AXIS)
    workspace.open()
  try:
    base = forward(weights, tokens, cfg, mesh, backend="psum", woven=False)
    fast = ops.run_checked(forward, weights, tokens, cfg, mesh, backend=args.backend,
                           woven=True, workspace=workspace)
  finally:
    if workspace is not None:
      workspace.close()
  err = float(jnp.linalg.norm(fast - base) / jnp.linalg.norm(base))
  tol = 3e-2 if fused else 1e-5                          # bf16 rounding vs float32
  print(f"TP={args.tp} woven {args.backend} vs unsplit psum: relative error {err:.2e} "
        f"({'ok' if err <= tol else 'FAIL'}, tolerance {tol:.0e})")
  if err > tol:
    raise SystemExit(1)


if __name__ == "__main__":
  jax.config.update("jax_num_cpu_devices", 8)        # CPU only: 8 virtual devices
  main()

"""The paged KV cache: fixed-size pages of token slots, allocated once, sharded by KV heads.

Layout (one entry per layer, vLLM V1's names)::

    cache = ((k_pages, v_pages),) * L        each (P, page_size, K, D), the model dtype
    sharding: PartitionSpec(None, None, "tp", None): rank r holds its K / tp KV heads

A request's token at position s lives in page ``block_table[s // page_size]``, row
``s % page_size``: its flat slot is ``page * page_size + row`` (``slot_mapping``).  Every rank
holds every page, for its own heads; a page id means the same slots on every rank.  When TP
exceeds the checkpoint's KV heads the weights already replicate them (``cfg.num_kv_heads`` is
then the replicated count), so K / tp >= 1 always.

Memory per rank::

    bytes_per_page = 2 (k, v) x L x page_size x (K / tp) x D x itemsize
    num_pages      = floor(((free after weights) x memory_fraction - reserve) / bytes_per_page)

``free`` is the device allocator's limit minus what it holds (the weights and anything else
alive) when the runner starts; ``reserve`` is ``activation_reserve``: the step's activations at
the largest token bucket (stated formula below) plus a fixed allowance for XLA's GEMM
workspaces.  On CPU (no allocator statistics) the caller passes ``num_pages``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from weave_jax.checks import positive_int
from weave_jax.comm.base import AXIS
from weave_jax.config import ModelConfig
from weave_jax.model import padded_vocab

CACHE_SPEC = P(None, None, AXIS, None)        # (P, page_size, K, D): KV heads on tp
DEFAULT_PAGE_SIZE = 16
XLA_WORKSPACE_BYTES = 256 << 20               # cuBLAS/cuDNN workspaces and XLA's scratch


def bytes_per_page(cfg: ModelConfig, page_size: int, tp: int) -> int:
  """Bytes one page costs on each rank: 2 x layers x page_size x (K / tp) x D x itemsize."""
  itemsize = jnp.dtype(cfg.dtype).itemsize
  return 2 * cfg.num_layers * page_size * (cfg.num_kv_heads // tp) * cfg.head_dim * itemsize


def activation_reserve(cfg: ModelConfig, max_tokens: int, max_seqs: int, tp: int) -> int:
  """Bytes per rank kept free for one step at ``max_tokens`` tokens (the largest bucket).

  Per token: the residual, normed and partial streams (3 H), q/k/v and the attention output
  ((2 N + 2 K) D / tp) and the MLP's gate/up and activation (3 F / tp), in the model dtype,
  doubled for XLA's temporaries.  Per sampled row (at most ``max_seqs``): four float32 copies
  of the full-vocab logits (logits, scaled, sorted, softmax).  Plus ``XLA_WORKSPACE_BYTES``.
  """
  itemsize = jnp.dtype(cfg.dtype).itemsize
  h, d = cfg.hidden_size, cfg.head_dim
  ffn = cfg.intermediate_size * (cfg.experts_per_token if cfg.is_moe else 1)
  per_token = 3 * h + (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * d // tp + 3 * ffn // tp
  rows = min(max_tokens, max_seqs)
  return (2 * max_tokens * per_token * itemsize + 4 * rows * padded_vocab(cfg) * 4
          + XLA_WORKSPACE_BYTES)


def free_device_bytes(mesh: Mesh) -> int | None:
  """The smallest (allocator limit - bytes in use) over the mesh's devices; None where the
  backend keeps no statistics (CPU)."""
  free = []
  for dev in mesh.devices.flat:
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
      return None
    free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  return min(free)


def pages_for_memory(cfg: ModelConfig, mesh: Mesh, *, page_size: int, memory_fraction: float,
                     reserve: int) -> int:
  """How many pages fit in ``memory_fraction`` of the free device memory, less ``reserve``."""
  if not 0 < memory_fraction <= 1:
    raise ValueError(f"kv_cache: memory_fraction={memory_fraction!r} must be in (0, 1]")
  free = free_device_bytes(mesh)
  if free is None:
    raise ValueError("kv_cache: this backend reports no free memory (CPU); pass num_pages")
  tp = mesh.shape[AXIS]
  pages = int((free * memory_fraction - reserve) // bytes_per_page(cfg, page_size, tp))
  if pages < 1:
    raise ValueError(f"kv_cache: no page fits: free {free / 2**30:.2f} GiB x {memory_fraction} "
                     f"- reserve {reserve / 2**30:.2f} GiB < one page "
                     f"({bytes_per_page(cfg, page_size, tp)} bytes)")
  return pages


def check_layout(cfg: ModelConfig, tp: int, num_pages: int, page_size: int) -> None:
  positive_int("kv_cache", "page_size", page_size)
  positive_int("kv_cache", "num_pages", num_pages)
  if cfg.num_kv_heads % tp:
    raise ValueError(f"kv_cache: num_kv_heads={cfg.num_kv_heads} not divisible by TP={tp} "
                     "(the weights replicate KV heads when TP exceeds them)")


def allocate(cfg: ModelConfig, mesh: Mesh, num_pages: int, page_size: int = DEFAULT_PAGE_SIZE):
  """Zeroed cache, each rank's shard created where it lives.  Returns the tuple over layers of
  (k_pages, v_pages), each (P, page_size, K, D) sharded by ``CACHE_SPEC``."""
  check_layout(cfg, mesh.shape[AXIS], num_pages, page_size)
  shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
  sharding = NamedSharding(mesh, CACHE_SPEC)
  layers = cfg.num_layers

  def make():
    return tuple((jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))
                 for _ in range(layers))

  out_shardings = tuple((sharding, sharding) for _ in range(layers))
  return jax.jit(make, out_shardings=out_shardings)()


def describe(cfg: ModelConfig, tp: int, num_pages: int, page_size: int) -> str:
  """The line the runner prints: pages, tokens and bytes per rank."""
  per_page = bytes_per_page(cfg, page_size, tp)
  return (f"[serve] KV cache: {num_pages} pages x {page_size} tokens = {num_pages * page_size} "
          f"tokens, {num_pages * per_page / 2**30:.2f} GiB per rank ({per_page} bytes/page, "
          f"{cfg.num_kv_heads // tp} KV heads per rank, TP={tp})")

"""Backends built from XLA's own collectives: ``psum`` (baseline), ``rs_ag`` and ``nocomm``."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from weave_jax.comm.base import CommBackend, add_norm


@dataclasses.dataclass(frozen=True)
class Psum(CommBackend):
  """All-reduce, then residual add + RMSNorm on every token on every rank (Megatron / vLLM)."""
  name: str = "psum"

  def reduce_add_norm(self, partial, residual, weight, *, eps):
    reduced = jax.lax.psum(partial, self.axis_name)
    return add_norm(reduced.astype(jnp.float32), residual, weight, eps)


@dataclasses.dataclass(frozen=True)
class ReduceScatterAllGather(CommBackend):
  """Reduce-scatter -> add + norm on this rank's 1/tp of the tokens -> all-gather the normed."""
  name: str = "rs_ag"
  residual_sharded: bool = True

  def check_tokens(self, tokens: int, tp: int) -> None:
    if tokens % tp:
      raise ValueError(f"rs_ag: tokens={tokens} must be a multiple of the TP size {tp} (pad the "
                       "batch)")

  def reduce_add_norm(self, partial, residual, weight, *, eps):
    reduced = jax.lax.psum_scatter(partial, self.axis_name, scatter_dimension=0,
                                   tiled=True)  # (T/tp, H)
    normed_local, new_residual = add_norm(reduced.astype(jnp.float32), residual, weight, eps)
    normed = jax.lax.all_gather(normed_local, self.axis_name, axis=0, tiled=True)  # (T, H)
    return normed, new_residual


@dataclasses.dataclass(frozen=True)
class NoComm(CommBackend):
  """No reduction at all: the upper bound TokenWeave compares with.  Numerically wrong."""
  name: str = "nocomm"
  is_reference_wrong: bool = True

  def reduce_add_norm(self, partial, residual, weight, *, eps):
    return add_norm(partial.astype(jnp.float32), residual, weight, eps)

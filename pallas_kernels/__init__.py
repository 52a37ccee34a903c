"""Pallas / Triton GPU kernels for weave_jax, each beside its jnp reference.

    out = ragged_paged_attention(q, k_pages, v_pages, kv_lens, block_tables, query_start_loc,
                                 num_seqs, impl="auto")       # (T, N, D), see attention.py
"""
from pallas_kernels.attention import ragged_paged_attention
from pallas_kernels.paged_attention_ref import ragged_paged_attention_reference

__all__ = ["ragged_paged_attention", "ragged_paged_attention_reference"]

"""Pallas GPU kernels for weave_jax.

    normed, new_residual = add_rms_norm(reduced, residual, weight, eps=1e-6)
"""
from pallas_kernels.add_rms_norm import add_rms_norm, add_rms_norm_reference

__all__ = ["add_rms_norm", "add_rms_norm_reference"]

"""Pallas GPU kernels for weave_jax."""

__all__ = []

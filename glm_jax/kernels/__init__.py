"""Attention kernels: dispatch, XLA reference, and GLM mask algebra."""

from glm_jax.kernels.attention import attention, cached_attention, masked_attention, xla_attention

__all__ = ["attention", "cached_attention", "masked_attention", "xla_attention"]

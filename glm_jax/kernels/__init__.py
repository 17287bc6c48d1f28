"""Attention kernels: dispatch, XLA reference, and GLM mask algebra."""

from glm_jax.kernels.attention import attention, xla_attention

__all__ = ["attention", "xla_attention"]

"""GLM loss: float32 cross-entropy over loss_mask. Targets are pre-aligned (no shift)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray, loss_mask: jnp.ndarray):
    """sum(ce * mask) / max(sum(mask), 1), in float32; also returns masked accuracy.

    logits [B, T, V]; targets [B, T] int; loss_mask [B, T]. The logit at i predicts
    targets[i] (glm_objective.md: GLM targets are aligned, not shifted).
    """
    logits = logits.astype(jnp.float32)
    mask = loss_mask.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    count = jnp.maximum(jnp.sum(mask), 1.0)
    loss = jnp.sum((log_z - target_logit) * mask) / count
    accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * mask) / count
    return loss, accuracy

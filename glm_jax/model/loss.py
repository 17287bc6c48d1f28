"""GLM loss: float32 cross-entropy over loss_mask. Targets are pre-aligned (no shift)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits: jnp.ndarray, targets: jnp.ndarray, loss_mask: jnp.ndarray,
                       z_loss: float = 0.0) -> dict:
    """Sums over the masked tokens (sums, not means, so micro-batches add up exactly).

    Returns loss_sum (cross-entropy), z_sum (z_loss * log(Z)^2, PaLM's stabiliser),
    correct (argmax hits) and count (masked tokens). logits [B, T, V]; the logit at
    i predicts targets[i] (docs/glm_objective.md: GLM targets are aligned, not shifted).
    """
    logits = logits.astype(jnp.float32)
    mask = loss_mask.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return {"loss_sum": jnp.sum((log_z - target_logit) * mask),
            "z_sum": z_loss * jnp.sum(jnp.square(log_z) * mask),
            "correct": jnp.sum((jnp.argmax(logits, -1) == targets) * mask),
            "count": jnp.sum(mask)}


def masked_cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray, loss_mask: jnp.ndarray):
    """(mean cross-entropy, accuracy) over masked tokens: sum(ce * mask) / max(sum(mask), 1)."""
    sums = cross_entropy_sums(logits, targets, loss_mask)
    count = jnp.maximum(sums["count"], 1.0)
    return sums["loss_sum"] / count, sums["correct"] / count

"""The output head and cross-entropy in sequence chunks: no [B, T, vocab] logits, forward or backward.

`chunked_cross_entropy(hidden, kernel, targets, loss_mask)` returns the training
objective (loss_sum + z_sum) and the sums glm_jax.model.loss.cross_entropy_sums
returns for logits = hidden @ kernel, computing the logits `chunk_length`
positions (of every row) at a time. Peak memory of the head + loss is
O(B * chunk_length * vocab) instead of O(B * T * vocab) for the logits and as
much again for their gradient: with GLM-4's 151,552-token vocabulary at T = 8k
that is the difference between about 5 GB and a few hundred MB per row (MaxText,
Levanter and Liger chunk the same way).

When differentiated, the forward pass computes each chunk's gradient while its
logits are at hand (the objective is a sum, so its gradient is known up to the
one scalar cotangent the backward pass multiplies in): three matmuls per chunk,
as many as autodiff of the unchunked loss, and no logits recomputed. Without
differentiation (evaluation) only the logits' matmul runs. The sums are
reported, not differentiated: differentiate the objective.

Chunks split the length axis, so every chunk keeps the batch axis and its
sharding; the vocabulary axis stays whole (and tensor-sharded where the rules
say). T need not divide into chunks: the last chunk is padded with masked
positions, which add nothing.

Per position with mask m, p = softmax(logits) and lse = log Z, the gradient of
the objective sum(m * (lse - logit[target] + z * lse^2)) is
    d logits = m * ((1 + 2 z lse) * p - onehot(target)).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

# Positions of every row per chunk (TrainSettings.loss_chunk_length): float32 logits of 32 MB
# per row at a 32k vocabulary, 155 MB at GLM-4's 151,552. On the 59M benchmark's head (B 8, T 512,
# CPU) chunks of 64..256 run alike, 1.7x faster than whole logits, and 512 (one chunk) 1.4x.
DEFAULT_LOSS_CHUNK = 256
LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")
KERNEL_AXES = ("embed", "vocab")


def chunked_cross_entropy(hidden: jnp.ndarray, kernel: jnp.ndarray, targets: jnp.ndarray,
                          loss_mask: jnp.ndarray, z_loss: float = 0.0,
                          chunk_length: int = DEFAULT_LOSS_CHUNK) -> tuple[jax.Array, dict]:
    """(objective, sums) of the masked cross-entropy of logits = hidden @ kernel.

    hidden [B, T, E] (the final-norm output, compute dtype); kernel [E, V] (the
    output head; a tied embedding passes its transpose); targets [B, T] int;
    loss_mask [B, T]. objective = loss_sum + z_sum is differentiable; sums holds
    loss_sum, z_sum, correct and count as cross_entropy_sums defines them.
    Logits are accumulated in float32.
    """
    if not isinstance(chunk_length, int) or isinstance(chunk_length, bool) or chunk_length < 1:
        raise ValueError(f"loss chunk_length is {chunk_length!r}; it must be a whole number >= 1 "
                         "(positions of every row per chunk)")
    B, T, E = hidden.shape
    length = min(chunk_length, T)
    chunks = -(-T // length)
    pad = chunks * length - T

    def split(x):  # [B, T, ...] -> [chunks, B, length, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
        return jnp.moveaxis(x.reshape(B, chunks, length, *x.shape[2:]), 1, 0)

    objective, sums = _objective(float(z_loss), split(hidden), kernel, split(targets.astype(jnp.int32)),
                                 split(loss_mask.astype(jnp.float32)))
    loss_sum, z_sum, correct, count = jax.lax.stop_gradient(sums)
    return objective, {"loss_sum": loss_sum, "z_sum": z_sum, "correct": correct, "count": count}


def _chunk_logits(h, kernel):
    """[B, L, E] x [E, V] -> float32 logits [B, L, V]."""
    logits = jnp.einsum("ble,ev->blv", h, kernel.astype(h.dtype), preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits, LOGITS_AXES)


def _chunk_sums(z_loss, logits, targets, mask):
    """(lse, (loss_sum, z_sum, correct, count)) of one chunk's logits."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return lse, (jnp.sum((lse - target_logit) * mask), z_loss * jnp.sum(jnp.square(lse) * mask),
                 jnp.sum(hits * mask), jnp.sum(mask))


def _add(totals, sums):
    return tuple(a + b for a, b in zip(totals, sums))


def _zero_sums():  # a function, not a module constant: creating arrays at import would start the backend
    return (jnp.zeros((), jnp.float32),) * 4


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _objective(z_loss, h_chunks, kernel, target_chunks, mask_chunks):
    """Forward only: one matmul per chunk."""
    def chunk(totals, inputs):
        h, targets, mask = inputs
        _, sums = _chunk_sums(z_loss, _chunk_logits(h, kernel), targets, mask)
        return _add(totals, sums), None

    sums, _ = jax.lax.scan(chunk, _zero_sums(), (h_chunks, target_chunks, mask_chunks))
    return sums[0] + sums[1], sums


def _objective_fwd(z_loss, h_chunks, kernel, target_chunks, mask_chunks):
    """Forward with the gradient of the objective w.r.t. hidden and kernel, chunk by chunk."""
    def chunk(carry, inputs):
        totals, d_kernel = carry
        h, targets, mask = inputs
        logits = _chunk_logits(h, kernel)
        lse, sums = _chunk_sums(z_loss, logits, targets, mask)
        probs = jnp.exp(logits - lse[..., None])
        is_target = jnp.arange(logits.shape[-1], dtype=jnp.int32) == targets[..., None]
        d_logits = mask[..., None] * ((1.0 + 2.0 * z_loss * lse)[..., None] * probs - is_target)
        d_logits = nn.with_logical_constraint(d_logits.astype(h.dtype), LOGITS_AXES)
        d_h = jnp.einsum("blv,ev->ble", d_logits, kernel.astype(h.dtype))
        d_kernel = d_kernel + jnp.einsum("ble,blv->ev", h, d_logits, preferred_element_type=jnp.float32)
        return (_add(totals, sums), nn.with_logical_constraint(d_kernel, KERNEL_AXES)), d_h

    d_kernel = nn.with_logical_constraint(jnp.zeros(kernel.shape, jnp.float32), KERNEL_AXES)
    (sums, d_kernel), d_h_chunks = jax.lax.scan(chunk, (_zero_sums(), d_kernel),
                                                (h_chunks, target_chunks, mask_chunks))
    return (sums[0] + sums[1], sums), (d_h_chunks, d_kernel.astype(kernel.dtype), mask_chunks)


def _objective_bwd(z_loss, residuals, cotangents):
    d_h_chunks, d_kernel, mask_chunks = residuals
    g = cotangents[0]  # the sums are stop_gradient'ed by chunked_cross_entropy: only the objective's
    return ((g * d_h_chunks).astype(d_h_chunks.dtype), (g * d_kernel).astype(d_kernel.dtype), None,
            jnp.zeros_like(mask_chunks))


_objective.defvjp(_objective_fwd, _objective_bwd)

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
sharding. T need not divide into chunks: the last chunk is padded with masked
positions, which add nothing.

Two ways to shard the head over the devices that split the weights (FSDP, and
tensor parallelism), chosen per call by glm_jax.model.vocab_sharding.rows_shared_pay:
- weights: the head kernel is cast and gathered whole on every device once per
  step (FSDP's usual way) and each device scores its own rows; its kernel
  gradient is accumulated as a whole [E, V] partial sum over the chunks and
  reduced across those devices once, after the last chunk.
- vocabulary-parallel (Megatron's parallel cross-entropy, here over every
  weight-splitting axis): each device keeps one slice of the vocabulary and
  scores every row of the group against it, so each chunk gathers the group's
  hidden rows [rows, chunk, E] instead of the kernel, the softmax's max and sum
  and the target logit are reduced across the slices ([rows, chunk] numbers),
  the kernel gradient stays in its slice, and only d hidden is reduce-scattered.
  No device holds anything of size [E, V]: for GLM-4-9B (V = 151,552) that is
  the gathered kernel and its float32 gradient, several GiB per chip.

Per position with mask m, p = softmax(logits) and lse = log Z, the gradient of
the objective sum(m * (lse - logit[target] + z * lse^2)) is
    d logits = m * ((1 + 2 z lse) * p - onehot(target)).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from glm_jax.model.vocab_sharding import mesh_axes_size, rows_shared_pay

# Positions of every row per chunk (TrainSettings.loss_chunk_length): float32 logits of 32 MB
# per row at a 32k vocabulary, 155 MB at GLM-4's 151,552. On the 59M benchmark's head (B 8, T 512,
# CPU) chunks of 64..256 run alike, 1.7x faster than whole logits, and 512 (one chunk) 1.4x.
DEFAULT_LOSS_CHUNK = 256


class HeadAxes(NamedTuple):
    """Logical axes of one sharding of the head: hidden chunk, logits chunk, kernel, d hidden chunk,
    and the axis the rows are split over (each device's kernel gradient is a partial sum over its rows)."""
    hidden: tuple | None
    logits: tuple
    kernel: tuple
    d_hidden: tuple | None
    rows: str


ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")
LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")
KERNEL_AXES = ("embed", "vocab")  # the parameter's own axes, which its gradient takes after the last chunk
# The kernel in the loop is cast once and resharded once, before the first chunk; its gradient is
# accumulated as each device's partial sum over its rows and reduced once, after the last chunk.
WEIGHTS_GATHERED = HeadAxes(hidden=None, logits=LOGITS_AXES, kernel=("activation_embed", "vocab"), d_hidden=None,
                            rows="activation_batch")
VOCAB_PARALLEL = HeadAxes(hidden=("shared_batch", "shared_length", None),
                          logits=("shared_batch", "shared_length", "split_vocab"),
                          kernel=(None, "split_vocab"), d_hidden=ACTIVATION_AXES, rows="shared_batch")


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
    axes = VOCAB_PARALLEL if rows_shared_pay(B, T, kernel.shape[-1], "split_vocab") else WEIGHTS_GATHERED
    length = min(chunk_length, T)
    chunks = -(-T // length)
    pad = chunks * length - T

    def split(x):  # [B, T, ...] -> [chunks, B, length, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
        return jnp.moveaxis(x.reshape(B, chunks, length, *x.shape[2:]), 1, 0)

    objective, sums = _objective(float(z_loss), axes, split(hidden), kernel, split(targets.astype(jnp.int32)),
                                 split(loss_mask.astype(jnp.float32)))
    loss_sum, z_sum, correct, count = jax.lax.stop_gradient(sums)
    return objective, {"loss_sum": loss_sum, "z_sum": z_sum, "correct": correct, "count": count}


def _chunk_logits(axes: HeadAxes, h, kernel):
    """[B, L, E] x [E, V] -> float32 logits [B, L, V] (h gathered over the vocabulary group if parallel)."""
    if axes.hidden is not None:
        h = nn.with_logical_constraint(h, axes.hidden)
    logits = jnp.einsum("ble,ev->blv", h, kernel, preferred_element_type=jnp.float32)
    return h, nn.with_logical_constraint(logits, axes.logits)


def _loop_kernel(axes: HeadAxes, kernel, dtype):
    """The kernel as every chunk reads it: in the compute dtype and the loop's sharding, made once.

    Inside the custom VJP, so the kernel's gradient is still accumulated in float32.
    """
    return nn.with_logical_constraint(kernel.astype(dtype), axes.kernel)


def _is_target(logits, targets):
    return jnp.arange(logits.shape[-1], dtype=jnp.int32) == targets[..., None]


def first_true_index(hit):
    """Index of the first True along the last axis (its length where there is none), as a min over a
    select: argmax's rule for `logits == max` without argmax's (value, index) pair reduction, which
    XLA:CPU emits as a scalar loop and a sharded vocabulary compiles into an int32 index per logit.
    Also greedy decoding's pick (infer/sampling.greedy_token)."""
    size = hit.shape[-1]
    return jnp.min(jnp.where(hit, jnp.arange(size, dtype=jnp.int32), size), axis=-1)


def _chunk_sums(z_loss, logits, targets, mask):
    """(lse, (loss_sum, z_sum, correct, count)) of one chunk's logits.

    The target logit is a masked sum, not a gather, and the argmax the first index holding
    the maximum (argmax's own rule) as a min over a select: with the vocabulary split across
    devices each is a reduction of [B, L] numbers across them (exact: one term of the sum is
    not zero), where a sharded argmax's compiled form holds an int32 index per logit.
    """
    best = jnp.max(logits, axis=-1, keepdims=True)  # one max for the log-sum-exp and the argmax
    lse = (best + jnp.log(jnp.sum(jnp.exp(logits - best), axis=-1, keepdims=True)))[..., 0]
    target_logit = jnp.sum(jnp.where(_is_target(logits, targets), logits, 0.0), axis=-1)
    hits = (first_true_index(logits == best) == targets).astype(jnp.float32)
    return lse, (jnp.sum((lse - target_logit) * mask), z_loss * jnp.sum(jnp.square(lse) * mask),
                 jnp.sum(hits * mask), jnp.sum(mask))


def _add(totals, sums):
    return tuple(a + b for a, b in zip(totals, sums))


def _zero_sums():  # a function, not a module constant: creating arrays at import would start the backend
    return (jnp.zeros((), jnp.float32),) * 4


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _objective(z_loss, axes, h_chunks, kernel, target_chunks, mask_chunks):
    """Forward only: one matmul per chunk."""
    kernel = _loop_kernel(axes, kernel, h_chunks.dtype)

    def chunk(totals, inputs):
        h, targets, mask = inputs
        _, logits = _chunk_logits(axes, h, kernel)
        _, sums = _chunk_sums(z_loss, logits, targets, mask)
        return _add(totals, sums), None

    sums, _ = jax.lax.scan(chunk, _zero_sums(), (h_chunks, target_chunks, mask_chunks))
    return sums[0] + sums[1], sums


def _objective_fwd(z_loss, axes, h_chunks, kernel, target_chunks, mask_chunks):
    """Forward with the gradient of the objective w.r.t. hidden and kernel, chunk by chunk."""
    param_dtype = kernel.dtype
    kernel = _loop_kernel(axes, kernel, h_chunks.dtype)

    def chunk(carry, inputs):
        totals, d_kernel = carry
        h, targets, mask = inputs
        h, logits = _chunk_logits(axes, h, kernel)
        lse, sums = _chunk_sums(z_loss, logits, targets, mask)
        probs = jnp.exp(logits - lse[..., None])
        d_logits = mask[..., None] * ((1.0 + 2.0 * z_loss * lse)[..., None] * probs - _is_target(logits, targets))
        d_logits = nn.with_logical_constraint(d_logits.astype(h.dtype), axes.logits)
        d_h = jnp.einsum("blv,ev->ble", d_logits, kernel)
        if axes.d_hidden is not None:  # the vocabulary slices' partial sums, reduce-scattered to the rows' devices
            d_h = nn.with_logical_constraint(d_h, axes.d_hidden)
        d_kernel = d_kernel + jnp.einsum("nble,nblv->nev", by_shard(h), by_shard(d_logits),
                                         preferred_element_type=jnp.float32)
        return (_add(totals, sums), nn.with_logical_constraint(d_kernel, partial_axes)), d_h

    # Each device accumulates the kernel gradient of its own rows ([shards, E, V], the leading axis split
    # like the rows): a sum over rows split across devices would otherwise be reduced in every chunk.
    shards = mesh_axes_size(axes.rows)
    shards = shards if h_chunks.shape[1] % shards == 0 else 1
    partial_axes = (axes.rows, *axes.kernel)
    by_shard = lambda x: x.reshape(shards, x.shape[0] // shards, *x.shape[1:])  # noqa: E731
    d_kernel = nn.with_logical_constraint(jnp.zeros((shards, *kernel.shape), jnp.float32), partial_axes)
    (sums, d_kernel), d_h_chunks = jax.lax.scan(chunk, (_zero_sums(), d_kernel),
                                                (h_chunks, target_chunks, mask_chunks))
    d_kernel = nn.with_logical_constraint(jnp.sum(d_kernel, axis=0), KERNEL_AXES)  # reduced once per step
    return (sums[0] + sums[1], sums), (d_h_chunks, d_kernel.astype(param_dtype), mask_chunks)


def _objective_bwd(z_loss, axes, residuals, cotangents):
    d_h_chunks, d_kernel, mask_chunks = residuals
    g = cotangents[0]  # the sums are stop_gradient'ed by chunked_cross_entropy: only the objective's
    return ((g * d_h_chunks).astype(d_h_chunks.dtype), (g * d_kernel).astype(d_kernel.dtype), None,
            jnp.zeros_like(mask_chunks))


_objective.defvjp(_objective_fwd, _objective_bwd)

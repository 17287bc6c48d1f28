"""Attention over a learned key/value prefix plus the sequence: P-tuning v2 (Liu et al. 2021).

P-tuning v2, as ChatGLM2/3 run it (`pre_seq_len`, their PrefixEncoder), gives every
layer P trained key/value slots that every query sees, whatever its segment or
position, before the sequence's own keys under GLM's rule. The slots carry no
position: ChatGLM feeds them as `past_key_values`, which its rotary embedding never
touches, and its attention mask is all ones over them.

The sequence part runs through whichever implementation `kernels.attention` picks
(dense, blockwise, or the flash kernels, which never see the prefix); both parts
return their float32 log-sum-exp and are merged exactly, as two blocks of one online
softmax:

    lse = logaddexp(lse_seq, lse_prefix)
    out = exp(lse_seq - lse) out_seq + exp(lse_prefix - lse) out_prefix

The prefix part is a small dense [T, P] attention (P is tens of slots); GQA/MQA group
the query heads per KV head as everywhere else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glm_jax.kernels.attention import attention, merge_parts


def attention_with_learned_prefix(q, k, v, segment_ids, prefix_mask, prefix_key, prefix_value, *,
                                  impl: str = "auto", scale: float | None = None, **mask_options):
    """GLM attention of q [B, T, Hq, D] over P learned slots and the sequence's k, v [B, T, Hkv, D].

    prefix_key, prefix_value: [P, Hkv, D], seen by every query (batch-independent).
    segment_ids, prefix_mask: [B, T] as in kernels.attention (GLM's bidirectional prefix,
    unrelated to the learned one); mask_options: kernels.attention's lambda_shape / context_windows
    (the slots stay visible to every query). Returns [B, T, Hq, D] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = attention(q, k, v, segment_ids, prefix_mask, impl=impl, scale=scale, return_lse=True, **mask_options)
    prefix_out, prefix_lse = prefix_attention(q, prefix_key, prefix_value, scale=scale)
    return merge_attention((out, lse), (prefix_out, prefix_lse)).astype(q.dtype)


def prefix_attention(q, prefix_key, prefix_value, *, scale: float):
    """q [B, T, Hq, D] over keys every query sees, [P, Hkv, D] -> (out [B, T, Hq, D] float32, lse [B, T, Hq])."""
    B, T, Hq, D = q.shape
    Hkv = prefix_key.shape[1]
    grouped_q = q.reshape(B, T, Hkv, Hq // Hkv, D)
    scores = jnp.einsum("btgrd,pgd->btgrp", grouped_q, prefix_key.astype(q.dtype),
                        preferred_element_type=jnp.float32) * scale
    lse = jax.nn.logsumexp(scores, axis=-1)
    probs = jnp.exp(scores - lse[..., None])
    out = jnp.einsum("btgrp,pgd->btgrd", probs, prefix_value.astype(jnp.float32))
    return out.reshape(B, T, Hq, D), lse.reshape(B, T, Hq)


def merge_attention(*parts):
    """Attention over the union of disjoint key sets from each set's (out, lse): exact, float32."""
    return merge_parts(parts)[0]

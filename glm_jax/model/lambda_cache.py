"""The KV cache of Λ-shaped attention: n sink slots and a ring of w window slots per layer.

Under LM-Infinite's mask (ModelConfig.attention_sink = n, attention_window = w) a decoded
token sees only its segment's first n tokens and the w tokens ending with itself, so its
cache needs no more: token t of a row lives in slot t while t < n (a sink) and in slot
n + (t - n) mod w after (the ring overwrites the token that just left the window). The
cache is n + w slots whatever the prompt and generation lengths (glm_jax.infer.cache),
all of them decode-loop state.

Slots hold tokens, not positions: each row's count of written tokens is kept in the cache
('written'), the prompt's padding is never stored, and distances are counted in tokens,
as the full forward over the row's tokens counts them. One segment per row, from slot 0
(what the generator's prompt batches are). Every stored token precedes the query, so the
mask over the cache is only "written, same segment".
"""

from __future__ import annotations

import jax.numpy as jnp


def token_slot(token, sink: int, window: int):
    """The slot of a row's token index (any shape of ints)."""
    return jnp.where(token < sink, token, sink + (token - sink) % window)


def prefill_sources(lengths, sink: int, window: int):
    """After a prompt of `lengths` [B] tokens, which token fills each slot: ([B, n + w] token index,
    [B, n + w] whether the slot is filled). Slot j >= n holds the last token t < length with
    t = j (mod w), t >= j."""
    slot = jnp.arange(sink + window, dtype=jnp.int32)[None]
    last = lengths[:, None].astype(jnp.int32) - 1
    token = jnp.where(slot < sink, slot, slot + window * ((last - slot) // window))
    filled = slot <= last
    return jnp.where(filled, token, 0), filled


def gather_tokens(x, sources, filled, fill=0):
    """x [B, T, ...] -> [B, n + w, ...]: each slot's token (its fill value where the slot is empty)."""
    index = sources.reshape(sources.shape + (1,) * (x.ndim - 2))
    picked = jnp.take_along_axis(x, index, axis=1)
    return jnp.where(filled.reshape(index.shape), picked, jnp.asarray(fill, x.dtype))


def decode_slots(written, sink: int, window: int):
    """[B, n + w] bool: the slot each row's next token (its `written`-th) goes to."""
    slot = jnp.arange(sink + window, dtype=jnp.int32)[None]
    return slot == token_slot(written, sink, window)[:, None]

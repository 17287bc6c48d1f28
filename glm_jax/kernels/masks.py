"""GLM's attention mask: the dense rule and its key-range form.

The rule (docs/design.md), for query q and key k of one row:
    allowed(q, k) = seg[q] == seg[k] and (k <= q or prefix[k])
Segments are contiguous runs of equal segment ids (packing puts padding, id 0,
at the end), and a segment's prefix (Part A) is contiguous at its start. Under
those two assumptions the allowed keys of every query form ONE range
[k_start[q], k_end[q]) and the allowed queries of every key form one range
[q_start[k], q_end[k]). The flash kernel uses these ranges to skip blocks; the
XLA reference uses the dense rule. All functions are jit-compatible.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Large but finite: exp(mask - max) underflows to 0 without inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def dense_mask(segment_ids: jnp.ndarray, prefix_mask: jnp.ndarray, q_len: int | None = None,
               q_offset=0) -> jnp.ndarray:
    """[B, S] ids and prefix flags -> [B, q_len, S] bool mask of the rule.

    Query t is key position q_offset + t (all S positions by default), so a shorter
    query window (a chunk of a prefill, the last tokens of a sequence) gets the rows
    of the full mask it would get inside the whole sequence. q_offset may also be
    traced, or the [q_len] positions themselves (query_positions).
    """
    S = segment_ids.shape[-1]
    q_len = S if q_len is None else q_len
    q_index = query_positions(q_len, S, q_offset)
    q_segment = jnp.take(segment_ids, q_index, axis=1)
    same_segment = q_segment[:, :, None] == segment_ids[:, None, :]
    causal = jnp.arange(S)[None, :] <= q_index[:, None]  # [q, k]: k <= q
    visible = causal[None] | prefix_mask[:, None, :].astype(bool)
    return same_segment & visible


def check_query_window(q_len: int, kv_len: int, q_offset):
    """Where the queries are, validated: q_offset as given, or the last q_len keys when it is None.

    q_offset is a static int (query t is key position q_offset + t), a traced scalar, or a
    [q_len] int32 array of increasing key positions, e.g. a device's chunks under context
    parallelism (glm_jax/kernels/context_parallel.py); traced values are the caller's to keep in range.
    """
    if q_len > kv_len:
        raise ValueError(f"{q_len} queries but only {kv_len} keys; queries are positions of the key sequence, "
                         "so pass at least as many keys (the whole sequence up to the last query)")
    q_offset = kv_len - q_len if q_offset is None else q_offset
    if not isinstance(q_offset, (int, np.integer)):
        if jnp.ndim(q_offset) not in (0, 1) or (jnp.ndim(q_offset) == 1 and jnp.shape(q_offset)[0] != q_len):
            raise ValueError(f"q_offset of shape {jnp.shape(q_offset)}: pass a scalar offset or the {q_len} "
                             "queries' key positions")
        return q_offset
    if not 0 <= q_offset <= kv_len - q_len:
        raise ValueError(f"q_offset {q_offset} puts queries [{q_offset}, {q_offset + q_len}) outside the "
                         f"{kv_len} keys; use 0 <= q_offset <= {kv_len - q_len}")
    return q_offset


def query_positions(q_len: int, kv_len: int, q_offset) -> jnp.ndarray:
    """[q_len] int32 key position of every query (check_query_window's q_offset forms)."""
    q_offset = check_query_window(q_len, kv_len, q_offset)
    if jnp.ndim(q_offset) == 1:
        return jnp.asarray(q_offset, jnp.int32)
    return q_offset + jnp.arange(q_len, dtype=jnp.int32)


def segment_bounds(segment_ids: jnp.ndarray):
    """First index and one-past-last index of each position's segment run, [B, T]."""
    B, T = segment_ids.shape
    index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    changes = segment_ids[:, 1:] != segment_ids[:, :-1]
    is_start = jnp.concatenate([jnp.ones((B, 1), bool), changes], axis=1)
    is_end = jnp.concatenate([changes, jnp.ones((B, 1), bool)], axis=1)
    start = jax.lax.cummax(jnp.where(is_start, index, 0), axis=1)
    end = jax.lax.cummin(jnp.where(is_end, index + 1, T), axis=1, reverse=True)
    return start, end


def key_ranges(segment_ids: jnp.ndarray, prefix_mask: jnp.ndarray):
    """Per query q: keys allowed are exactly [k_start[q], k_end[q]).

    k_start = start of q's segment; k_end = max(q + 1, end of q's segment prefix).
    """
    start, end = segment_bounds(segment_ids)
    prefix = prefix_mask.astype(jnp.int32)
    T = segment_ids.shape[-1]
    index = jnp.arange(T, dtype=jnp.int32)
    # Prefix length of each segment = prefix count over [start, end).
    inclusive = jnp.cumsum(prefix, axis=1)
    exclusive = jnp.concatenate([jnp.zeros_like(inclusive[:, :1]), inclusive], axis=1)
    prefix_len = jnp.take_along_axis(exclusive, end, axis=1) - jnp.take_along_axis(exclusive, start, axis=1)
    k_end = jnp.maximum(index + 1, start + prefix_len)
    return start, k_end


def query_ranges(segment_ids: jnp.ndarray, prefix_mask: jnp.ndarray):
    """Per key k: queries allowed to see k are exactly [q_start[k], q_end[k]).

    A prefix key is seen by its whole segment; a later key by itself and after.
    """
    start, end = segment_bounds(segment_ids)
    index = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    q_start = jnp.where(prefix_mask.astype(bool), start, index)
    return q_start, end


def mask_from_key_ranges(k_start: jnp.ndarray, k_end: jnp.ndarray) -> jnp.ndarray:
    """Expands [B, T] key ranges to the dense [B, T, T] mask (for tests and debugging)."""
    keys = jnp.arange(k_start.shape[-1])
    return (keys[None, None, :] >= k_start[:, :, None]) & (keys[None, None, :] < k_end[:, :, None])


def cache_mask(q_segment_ids: jnp.ndarray, q_start: jnp.ndarray, kv_segment_ids: jnp.ndarray,
               kv_prefix_mask: jnp.ndarray) -> jnp.ndarray:
    """The rule for T new queries written at cache slots [q_start, q_start + T) of an S-slot cache.

    Slots are the q/k indices of the rule, so it is the same mask a full forward
    over the cache contents would use; slots not yet written have segment id 0,
    which no query has (queries are 1..), so they are never attended.
    Returns [B, T, S] bool.
    """
    T, S = q_segment_ids.shape[-1], kv_segment_ids.shape[-1]
    q_index = q_start + jnp.arange(T, dtype=jnp.int32)
    k_index = jnp.arange(S, dtype=jnp.int32)
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    causal = k_index[None, :] <= q_index[:, None]
    return same_segment & (causal[None] | kv_prefix_mask[:, None, :].astype(bool))

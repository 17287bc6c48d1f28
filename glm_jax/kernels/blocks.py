"""Block bookkeeping shared by the flash kernels (flash_attention.py, flash_attention_tpu.py) and
the XLA blockwise path (blockwise_attention.py).

Which key blocks a block of query rows must visit, and which of those it can run
without a mask (`visit_ranges`), and the loops over them (`three_loops`); padding of a query window and its keys to whole
blocks with per-row key ranges and per-key query ranges that keep every padded row
non-empty (`padded_ranges`, `padded_inputs`); and the count of visited blocks a
test or benchmark compares the kernels' own counters with (`visited_blocks`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from glm_jax.kernels import masks


def visit_ranges(starts, ends, block: int):
    """Blocks of `block` columns for rows whose allowed columns are [starts, ends).

    Returns (first, full_first, full_last, last): blocks [first, last) hold some
    allowed column; [full_first, full_last) are allowed for every row (no mask needed).
    A row with nothing allowed has starts > ends (padded_ranges): it widens no range
    and keeps its block masked; a block whose rows see nothing gets (0, 0, 0, 0).
    Works on one block of rows (kernels) or, with axis=-1 reductions, on many.
    """
    first, last = jnp.min(starts, axis=-1) // block, -(-jnp.max(ends, axis=-1) // block)
    empty = last <= first
    first, last = jnp.where(empty, 0, first), jnp.where(empty, 0, last)
    full_first = jnp.clip(-(-jnp.max(starts, axis=-1) // block), first, last)
    full_last = jnp.clip(jnp.min(ends, axis=-1) // block, full_first, last)
    return first, full_first, full_last, last


def three_loops(visit, ranges, carry):
    """Run visit(block, carry, masked=...) over visit_ranges' blocks: the masked ones before,
    those every row sees whole unmasked, the masked ones after. Used inside the Pallas kernels
    and by the XLA blockwise path alike."""
    first, full_first, full_last, last = ranges
    carry = lax.fori_loop(first, full_first, functools.partial(visit, masked=True), carry)
    carry = lax.fori_loop(full_first, full_last, functools.partial(visit, masked=False), carry)
    return lax.fori_loop(full_last, last, functools.partial(visit, masked=True), carry)


def pad_axis(x, axis: int, length: int):
    extra = length - x.shape[axis]
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def padded_lengths(q_len: int, kv_len: int, block_q: int, block_k: int) -> tuple[int, int]:
    """Query and key lengths after padding: T to block_q, and S plus one key per padded query to block_k."""
    padded_q = q_len + (-q_len % block_q)
    keys = kv_len + padded_q - q_len
    return padded_q, keys + (-keys % block_k)


def padded_ranges(segment_ids, prefix_mask, q_len: int, q_offset, block_q: int, block_k: int, ranges=None):
    """Key ranges per query and query ranges per key (kernels/masks.py) for a padded query window.

    segment_ids, prefix_mask: [B, S] of the keys; query t is key position q_offset + t
    (q_offset static or traced), or q_offset[t] when it is an array of increasing positions
    (masks.query_positions). ranges: (k_start, k_end, q_start, q_end) [B, S] in key positions
    (one of masks.range_parts) instead of GLM's rule. Padded query T + u sees only the padded
    key S + u and the remaining padded keys are seen by no query. A query that sees nothing
    (possible in a part of masks.range_parts) gets the empty range (padded S, 0) and a key that
    no query of the window sees (padded T, 0): they widen no block range and keep their blocks
    masked. Returns (k_start, k_end) [B, T padded] in key indices and (q_start, q_end)
    [B, S padded] in query indices.
    """
    S = segment_ids.shape[1]
    T = q_len
    padded_q, padded_k = padded_lengths(T, S, block_q, block_k)
    positions = masks.query_positions(T, S, q_offset)
    if ranges is None:
        ranges = (*masks.key_ranges(segment_ids, prefix_mask), *masks.query_ranges(segment_ids, prefix_mask))
    ks, ke = (jnp.take(x, positions, axis=1) for x in ranges[:2])
    empty = ke <= ks
    ks, ke = jnp.where(empty, padded_k, ks), jnp.where(empty, 0, ke)
    # The queries that see a key are one range of positions; with increasing positions, one range of
    # query indices too: those whose position lies in it (for a window, clip(range - q_offset, 0, T)).
    qs, qe = (jnp.searchsorted(positions, x).astype(jnp.int32) for x in ranges[2:])
    empty = qe <= qs
    qs, qe = jnp.where(empty, padded_q, qs), jnp.where(empty, 0, qe)
    query = jnp.arange(padded_q, dtype=jnp.int32)[None]
    own_key = S + query - T  # the padded key of a padded query
    ks = jnp.where(query < T, pad_axis(ks, 1, padded_q), own_key)
    ke = jnp.where(query < T, pad_axis(ke, 1, padded_q), own_key + 1)
    key = jnp.arange(padded_k, dtype=jnp.int32)[None]
    own_query = T + key - S  # the padded query of a padded key, if there is one
    has_query = own_query < padded_q
    qs = jnp.where(key < S, pad_axis(qs, 1, padded_k), jnp.where(has_query, own_query, padded_q))
    qe = jnp.where(key < S, pad_axis(qe, 1, padded_k), jnp.where(has_query, own_query + 1, 0))
    return ks, ke, qs, qe


def padded_inputs(q, k, v, segment_ids, prefix_mask, q_offset, block_q: int, block_k: int, head_dim: int,
                  ranges=None):
    """q, k, v with the query window and the keys padded to the blocks and D to head_dim (zeros
    change no score), and padded_ranges' (k_start, k_end, q_start, q_end) (of `ranges` if given)."""
    T, S = q.shape[1], k.shape[1]
    q_offset = masks.check_query_window(T, S, q_offset)
    ranges = padded_ranges(segment_ids, prefix_mask, T, q_offset, block_q, block_k, ranges)
    padded_q, padded_k = padded_lengths(T, S, block_q, block_k)
    q = pad_axis(pad_axis(q, 1, padded_q), 3, head_dim)
    k, v = (pad_axis(pad_axis(x, 1, padded_k), 3, head_dim) for x in (k, v))
    return q, k, v, ranges


def visited_blocks(segment_ids, prefix_mask, block_q: int, block_k: int, fully_visible: bool = False,
                   q_len: int | None = None, q_offset: int | None = None, ranges=None) -> jax.Array:
    """Key blocks the forward visits (or, with fully_visible, runs unmasked), summed over query blocks, per row.

    For the query window [q_offset, q_offset + q_len) of the keys (default: all of them), under
    GLM's rule or the given part `ranges` (masks.range_parts).
    """
    S = segment_ids.shape[1]
    q_len = S if q_len is None else q_len
    q_offset = masks.check_query_window(q_len, S, q_offset)
    ks, ke, _, _ = padded_ranges(segment_ids, prefix_mask, q_len, q_offset, block_q, block_k, ranges)
    starts, ends = (x.reshape(x.shape[0], -1, block_q) for x in (ks, ke))
    first, full_first, full_last, last = visit_ranges(starts, ends, block_k)
    return jnp.sum(full_last - full_first if fully_visible else last - first, axis=1)

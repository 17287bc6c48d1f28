"""GLM's attention mask: the dense rule and its key-range form.

The rule (docs/design.md), for query q and key k of one row:
    allowed(q, k) = seg[q] == seg[k] and (k <= q or prefix[k])
Segments are contiguous runs of equal segment ids (packing puts padding, id 0,
at the end), and a segment's prefix (Part A) is contiguous at its start. Under
those two assumptions the allowed keys of every query form ONE range
[k_start[q], k_end[q]) and the allowed queries of every key form one range
[q_start[k], q_end[k]). The flash kernel uses these ranges to skip blocks; the
XLA reference uses the dense rule. All functions are jit-compatible.

Two training-free context-extension options narrow the rule (LambdaShape: LM-Infinite's
sinks + window; context_windows: parallel context windows): mask_options_dense defines
them densely, range_parts splits each into disjoint parts of one range per query and per
key for the kernels.
"""

from __future__ import annotations

import dataclasses

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


# ------------------------------------------------------------ training-free context extension
@dataclasses.dataclass(frozen=True)
class LambdaShape:
    """LM-Infinite's Λ-shaped mask (Han et al. 2023): on top of GLM's rule, a query sees the first `sink`
    keys of its segment (its global tokens) and the keys less than `window` positions before it;
    nothing further back. GLM's bidirectional prefix keys after a query stay visible (the window
    only bounds how far back a query looks)."""

    sink: int
    window: int

    def __post_init__(self):
        if not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"Λ-shaped attention: sink {self.sink!r} must be a whole number >= 0 (global tokens)")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"Λ-shaped attention: window {self.window!r} must be a whole number >= 1 (keys a query "
                             "sees behind it, itself included)")


def mask_options_dense(allowed, segment_ids, q_index, lambda_shape: LambdaShape | None = None,
                       context_windows=None):
    """GLM's rule `allowed` [B, q, S] narrowed by the context-extension options (the dense definition).

    lambda_shape: keep keys among the first `sink` of the segment or within `window` behind the query.
    context_windows: [B, S] int, parallel context windows (Ratner et al. 2023): tokens with id w > 0
      belong to context window w and see only their own window; tokens with id 0 (the task) see
      every window of their segment. Windows are contiguous and come before their segment's task
      tokens (context_window_layout builds such rows).
    q_index: [q] key position of each query.
    """
    k_index = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    if lambda_shape is not None:
        start, _ = segment_bounds(segment_ids)  # [B, S] of the keys; a visible key shares the query's segment
        sink = (k_index[None] - start < lambda_shape.sink)[:, None, :]
        near = (q_index[:, None] - k_index[None, :] < lambda_shape.window)[None]
        allowed = allowed & (sink | near)
    if context_windows is not None:
        q_window = jnp.take(context_windows, q_index, axis=1)
        allowed = allowed & ((q_window[:, :, None] == context_windows[:, None, :]) | (q_window[:, :, None] == 0))
    return allowed


def range_parts(segment_ids, prefix_mask, lambda_shape: LambdaShape | None = None, context_windows=None):
    """GLM's mask with the context-extension options as disjoint parts that are each one key range per
    query and one query range per key: [(k_start, k_end, q_start, q_end)], each [B, S] in key
    positions (an empty range has start >= end).

    The flash kernels skip blocks by single ranges, which Λ-shaped attention (sinks + window: two
    key ranges) and parallel context windows (a window's key is seen by its window and by the
    task: two query ranges) do not have; split into parts that do, each part runs as its own
    kernel call and the calls merge exactly by log-sum-exp (kernels.attention).
    Λ: the sinks [start, start + n) and the window [max(start + n, q - w + 1), k_end).
    Windows: each window (and the task) on its own, and the task's queries over the windows.
    """
    ks, ke = key_ranges(segment_ids, prefix_mask)
    qs, qe = query_ranges(segment_ids, prefix_mask)
    if lambda_shape is not None and context_windows is not None:
        raise ValueError("Λ-shaped attention and parallel context windows are separate options; use one")
    if lambda_shape is not None:
        return _lambda_parts(segment_ids, ks, ke, qs, qe, lambda_shape)
    if context_windows is not None:
        return _window_parts(segment_ids, context_windows, ks, ke, qs, qe)
    return [(ks, ke, qs, qe)]


def _lambda_parts(segment_ids, ks, ke, qs, qe, shape: LambdaShape):
    index = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)[None]
    sink_end = ks + shape.sink  # ks is the segment's start
    is_sink = index < sink_end
    empty = jnp.zeros_like(ks)
    window = (jnp.maximum(sink_end, index - shape.window + 1), ke,
              jnp.where(is_sink, empty, qs), jnp.where(is_sink, empty, jnp.minimum(qe, index + shape.window)))
    if shape.sink == 0:
        return [window]
    sinks = (ks, jnp.minimum(ke, sink_end), jnp.where(is_sink, qs, empty), jnp.where(is_sink, qe, empty))
    return [sinks, window]


def _window_parts(segment_ids, context_windows, ks, ke, qs, qe):
    T = segment_ids.shape[-1]
    windows = jnp.asarray(context_windows, jnp.int32)
    # Runs of one (segment, window): each window, and each segment's task tokens (window ids < 65536).
    run_start, run_end = segment_bounds(segment_ids.astype(jnp.int32) * 65536 + windows)
    _, segment_end = segment_bounds(segment_ids)
    is_task = windows == 0
    index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids.shape)
    # Where the task of a window token's segment starts: the next task run (the segment's end if none).
    task_start = jax.lax.cummin(jnp.where(is_task & (run_start == index), index, T), axis=1, reverse=True)
    task_start = jnp.minimum(task_start, segment_end)
    empty = jnp.zeros_like(ks)
    own = (jnp.maximum(ks, run_start), jnp.minimum(ke, run_end), jnp.maximum(qs, run_start), jnp.minimum(qe, run_end))
    task_over_windows = (jnp.where(is_task, ks, empty), jnp.where(is_task, jnp.minimum(ke, run_start), empty),
                         jnp.where(is_task, empty, jnp.maximum(qs, task_start)), jnp.where(is_task, empty, qe))
    return [own, task_over_windows]


def context_window_layout(window_lengths, task_length: int):
    """Positions and window ids of one segment under parallel context windows (Ratner et al. 2023):
    every window's positions start at 0, the task's continue after the longest window.

    Returns (positions [sum + task], window ids: 1, 2, ... per window, 0 on the task), numpy.
    """
    longest = max(window_lengths)
    positions = [np.arange(n) for n in window_lengths] + [longest + np.arange(task_length)]
    ids = [np.full(n, i + 1) for i, n in enumerate(window_lengths)] + [np.zeros(task_length, int)]
    return np.concatenate(positions).astype(np.int32), np.concatenate(ids).astype(np.int32)

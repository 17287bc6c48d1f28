"""Packing corrupted examples into fixed-length rows, and splitting long documents.

A row holds several examples back to back: segment_ids 1..n, positions that
restart in every segment, prefix_mask = each example's Part A; the tail is
padding (segment 0, its own causal segment, loss 0). Rows are filled best-fit
decreasing within a group of examples, which is deterministic and gives >= 90%
non-pad tokens on real corpora.
"""

from __future__ import annotations

import numpy as np

from glm_jax.data import batch as batch_schema


def split_windows(length: int, max_window: int, sentence_ends: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) windows of at most max_window tokens covering [0, length).

    A window ends after the last sentence end that leaves it at least half full;
    with no such boundary it is cut at max_window.
    """
    windows, start = [], 0
    ends = np.flatnonzero(sentence_ends) + 1
    while length - start > max_window:
        limit = start + max_window
        candidates = ends[(ends >= start + max_window // 2) & (ends <= limit)]
        cut = int(candidates[-1]) if len(candidates) else limit
        windows.append((start, cut))
        start = cut
    windows.append((start, length))
    return windows


def plan_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """Best-fit decreasing: groups of example indices whose lengths fit a row each.

    Every length must be <= row_length. Rows come out in order of their largest
    example; each row's indices are in the order they were placed.
    """
    rows: list[list[int]] = []
    space: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if space[r] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda r: (space[r], r))
            rows[best].append(i)
            space[best] -= lengths[i]
        else:
            rows.append([i])
            space.append(row_length - lengths[i])
    return rows


def pack_row(examples: list[dict], row_length: int, pad_id: int) -> dict:
    """One row from examples (blank_infill outputs) whose total length fits row_length."""
    row = batch_schema.empty_row(row_length, pad_id)
    cursor = 0
    for segment, ex in enumerate(examples, start=1):
        n = len(ex["tokens"])
        if cursor + n > row_length:
            raise ValueError(f"examples of total length {cursor + n} do not fit a row of {row_length}")
        span = slice(cursor, cursor + n)
        row["tokens"][span], row["targets"][span] = ex["tokens"], ex["targets"]
        row["loss_mask"][span], row["positions"][:, span] = ex["loss_mask"], ex["positions"]
        row["segment_ids"][span] = segment
        row["prefix_mask"][cursor:cursor + ex["sep"]] = True
        cursor += n
    row["positions"][0, cursor:] = np.arange(row_length - cursor)  # padding: a causal segment
    return row


def pack(examples: list[dict], row_length: int, pad_id: int) -> list[dict]:
    """All examples packed into rows (best-fit decreasing)."""
    plan = plan_rows([len(ex["tokens"]) for ex in examples], row_length)
    return [pack_row([examples[i] for i in indices], row_length, pad_id) for indices in plan]

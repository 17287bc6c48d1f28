"""Packing: rows follow the batch contract and examples attend only inside their segment."""

import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.data import objectives, packing
from glm_jax.kernels import masks
from test_objectives import SPECIALS


def examples(seed, count=30):
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[SPECIALS.cls], rng.integers(20, 99, size=rng.integers(10, 120))]) for _ in range(count)]
    return [objectives.blank_infill(d, rng, SPECIALS, "token") for d in docs]


def test_rows_hold_examples_exactly_and_masks_stay_inside_segments():
    exs = examples(0)
    rows = packing.pack(exs, 256, SPECIALS.pad)
    seen = 0
    for row in rows:
        seg = row["segment_ids"]
        dense = np.asarray(masks.dense_mask(jnp.asarray(seg[None]), jnp.asarray(row["prefix_mask"][None])))[0]
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            # The packed example equals one input example (tokens, positions restart at 0) ...
            match = [ex for ex in exs if len(ex["tokens"]) == len(idx) and np.array_equal(ex["tokens"], row["tokens"][idx])]
            assert match and np.array_equal(match[0]["positions"], row["positions"][:, idx])
            ex = match[0]
            # ... its attention is exactly the single-example GLM mask: j <= i or j < sep ...
            i, j = np.meshgrid(np.arange(len(idx)), np.arange(len(idx)), indexing="ij")
            np.testing.assert_array_equal(dense[np.ix_(idx, idx)], (j <= i) | (j < ex["sep"]))
            # ... and nothing outside its segment is visible in either direction.
            others = np.flatnonzero(seg != s)
            assert not dense[np.ix_(idx, others)].any() and not dense[np.ix_(others, idx)].any()
            seen += 1
        pad = seg == 0
        assert not row["loss_mask"][pad].any() and (row["tokens"][pad] == SPECIALS.pad).all()
    assert seen == len(exs)


def test_best_fit_decreasing_plan():
    assert packing.plan_rows([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]  # 4 best-fits beside 6
    rows = packing.plan_rows(list(np.random.default_rng(1).integers(1, 100, size=200)), 128)
    assert all(len(set(r)) == len(r) for r in rows) and sorted(sum(rows, [])) == list(range(200))


def test_split_windows_prefers_sentence_ends():
    ends = np.zeros(100, bool)
    ends[[30, 45, 70]] = True  # sentence ends after tokens 30, 45, 70
    assert packing.split_windows(100, 50, ends) == [(0, 46), (46, 71), (71, 100)]
    assert packing.split_windows(100, 40, np.zeros(100, bool)) == [(0, 40), (40, 80), (80, 100)]


def test_overfull_row_is_an_error():
    with pytest.raises(ValueError, match="do not fit"):
        packing.pack_row(examples(2, 3), 8, SPECIALS.pad)

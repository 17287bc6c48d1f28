"""GLM mask algebra: the dense rule vs loops, and the key/query-range form vs the dense rule."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_packing
from glm_jax.kernels import masks
from reference_model import mask_by_loops


@pytest.mark.parametrize("seed", range(5))
def test_dense_mask_equals_rule_by_loops(seed):
    rng = np.random.default_rng(seed)
    seg, prefix, _ = random_packing(rng, 3, 37)
    got = np.asarray(masks.dense_mask(jnp.asarray(seg), jnp.asarray(prefix)))
    want = np.stack([mask_by_loops(seg[b], prefix[b]) for b in range(3)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", range(20))
def test_key_and_query_ranges_equal_dense_rule(seed):
    rng = np.random.default_rng(seed)
    seg, prefix, _ = random_packing(rng, 4, int(rng.integers(1, 70)))
    seg_j, prefix_j = jnp.asarray(seg), jnp.asarray(prefix)
    dense = np.asarray(masks.dense_mask(seg_j, prefix_j))
    k_start, k_end = masks.key_ranges(seg_j, prefix_j)
    np.testing.assert_array_equal(np.asarray(masks.mask_from_key_ranges(k_start, k_end)), dense)
    q_start, q_end = masks.query_ranges(seg_j, prefix_j)
    by_key = np.asarray(masks.mask_from_key_ranges(q_start, q_end))  # [key, query]
    np.testing.assert_array_equal(by_key.transpose(0, 2, 1), dense)


def test_golden_single_prefix():
    # The glm_objective.md example: sep = 6 of 11 tokens, one segment.
    seg = jnp.ones((1, 11), jnp.int32)
    prefix = jnp.arange(11)[None] < 6
    k_start, k_end = masks.key_ranges(seg, prefix)
    np.testing.assert_array_equal(k_start[0], np.zeros(11))
    np.testing.assert_array_equal(k_end[0], [6, 6, 6, 6, 6, 6, 7, 8, 9, 10, 11])

"""RoPE variants: relative-position property, the reference formulas, 2D vs 1D identities."""

import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.model import rope

D = 16


def scores(x_q, x_k, pos_q, pos_k, fn):
    q = fn(jnp.asarray(x_q)[None, None, None], jnp.asarray([[pos_q]]))
    k = fn(jnp.asarray(x_k)[None, None, None], jnp.asarray([[pos_k]]))
    return float(jnp.sum(q * k))


VARIANTS = {
    "half_full": lambda x, p: rope.apply_rope(x, p, D, "half"),
    "interleaved_full": lambda x, p: rope.apply_rope(x, p, D, "interleaved"),
    "interleaved_partial": lambda x, p: rope.apply_rope(x, p, D // 2, "interleaved"),
    "half_partial": lambda x, p: rope.apply_rope(x, p, D // 2, "half"),
    # 2D with block id tied to position keeps the relative property on both halves.
    "rope_2d": lambda x, p: rope.apply_rope_2d(x, p, p, D, "half"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_scores_depend_only_on_relative_position(variant):
    rng = np.random.default_rng(1)
    xq, xk = rng.normal(size=D).astype(np.float32), rng.normal(size=D).astype(np.float32)
    fn = VARIANTS[variant]
    base = scores(xq, xk, 7, 3, fn)
    for shift in (1, 50, 900):
        assert scores(xq, xk, 7 + shift, 3 + shift, fn) == pytest.approx(base, rel=1e-4, abs=1e-4)
    assert scores(xq, xk, 9, 3, fn) != pytest.approx(base, rel=1e-3)  # and it does depend on it


def test_partial_interleaved_equals_chatglm2_formula():
    # architectures.md: first 64 of 128 dims rotate as pairs (2i, 2i+1):
    # (x0*c - x1*s, x1*c + x0*s), theta_i = base^(-2i/64); dims 64.. pass through.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 3, 128)).astype(np.float32)
    pos = rng.integers(0, 4000, size=(2, 5))
    got = np.asarray(rope.apply_rope(jnp.asarray(x), jnp.asarray(pos), 64, "interleaved"))
    want = x.astype(np.float64).copy()
    theta = 10000.0 ** (-np.arange(32) * 2.0 / 64)
    angle = pos[..., None, None] * theta  # [B, T, 1, 32]
    c, s = np.cos(angle), np.sin(angle)
    x0, x1 = x[..., 0:64:2], x[..., 1:64:2]
    want[..., 0:64:2] = x0 * c - x1 * s
    want[..., 1:64:2] = x1 * c + x0 * s
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_rope_2d_with_zero_block_ids_is_1d_partial_rope():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(1, 6, 2, 32)).astype(np.float32))
    pos = jnp.asarray(rng.integers(0, 100, size=(1, 6)))
    two_d = rope.apply_rope_2d(x, pos, jnp.zeros_like(pos), 32, "half")
    # Block half unrotated: exactly a 1D rotate-half RoPE over the first 16 dims.
    np.testing.assert_allclose(two_d, rope.apply_rope(x, pos, 16, "half"), rtol=1e-6, atol=1e-6)
    # And the interleaved 1D partial RoPE is the same map up to a fixed channel permutation:
    # interleaved pair (2i, 2i+1) <-> half pair (i, i + 8).
    perm = np.concatenate([np.stack([np.arange(8), np.arange(8) + 8], -1).reshape(-1), np.arange(16, 32)])
    interleaved = rope.apply_rope(x[..., perm], pos, 16, "interleaved")
    np.testing.assert_allclose(interleaved, two_d[..., perm], rtol=1e-6, atol=1e-6)


def test_unrotated_dims_pass_through_and_position_zero_is_identity():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 3, 1, 16)).astype(np.float32))
    out = rope.apply_rope(x, jnp.asarray([[0, 5, 9]]), 8, "interleaved")
    np.testing.assert_array_equal(out[..., 8:], x[..., 8:])
    np.testing.assert_allclose(out[:, 0], x[:, 0], atol=0)

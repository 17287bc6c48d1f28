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


# ------------------------------------------------------------------ context extension (RopeScaling)
def numpy_inverse_frequencies(r: int, base: float, method: str, s: float, original: int = 64):
    """The published formulas in float64: (inverse frequencies, factor on cos / sin)."""
    inv = base ** (-np.arange(0, r, 2) / r)
    if method == "theta":  # ChatGLM2-32k / GLM-4: base * rope_ratio
        return (base * s) ** (-np.arange(0, r, 2) / r), 1.0
    if method == "linear":  # position interpolation: m / s
        return inv / s, 1.0
    if method == "ntk":  # NTK-aware: base * s^(r / (r - 2))
        return (base * s ** (r / (r - 2))) ** (-np.arange(0, r, 2) / r), 1.0
    # YaRN (arXiv 2309.00071, eq. 15-20): r(d) = L / lambda_d turns of pair d within L; gamma = ramp
    # between alpha = 1 and beta = 32 turns; h(theta_d) = (1 - gamma) theta_d / s + gamma theta_d, and
    # sqrt(1/t) = 0.1 ln s + 1 on both q and k. The ramp is over pair indices (where r(d) crosses 1 and 32,
    # rounded outward), as the authors' code computes it.
    def index_at(turns):
        return r * np.log(original / (turns * 2 * np.pi)) / (2 * np.log(base))

    low, high = max(np.floor(index_at(32)), 0), min(np.ceil(index_at(1)), r - 1)
    gamma = 1 - np.clip((np.arange(r // 2) - low) / (high - low), 0, 1)  # 1: extrapolate (keep theta_d)
    return (1 - gamma) * inv / s + gamma * inv, 0.1 * np.log(s) + 1


METHODS = ("theta", "linear", "ntk", "yarn")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_every_scaling_at_factor_one_is_todays_rope_bit_for_bit(method, style):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 7, 3, 32)).astype(np.float32))
    pos = jnp.asarray(rng.integers(0, 5000, size=(2, 7)))
    unscaled = rope.apply_rope(x, pos, 32, style, 500.0)
    scaled = rope.apply_rope(x, pos, 32, style, 500.0, rope.RopeScaling(method, 1.0, original_context=64))
    np.testing.assert_array_equal(np.asarray(scaled), np.asarray(unscaled))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("factor", [2.0, 8.0])
def test_scaled_rotation_equals_the_published_formula(method, factor):
    r, base, original = 32, 10000.0, 64
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1, 9, 2, 48)).astype(np.float32)  # partial: 32 of 48 rotate, interleaved pairs
    pos = rng.integers(0, int(original * factor), size=(1, 9))
    got = np.asarray(rope.apply_rope(jnp.asarray(x), jnp.asarray(pos), r, "interleaved", base,
                                     rope.RopeScaling(method, factor, original_context=original)))
    inv, magnitude = numpy_inverse_frequencies(r, base, method, factor, original)
    angle = pos[..., None, None] * inv
    c, s = magnitude * np.cos(angle), magnitude * np.sin(angle)
    want = x.astype(np.float64).copy()
    x0, x1 = x[..., 0:r:2], x[..., 1:r:2]
    want[..., 0:r:2], want[..., 1:r:2] = x0 * c - x1 * s, x1 * c + x0 * s
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    if method == "yarn":  # the extremes: the fastest pair keeps its frequency, the slowest is interpolated
        frequencies, _ = rope.scaled_frequencies(r, base, rope.RopeScaling(method, factor, original_context=original))
        unscaled = rope.inverse_frequencies(r, base)
        assert frequencies[0] == unscaled[0] and np.isclose(frequencies[-1], unscaled[-1] / factor)


def test_linear_interpolation_is_rope_at_positions_divided_by_the_factor():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(1, 5, 2, 16)).astype(np.float32))
    pos = jnp.asarray([[0, 4, 8, 400, 4000]])
    scaled = rope.apply_rope(x, pos, 16, "half", scaling=rope.RopeScaling("linear", 4.0))
    np.testing.assert_allclose(np.asarray(scaled), np.asarray(rope.apply_rope(x, pos // 4, 16, "half")),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_cached_decoding_equals_the_full_forward_under_every_scaling(method):
    from test_generate import check_causal_decode_matches_full_forward, tiny_config

    config = tiny_config("gqa2", "rope", rope_scaling=method, rope_scaling_factor=4.0, rope_original_context=8)
    check_causal_decode_matches_full_forward(config)

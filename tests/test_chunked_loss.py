"""The chunked head + loss against the whole-logits loss, numpy, and the memory it must save."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.evaluation import loss_sums
from glm_jax.model import GLM, ModelConfig, init_params
from glm_jax.model.chunked_loss import chunked_cross_entropy
from glm_jax.model.glm import example_inputs
from glm_jax.model.loss import cross_entropy_sums

Z_LOSS = 1e-2


def _problem(seed=0, B=2, T=37, E=16, V=101):
    k = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k[0], (B, T, E))
    kernel = jax.random.normal(k[1], (E, V))
    targets = jax.random.randint(k[2], (B, T), 0, V)
    mask = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)
    return hidden, kernel, targets, mask


def _whole_logits(hidden, kernel, targets, mask):
    sums = cross_entropy_sums(hidden @ kernel, targets, mask, Z_LOSS)
    return sums["loss_sum"] + sums["z_sum"], sums


def _relative(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("chunk_length", [1, 5, 16, 37, 64])  # 37 = T; 5 and 16 leave a padded last chunk
def test_loss_and_gradients_equal_whole_logits(chunk_length):
    hidden, kernel, targets, mask = _problem()
    (d_ref, sums_ref) = jax.grad(_whole_logits, argnums=(0, 1), has_aux=True)(hidden, kernel, targets, mask)
    chunked = lambda h, w: chunked_cross_entropy(h, w, targets, mask, Z_LOSS, chunk_length)  # noqa: E731
    (d_chunked, sums) = jax.jit(jax.grad(chunked, argnums=(0, 1), has_aux=True))(hidden, kernel)
    for key in ("loss_sum", "z_sum"):
        np.testing.assert_allclose(sums[key], sums_ref[key], rtol=1e-6)
    for key in ("correct", "count"):
        assert float(sums[key]) == float(sums_ref[key])
    assert _relative(d_chunked[0], d_ref[0]) < 1e-6
    assert _relative(d_chunked[1], d_ref[1]) < 1e-6


def test_sums_match_float64_numpy():
    hidden, kernel, targets, mask = _problem(seed=1)
    logits = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target_logit = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    m = np.asarray(mask, np.float64)
    objective, sums = chunked_cross_entropy(hidden, kernel, targets, mask, Z_LOSS, chunk_length=8)
    np.testing.assert_allclose(sums["loss_sum"], ((lse - target_logit) * m).sum(), rtol=1e-6)
    np.testing.assert_allclose(sums["z_sum"], Z_LOSS * (lse ** 2 * m).sum(), rtol=1e-6)
    np.testing.assert_allclose(objective, ((lse - target_logit + Z_LOSS * lse ** 2) * m).sum(), rtol=1e-6)
    assert float(sums["correct"]) == ((logits.argmax(-1) == np.asarray(targets)) * m).sum()


def test_upstream_cotangent_scales_the_gradient():
    """The forward pass computes the gradient for cotangent 1; a mean (1 / count) must scale it."""
    hidden, kernel, targets, mask = _problem(seed=2)
    mean = lambda h, whole: ((_whole_logits(h, kernel, targets, mask)[0] if whole else  # noqa: E731
                              chunked_cross_entropy(h, kernel, targets, mask, Z_LOSS, 7)[0]) / 13.0)
    assert _relative(jax.grad(mean)(hidden, False), jax.grad(mean)(hidden, True)) < 1e-6


def test_bad_chunk_length_is_a_clear_error():
    hidden, kernel, targets, mask = _problem()
    with pytest.raises(ValueError, match="chunk_length is 0; it must be a whole number >= 1"):
        chunked_cross_entropy(hidden, kernel, targets, mask, chunk_length=0)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_model_loss_and_parameter_gradients_equal_whole_logits(tie_embeddings):
    config = ModelConfig(vocab_size=97, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64,
                         tie_embeddings=tie_embeddings, dtype="float32")
    params = nn.meta.unbox(init_params(config, jax.random.key(0)))
    tokens, positions, segment_ids, prefix_mask = example_inputs(2, 24)
    rng = np.random.default_rng(0)
    batch = dict(tokens=jnp.asarray(rng.integers(0, 97, (2, 24)), jnp.int32), positions=positions,
                 segment_ids=segment_ids, prefix_mask=prefix_mask,
                 targets=jnp.asarray(rng.integers(0, 97, (2, 24)), jnp.int32),
                 loss_mask=jnp.asarray(rng.random((2, 24)) < 0.6, jnp.float32))
    model = GLM(config)
    grads = {chunk: jax.jit(jax.grad(lambda p: loss_sums(model, p, batch, Z_LOSS, chunk), has_aux=True))(params)
             for chunk in (None, 5)}
    (g_ref, s_ref), (g_chunk, s_chunk) = grads[None], grads[5]
    np.testing.assert_allclose(s_chunk["loss_sum"], s_ref["loss_sum"], rtol=1e-6)
    # Through the whole model (float32 sums in another order). Relative to the largest gradient:
    # some are zero up to rounding (a key bias shifts every score of a query equally).
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g_ref))
    for chunked, whole in zip(jax.tree_util.tree_leaves(g_chunk), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6 * scale)


def _temporary_bytes(fn, *shapes):
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_glm4_vocabulary_head_and_loss_use_an_eighth_of_the_memory():
    """GLM-4's 151,552-token head at T = 4096: compiled temporaries of loss + gradients, whole vs chunked."""
    B, T, E, V = 1, 4096, 256, 151_552
    shapes = [((B, T, E), jnp.float32), ((E, V), jnp.float32), ((B, T), jnp.int32), ((B, T), jnp.float32)]

    def whole(h, w, t, m):
        return jax.grad(lambda h, w: _whole_logits(h, w, t, m)[0], argnums=(0, 1))(h, w)

    def chunked(h, w, t, m):
        return jax.grad(lambda h, w: chunked_cross_entropy(h, w, t, m, Z_LOSS, 256)[0], argnums=(0, 1))(h, w)

    whole_bytes, chunked_bytes = _temporary_bytes(whole, *shapes), _temporary_bytes(chunked, *shapes)
    assert whole_bytes >= B * T * V * 4  # at least the float32 logits
    assert chunked_bytes * 8 <= whole_bytes, (chunked_bytes, whole_bytes)

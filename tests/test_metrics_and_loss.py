"""Analytic FLOPs and the masked loss against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import random_packing
from glm_jax.kernels import masks
from glm_jax.model import ModelConfig, abstract_params
from glm_jax.train import flops as metrics
from glm_jax.model.loss import masked_cross_entropy


def test_attended_pairs_equals_dense_mask_count():
    rng = np.random.default_rng(0)
    seg, prefix, _ = random_packing(rng, 3, 50)
    assert metrics.attended_pairs(seg, prefix) == int(masks.dense_mask(jnp.asarray(seg), jnp.asarray(prefix)).sum())


def test_matmul_params_are_params_minus_lookups_norms_biases():
    config = ModelConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         mlp_dim=64, mlp_activation="swiglu", tie_embeddings=False, position="rope")
    leaves = abstract_params(config)
    flat = jax.tree_util.tree_flatten_with_path(leaves, is_leaf=lambda x: hasattr(x, "names"))[0]
    kernels = sum(int(leaf.value.size) for path, leaf in flat if path[-1].key in ("kernel",))
    assert metrics.matmul_params(config) == kernels  # every matmul weight is a 'kernel' (lm_head included)


def test_masked_cross_entropy_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    mask = (rng.random((2, 5)) < 0.5).astype(np.float32)
    mask[0, 0] = 1
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    loss, acc = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(loss, (nll * mask).sum() / mask.sum(), rtol=1e-6)
    np.testing.assert_allclose(acc, ((logits.argmax(-1) == targets) * mask).sum() / mask.sum(), rtol=1e-6)

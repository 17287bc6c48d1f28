"""Conversions beyond mean pooling (glm_jax/convert/head_grouping.py, head_merging.py, calibration.py):
function-preserving head permutations, lossless merges of heads that are identical or exact rotations of one
another, the identity at G = H, balanced similarity grouping, and calibration activations against numpy."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.convert.calibration import kv_activations
from glm_jax.convert.head_grouping import grouping_cost, similarity_groups, squared_distances
from glm_jax.convert.head_tensors import LayerHeads, read_layers, rope_structure, write_layers
from glm_jax.convert.uptrain import ConversionError, convert_params
from glm_jax.model import GLM, ModelConfig, init_params
from glm_jax.model.glm import example_inputs

BASE = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, head_dim=8, mlp_dim=64, max_position=32,
            norm="rmsnorm", scan_layers=True)
POSITIONS = {  # every way the family rotates key dims (pairs and free dims differ)
    "rope_interleaved_partial": dict(position="rope", rope_style="interleaved", rotary_fraction=0.5),
    "rope_half": dict(position="rope", rope_style="half"),
    "rope_2d": dict(position="rope_2d", rope_style="half"),
    "learned_2d": dict(position="learned_2d"),
}
MERGES = ("mean", "first", "weighted", "aligned", "svd")


def config_of(position: str, kv_heads: int) -> ModelConfig:
    return ModelConfig(**BASE, **POSITIONS[position], num_kv_heads=kv_heads)


@functools.lru_cache(maxsize=None)
def forward(config: ModelConfig):
    return jax.jit(lambda p, *x: GLM(config).apply({"params": p}, *x))


def inputs(config: ModelConfig, seed: int = 0):
    tokens, positions, segments, prefix = example_inputs(batch=2, length=12)
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, tokens.shape), jnp.int32)
    prefix = jnp.asarray(np.arange(12) < 5)[None].repeat(2, 0)
    positions = positions.at[:, 0].set(jnp.arange(12) * 2)  # apart enough for RoPE to matter, < max_position
    return tokens, positions, segments, prefix


def random_params(config: ModelConfig, seed: int = 0):
    params = nn.meta.unbox(init_params(config, jax.random.key(seed)))
    # Larger, non-zero biases so a wrong fold of the bias row shows.
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 * jax.random.normal(jax.random.key(seed + 7), x.shape)
        if path[-1].key == "bias" else x * 4.0, params)


def with_layers(params, config, edit):
    """params with every layer's LayerHeads replaced by edit(i, layer)."""
    attention = params["layers"]["attention"]
    layers = [edit(i, layer) for i, layer in enumerate(read_layers(attention))]
    new = jax.tree_util.tree_map(jnp.asarray, write_layers(attention, layers))
    return {**params, "layers": {**params["layers"], "attention": new}}


def rope_rotation(rng, config: ModelConfig) -> np.ndarray:
    """A random orthogonal map that commutes with the config's RoPE: 2D rotations on pairs, any on free dims."""
    structure, D = rope_structure(config), config.head_dim
    r = np.zeros((D, D))
    for a, b in structure.pairs:
        t = rng.uniform(0, 2 * np.pi)
        r[np.ix_([a, b], [a, b])] = [[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]]
    free = list(structure.free)
    if free:
        r[np.ix_(free, free)] = np.linalg.qr(rng.normal(size=(len(free), len(free))))[0]
    return r


def expand_to_mha(layer: LayerHeads, config: ModelConfig, rng, rotate: bool) -> LayerHeads:
    """GQA layer -> an MHA layer of the same function: KV head g is copied to each of its query heads, each copy
    (optionally) rotated, the rotation folded into that query head (keys) or its output rows (values)."""
    H, n0 = layer.q.shape[1], layer.queries_per_kv_head
    q, o, keys, values = layer.q.copy(), layer.o.copy(), [], []
    for h in range(H):
        key_map = rope_rotation(rng, config) if rotate else np.eye(config.head_dim)
        value_map = np.linalg.qr(rng.normal(size=(config.head_dim,) * 2))[0] if rotate else np.eye(config.head_dim)
        keys.append(layer.k[:, h // n0] @ key_map)  # (q Q) . (k Q) = q . k
        q[:, h] = q[:, h] @ key_map
        values.append(layer.v[:, h // n0] @ value_map)  # (a v P)(P^T o) = a v o
        o[h] = value_map.T @ o[h]
    return LayerHeads(q, np.stack(keys, 1), np.stack(values, 1), o)


def mha_twin(position: str, rotate: bool, seed: int = 0):
    """(MHA config, MHA params) whose KV heads come in pairs that are copies (or exact rotations) of a GQA-2
    model's heads, the function being that GQA model's."""
    gqa, mha = config_of(position, 2), config_of(position, 4)
    rng = np.random.default_rng(seed)
    params = random_params(gqa, seed)
    attention = params["layers"]["attention"]
    layers = [expand_to_mha(layer, gqa, rng, rotate) for layer in read_layers(attention)]
    new = jax.tree_util.tree_map(jnp.asarray, write_layers(attention, layers))
    np.testing.assert_allclose(forward(mha)({**params, "layers": {**params["layers"], "attention": new}},
                                            *inputs(mha)), forward(gqa)(params, *inputs(gqa)), rtol=1e-5, atol=1e-5)
    return mha, {**params, "layers": {**params["layers"], "attention": new}}


@pytest.mark.parametrize("position", sorted(POSITIONS))
def test_a_consistent_head_permutation_leaves_the_logits_unchanged(position):
    for kv_heads in (4, 2):  # MHA, and a grouped source whose query heads move in blocks
        config = config_of(position, kv_heads)
        params = random_params(config)
        orders = [np.roll(np.arange(kv_heads), 1), np.arange(kv_heads)[::-1]]  # a different one per layer
        permuted = with_layers(params, config, lambda i, layer: layer.permuted(orders[i]))
        for i in range(2):
            np.testing.assert_array_equal(permuted["layers"]["attention"]["key"]["kernel"][i],
                                          params["layers"]["attention"]["key"]["kernel"][i][:, orders[i]])
        expected = np.asarray(forward(config)(params, *inputs(config)))
        # float32 sums over heads in another order: 1e-6 of the logits' scale
        np.testing.assert_allclose(forward(config)(permuted, *inputs(config)), expected, rtol=1e-6,
                                   atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("position", sorted(POSITIONS))
def test_aligned_and_svd_merges_of_exactly_rotated_heads_are_lossless_and_the_mean_is_not(position):
    mha, params = mha_twin(position, rotate=True)
    expected = forward(mha)(params, *inputs(mha))
    assert np.isfinite(expected).all()
    for merge in ("aligned", "svd"):
        converted, target = convert_params(params, mha, 2, merge)
        np.testing.assert_allclose(forward(target)(converted, *inputs(mha)), expected, rtol=1e-5, atol=1e-5,
                                   err_msg=merge)
    converted, target = convert_params(params, mha, 2, "mean")
    assert np.abs(np.asarray(forward(target)(converted, *inputs(mha))) - expected).max() > 1e-2


@pytest.mark.parametrize("grouping", ["contiguous", "similarity"])
def test_every_merge_of_heads_identical_within_groups_is_lossless(grouping):
    mha, params = mha_twin("rope_interleaved_partial", rotate=False)
    if grouping == "similarity":  # shuffle the heads so the copies are no longer neighbours; grouping finds them
        rng = np.random.default_rng(3)
        params = with_layers(params, mha, lambda i, layer: layer.permuted(rng.permutation(4)))
    expected = forward(mha)(params, *inputs(mha))
    calibration = kv_activations(params, mha, [calibration_batch(mha)])
    for merge in MERGES:
        for calibrated in (None, calibration):
            converted, target = convert_params(params, mha, 2, merge, grouping=grouping, calibration=calibrated)
            np.testing.assert_allclose(forward(target)(converted, *inputs(mha)), expected, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{merge}, calibration {calibrated is not None}")


def test_a_model_without_attention_biases_gets_none():
    config = config_of("rope_interleaved_partial", 4).replace(qkv_bias=False)
    params = random_params(config)
    assert "bias" not in params["layers"]["attention"]["key"]
    for merge in MERGES:
        converted, target = convert_params(params, config, 2, merge, grouping="similarity")
        assert jax.tree_util.tree_structure(converted) == jax.tree_util.tree_structure(params)
        assert np.isfinite(forward(target)(converted, *inputs(config))).all()


def test_with_one_head_per_group_every_method_is_the_identity():
    config = config_of("rope_half", 4)
    params = random_params(config)
    for merge in MERGES:
        for grouping in ("contiguous", "similarity"):
            converted, target = convert_params(params, config, 4, merge, grouping=grouping)
            assert target == config
            jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                                   converted, params)


def test_similarity_groups_are_balanced_and_recover_planted_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 5
    planted = rng.permutation(np.repeat(np.arange(4), 3))  # 12 heads, 4 clusters of 3, shuffled
    features = centres[planted] + 0.1 * rng.normal(size=(12, 16))
    groups = similarity_groups(squared_distances(features), 3)
    assert sorted(len(g) for g in groups) == [3, 3, 3, 3]
    assert sorted(sorted(planted[g].tolist()) for g in groups) == [[c] * 3 for c in range(4)]
    contiguous = [list(range(i, i + 3)) for i in range(0, 12, 3)]
    distances = squared_distances(features)
    assert grouping_cost(distances, groups) < grouping_cost(distances, contiguous)
    np.testing.assert_allclose(distances, ((features[:, None] - features[None]) ** 2).sum(-1), rtol=1e-9, atol=1e-9)


def calibration_batch(config: ModelConfig) -> dict:
    tokens, positions, segments, prefix = (np.asarray(x) for x in inputs(config, seed=5))
    segments = segments.copy()
    segments[1, 9:] = 0  # padding: not calibration tokens
    return {"tokens": tokens, "positions": positions, "segment_ids": segments, "prefix_mask": prefix}


def test_calibration_keys_are_the_pre_rope_projections_of_the_real_tokens():
    config = config_of("rope_half", 4)
    params = random_params(config)
    batch = calibration_batch(config)
    keys, values = kv_activations(params, config, [batch])
    assert len(keys) == 2 and keys[0].shape == (12 + 9, 4, 8)
    # Layer 0 by hand: RMS norm of the embedding, then the key / value projections with their biases.
    x = np.asarray(params["embedding"], np.float64)[batch["tokens"]][batch["segment_ids"] > 0]
    scale = np.asarray(params["layers"]["input_norm"]["scale"][0], np.float64)
    h = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + config.norm_eps) * scale
    attention = params["layers"]["attention"]
    for name, got in (("key", keys[0]), ("value", values[0])):
        want = np.einsum("ne,egd->ngd", h, np.asarray(attention[name]["kernel"][0])) + np.asarray(
            attention[name]["bias"][0])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_choices_are_named():
    config = config_of("rope_half", 4)
    params = random_params(config)
    with pytest.raises(ConversionError, match="grouping 'nearest' is unknown"):
        convert_params(params, config, 2, "mean", grouping="nearest")
    with pytest.raises(ConversionError, match="method 'random' draws new KV heads"):
        convert_params(params, config, 2, "random", grouping="similarity")
    with pytest.raises(ConversionError, match="method 'median' is unknown"):
        convert_params(params, config, 2, "median")

"""The GLM module: against an independent numpy model for every architecture family,
mask properties, GQA pooling, DeepNorm, gate halves, embedding shrink, tied head,
scan / remat equivalence, logical axis names, and a sharded forward."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import reference_model
from conftest import random_packing
from glm_jax.model import GLM, ModelConfig, init_params
from glm_jax.model.layers import Mlp
from glm_jax.parallel.rules import logical_axis_rules

# Tiny versions of each family (same knobs as the presets, toy sizes).
TINY = dict(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=48, max_position=64)
FAMILIES = {
    "glm": dict(),  # GLM-Large/10B: pre-LN, GeLU, learned 2D, tied
    "glm_130b": dict(residual="deepnorm", mlp_activation="geglu", position="rope", rope_style="half",
                     embedding_grad_scale=0.1),
    "chatglm_6b": dict(residual="deepnorm", position="rope_2d", rope_style="half"),
    "chatglm2": dict(num_kv_heads=2, norm="rmsnorm", mlp_activation="swiglu", position="rope",
                     rotary_fraction=0.5, rope_style="interleaved", out_bias=False, mlp_bias=False,
                     tie_embeddings=False),
    "mqa_post_ln": dict(num_kv_heads=1, residual="post", position="none"),
    "glm4_0414_sandwich": dict(num_kv_heads=2, residual="sandwich", norm="rmsnorm", mlp_activation="swiglu",
                               position="rope", rotary_fraction=0.5, rope_style="interleaved",
                               tie_embeddings=False),
}


def tiny(family: str, **overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, "scan_layers": False, **FAMILIES[family], **overrides})


@functools.lru_cache(maxsize=None)
def compiled_apply(config: ModelConfig):
    """One compiled forward per config, shared by every test that uses it."""
    return jax.jit(lambda p, *inputs: GLM(config).apply({"params": p}, *inputs))


@functools.lru_cache(maxsize=None)
def params_of(config: ModelConfig, seed: int = 0):
    params = nn.meta.unbox(init_params(config, jax.random.key(seed)))
    # Biases and norm parameters start at 0 / 1; perturb them so the test sees them.
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    perturbed = [leaf + 0.05 * jax.random.normal(key, leaf.shape) if path[-1].key in ("bias", "scale") else leaf
                 for (path, leaf), key in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, perturbed)


def packed_batch(config: ModelConfig, seed=0, batch=2, length=14):
    rng = np.random.default_rng(seed)
    seg, prefix, pos = random_packing(rng, batch, length, max_segments=3)
    tokens = rng.integers(0, config.vocab_size, size=(batch, length)).astype(np.int32)
    return tokens, pos, seg, prefix


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_matches_independent_numpy_model(family):
    config = tiny(family)
    params = params_of(config)
    inputs = packed_batch(config)
    got = compiled_apply(config)(params, *inputs)
    chex.assert_shape(got, (2, 14, config.vocab_size))
    want = reference_model.forward(config, jax.tree_util.tree_map(np.asarray, params), *inputs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_part_a_is_blind_to_part_b():
    config = tiny("chatglm2")
    tokens, pos, seg, prefix = packed_batch(config, seed=3, batch=1)
    seg[:], prefix[:] = 1, np.arange(14) < 6  # one example, sep = 6
    base = compiled_apply(config)(params_of(config), tokens, pos, seg, prefix)
    for i in range(6, 14):
        changed = tokens.copy()
        changed[0, i] = (changed[0, i] + 1) % config.vocab_size
        out = compiled_apply(config)(params_of(config), changed, pos, seg, prefix)
        np.testing.assert_array_equal(out[0, :6], base[0, :6])  # Part A: bit-identical
        np.testing.assert_array_equal(out[0, 6:i], base[0, 6:i])  # earlier Part B too (causal)
        assert not np.allclose(out[0, i:], base[0, i:])  # the change is visible from i on


def test_packed_segments_do_not_interact():
    config = tiny("glm")
    tokens, pos, seg, prefix = packed_batch(config, seed=5, batch=1)
    seg[0] = [1] * 5 + [2] * 6 + [0] * 3
    base = compiled_apply(config)(params_of(config), tokens, pos, seg, prefix)
    changed = tokens.copy()
    changed[0, 5:11] = (changed[0, 5:11] + 7) % config.vocab_size  # rewrite segment 2
    out = compiled_apply(config)(params_of(config), changed, pos, seg, prefix)
    np.testing.assert_array_equal(out[0, :5], base[0, :5])
    np.testing.assert_array_equal(out[0, 11:], base[0, 11:])


def test_all_false_prefix_is_a_causal_lm():
    # The same model with no prefix equals an explicit lower-triangular attention model.
    config = tiny("chatglm2")
    tokens, pos, _, _ = packed_batch(config, seed=6)
    ones, no_prefix = np.ones((2, 14), np.int32), np.zeros((2, 14), bool)
    pos = np.stack([np.broadcast_to(np.arange(14), (2, 14)), np.zeros((2, 14), int)], 1)
    got = compiled_apply(config)(params_of(config), tokens, pos, ones, no_prefix)
    want = reference_model.forward(config, jax.tree_util.tree_map(np.asarray, params_of(config)),
                                   tokens, pos, ones, no_prefix)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Causality itself: a change at t leaves every logit before t untouched.
    changed = tokens.copy()
    changed[:, 9] += 1
    out = compiled_apply(config)(params_of(config), changed, pos, ones, no_prefix)
    np.testing.assert_array_equal(out[:, :9], got[:, :9])


def _group_mean(kernel_or_bias, heads_axis, groups):
    shape = kernel_or_bias.shape
    split = shape[:heads_axis] + (groups, shape[heads_axis] // groups) + shape[heads_axis + 1:]
    return kernel_or_bias.reshape(split).mean(axis=heads_axis + 1)


def test_gqa_with_group_mean_kv_equals_mha_with_identical_heads():
    mha = tiny("chatglm2", num_kv_heads=4)
    gqa = mha.replace(num_kv_heads=2)
    params = jax.tree_util.tree_map(np.array, params_of(mha))
    for i in range(mha.num_layers):
        att = params[f"layers_{i}"]["attention"]
        for name in ("key", "value"):
            for leaf, axis in (("kernel", 1), ("bias", 0)):
                x = att[name][leaf]
                first_of_group = np.take(x, [0, 0, 2, 2], axis=axis)  # heads identical per group
                att[name][leaf] = first_of_group
    gqa_params = jax.tree_util.tree_map(np.array, params)
    for i in range(mha.num_layers):
        att = gqa_params[f"layers_{i}"]["attention"]
        for name in ("key", "value"):
            att[name]["kernel"] = _group_mean(att[name]["kernel"], 1, 2)
            att[name]["bias"] = _group_mean(att[name]["bias"], 0, 2)
    inputs = packed_batch(mha, seed=8)
    np.testing.assert_allclose(compiled_apply(gqa)(gqa_params, *inputs),
                               compiled_apply(mha)(params, *inputs), rtol=1e-5, atol=1e-5)


def test_deepnorm_init_gains():
    # Xavier-normal std = gain * sqrt(2 / (fan_in + fan_out)); beta = (2L)^-0.5 on value/out/MLP.
    config = ModelConfig(hidden_size=256, num_layers=8, num_heads=4, mlp_dim=512, residual="deepnorm",
                         mlp_activation="geglu", position="rope", scan_layers=False, vocab_size=64)
    layer = nn.meta.unbox(init_params(config, jax.random.key(0)))["layers_0"]
    beta = (2 * 8) ** -0.5
    E, HD, F = 256, 256, 512
    expected = {
        ("attention", "query"): 1.0 * (2 / (E + HD)) ** 0.5,
        ("attention", "value"): beta * (2 / (E + HD)) ** 0.5,
        ("attention", "out"): beta * (2 / (HD + E)) ** 0.5,
        ("mlp", "wi"): beta * (2 / (E + 2 * F)) ** 0.5,
        ("mlp", "wo"): beta * (2 / (F + E)) ** 0.5,
    }
    for (module, name), std in expected.items():
        measured = float(np.std(layer[module][name]["kernel"]))
        assert measured == pytest.approx(std, rel=0.03), (module, name)


@pytest.mark.parametrize("activation,gate", [("geglu", "second"), ("swiglu", "first")])
def test_gated_mlp_gate_half(activation, gate):
    config = ModelConfig(**{**TINY, "mlp_activation": activation, "mlp_bias": False})
    rng = np.random.default_rng(9)
    fused = rng.normal(size=(32, 2 * 48)).astype(np.float32)  # the reference's [E, 2F] kernel
    wo = rng.normal(size=(48, 32)).astype(np.float32)
    x = rng.normal(size=(1, 3, 32)).astype(np.float32)
    params = {"wi": {"kernel": fused.reshape(32, 2, 48)}, "wo": {"kernel": wo}}
    got = Mlp(config).apply({"params": params}, x)
    first, second = x @ fused[:, :48], x @ fused[:, 48:]
    if gate == "second":  # GLM-130B: x1 * gelu(x2), exact GeLU
        inner = first * reference_model.gelu_exact(second)
    else:  # ChatGLM2 / GLM-4: silu(x1) * x2
        inner = reference_model.silu(first) * second
    np.testing.assert_allclose(got, inner @ wo, rtol=1e-5, atol=1e-5)


def test_embedding_grad_shrink():
    shrunk = tiny("chatglm2", embedding_grad_scale=0.1)  # untied: only the input path
    plain = shrunk.replace(embedding_grad_scale=1.0)
    params = params_of(plain)
    inputs = packed_batch(plain, seed=10)

    def grads(config):
        loss = lambda p: jnp.sum(jnp.sin(GLM(config).apply({"params": p}, *inputs)))
        return jax.value_and_grad(loss)(params)

    (loss_s, g_s), (loss_p, g_p) = grads(shrunk), grads(plain)
    assert float(loss_s) == float(loss_p)  # forward bit-identical
    # Each token's gradient is scaled by 0.1 before the scatter-add into the table,
    # so rows agree to float32 summation-order rounding.
    np.testing.assert_allclose(g_s["embedding"], 0.1 * g_p["embedding"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(g_s["lm_head"]["kernel"], g_p["lm_head"]["kernel"], rtol=1e-6, atol=1e-9)


def test_tied_head_uses_embedding_and_untied_has_its_own():
    tied, untied = tiny("glm"), tiny("glm", tie_embeddings=False)
    assert "lm_head" not in params_of(tied)
    p_untied = dict(params_of(untied))
    p_untied["lm_head"] = {"kernel": p_untied["embedding"].T}  # an untied head set to E^T ...
    p_tied = {k: v for k, v in p_untied.items() if k != "lm_head"}
    inputs = packed_batch(tied, seed=11)
    # ... computes what the tied model computes, so tying is exactly "head = embedding^T".
    np.testing.assert_allclose(compiled_apply(untied)(p_untied, *inputs),
                               compiled_apply(tied)(p_tied, *inputs), rtol=1e-6, atol=1e-6)
    # Tied: the embedding's gradient has both the input and the output contributions.
    loss = lambda p: jnp.sum(GLM(tied).apply({"params": p}, *inputs)[..., :3])
    g = jax.grad(loss)(p_tied)["embedding"]
    assert float(jnp.abs(g[:3]).sum()) > 0 and float(jnp.abs(g[3:]).sum()) > 0


def _stack_layers(params, num_layers):
    layers = [params.pop(f"layers_{i}") for i in range(num_layers)]
    params["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    return params


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_and_rematerialised_equal_unrolled(remat):
    unrolled = tiny("glm_130b")
    scanned = unrolled.replace(scan_layers=True, remat_policy=remat)
    params = params_of(unrolled)
    stacked = _stack_layers(dict(params), unrolled.num_layers)
    inputs = packed_batch(unrolled, seed=12)
    loss = lambda config, p: jnp.mean(jnp.square(GLM(config).apply({"params": p}, *inputs)))
    l_u, g_u = jax.jit(jax.value_and_grad(functools.partial(loss, unrolled)))(params)
    l_s, g_s = jax.jit(jax.value_and_grad(functools.partial(loss, scanned)))(stacked)
    np.testing.assert_allclose(l_s, l_u, rtol=1e-6)
    chex.assert_trees_all_close(g_s, _stack_layers(dict(g_u), unrolled.num_layers), rtol=1e-5, atol=1e-7)


def test_every_parameter_has_logical_names():
    allowed = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", None}
    for family in FAMILIES:
        boxed = jax.eval_shape(lambda k: init_params(tiny(family, scan_layers=True), k), jax.random.key(0))
        leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        for leaf in leaves:
            assert isinstance(leaf, nn.LogicallyPartitioned), leaf
            assert len(leaf.names) == len(leaf.value.shape) and set(leaf.names) <= allowed
            assert leaf.names[0] == "layers" or "layers" not in leaf.names


def test_sharded_forward_equals_single_device():
    config = tiny("chatglm2", scan_layers=True, vocab_size=64)
    devices = np.array(jax.devices()[:8]).reshape(2, 1, 2, 1, 2)
    mesh = Mesh(devices, ("data", "stage", "fsdp", "sequence", "tensor"))
    rules = logical_axis_rules("fsdp_tp")
    boxed = init_params(config, jax.random.key(0))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    params = jax.device_put(nn.meta.unbox(boxed), shardings)
    inputs = packed_batch(config, seed=13, batch=4)
    # Weights split over fsdp (and 'sequence', one device here) along 'embed', heads over tensor, layers over
    # 'stage' (one device here).
    assert params["layers"]["attention"]["query"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
        "stage", ("fsdp", "sequence"), "tensor", None)

    def forward(p, *x):
        with nn.logical_axis_rules(rules):
            return GLM(config).apply({"params": p}, *x)

    with jax.set_mesh(mesh):
        sharded = jax.jit(forward)(params, *inputs)
    single = compiled_apply(config)(jax.device_get(params), *inputs)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)

"""Training-free context extension as mask options: LM-Infinite's Λ-shaped attention (sinks + a
window) and parallel context windows (PCW), in the dense reference and, as the disjoint range parts of
masks.range_parts merged by log-sum-exp, in the blockwise path and both flash kernels (forward and
gradients), with the key blocks the kernels visit counted by hand."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.kernels import masks
from glm_jax.kernels.attention import attention
from glm_jax.kernels.blocks import visited_blocks
from glm_jax.kernels.flash_attention import count_forward_visits
from glm_jax.kernels.flash_attention_tpu import flash_attention_tpu
from glm_jax.kernels.masks import LambdaShape, context_window_layout
from reference_model import mask_by_loops, narrow_by_loops

B, T, HQ, HKV, D = 2, 192, 4, 2, 16


def glm_rows():
    """Row 0: one segment with a Part A of 20; row 1: two segments (Part A 10 and 30) and padding."""
    segments = np.stack([np.ones(T, int), np.r_[np.ones(90, int), np.full(92, 2), np.zeros(10, int)]])
    prefix = np.zeros((B, T), bool)
    prefix[0, :20] = prefix[1, :10] = prefix[1, 90:120] = True
    return jnp.asarray(segments, jnp.int32), jnp.asarray(prefix)


def window_rows():
    """Row 0: windows of 50, 60 and 40 tokens, then 42 task tokens; row 1: two segments, each with two
    windows and a task (the second segment's first window bidirectional: a GLM Part A)."""
    _, ids0 = context_window_layout([50, 60, 40], 42)
    _, ids_a = context_window_layout([30, 30], 30)
    _, ids_b = context_window_layout([40, 20], 32)
    ids = np.stack([ids0, np.r_[ids_a, ids_b, np.zeros(10, int)]])
    segments = np.stack([np.ones(T, int), np.r_[np.ones(90, int), np.full(92, 2), np.zeros(10, int)]])
    prefix = np.zeros((B, T), bool)
    prefix[1, 90:130] = True
    return jnp.asarray(segments, jnp.int32), jnp.asarray(prefix), jnp.asarray(ids, jnp.int32)


def option_masks():
    """(name, segment ids, prefix, options) of every case."""
    segments, prefix = glm_rows()
    w_segments, w_prefix, ids = window_rows()
    return {"lambda": (segments, prefix, dict(lambda_shape=LambdaShape(sink=8, window=40))),
            "sliding_window": (segments, prefix, dict(lambda_shape=LambdaShape(sink=0, window=24))),
            "windows": (w_segments, w_prefix, dict(context_windows=ids))}


def by_loops(segments, prefix, lambda_shape=None, context_windows=None):
    """The options' definitions applied to reference_model's loop-built GLM mask, element by element."""
    segments, prefix = np.asarray(segments), np.asarray(prefix)
    sink, window = (lambda_shape.sink, lambda_shape.window) if lambda_shape else (0, 0)
    return np.stack([narrow_by_loops(mask_by_loops(s, p), s, sink, window,
                                     None if context_windows is None else np.asarray(context_windows)[b])
                     for b, (s, p) in enumerate(zip(segments, prefix))])


@pytest.mark.parametrize("case", ["lambda", "sliding_window", "windows"])
def test_the_dense_options_and_the_range_parts_equal_the_definition(case):
    segments, prefix, options = option_masks()[case]
    want = by_loops(segments, prefix, **options)
    q_index = jnp.arange(T)
    dense = masks.mask_options_dense(masks.dense_mask(segments, prefix), segments, q_index, **options)
    np.testing.assert_array_equal(dense, want)
    parts = [masks.mask_from_key_ranges(ks, ke) for ks, ke, _, _ in masks.range_parts(segments, prefix, **options)]
    np.testing.assert_array_equal(sum(np.asarray(p, int) for p in parts), want)  # disjoint, and their union
    for ks, ke, qs, qe in masks.range_parts(segments, prefix, **options):  # query ranges: the transposed parts
        keys_view = masks.mask_from_key_ranges(qs, qe)
        np.testing.assert_array_equal(np.swapaxes(np.asarray(keys_view), 1, 2), masks.mask_from_key_ranges(ks, ke))
    assert want.sum() < by_loops(segments, prefix).sum()  # the option hides something


def random_qkv(seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, T, HQ, D))
    k, v = (jax.random.normal(key, (B, T, HKV, D)) for key in keys[1:3])
    return q, k, v, jax.random.normal(keys[3], (B, T, HQ, D))


IMPLS = {"blockwise": functools.partial(attention, impl="blockwise"),
         "pallas_interpret": functools.partial(attention, impl="pallas_interpret")}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("case", ["lambda", "windows"])
def test_the_kernels_equal_the_reference_forward_and_gradients(impl, case):
    segments, prefix, options = option_masks()[case]
    q, k, v, cotangent = random_qkv()

    def loss(fn):
        def value(q, k, v):
            out, lse = fn(q, k, v, segments, prefix, return_lse=True, **options)
            return jnp.sum(out * cotangent) + jnp.sum(jnp.sin(lse))
        return jax.jit(jax.value_and_grad(value, argnums=(0, 1, 2)))

    want, want_grads = loss(functools.partial(attention, impl="xla"))(q, k, v)
    got, got_grads = loss(IMPLS[impl])(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


@pytest.mark.parametrize("case", ["lambda", "windows"])
def test_the_tpu_kernel_equals_the_reference(case):
    """The Mosaic kernel in interpret mode (blocks of 128), through the parts as kernels.attention runs them."""
    from glm_jax.kernels.attention import merge_parts

    segments, prefix, options = option_masks()[case]
    q, k, v, cotangent = random_qkv(1)

    def tpu(q, k, v):
        parts = [flash_attention_tpu(q, k, v, segments, prefix, scale=D ** -0.5, interpret=True, return_lse=True,
                                     ranges=part) for part in masks.range_parts(segments, prefix, **options)]
        return merge_parts(parts)[0]

    def xla(q, k, v):
        return attention(q, k, v, segments, prefix, impl="xla", **options)

    for fn in (tpu, xla):
        fn.grads = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) * cotangent), argnums=(0, 1, 2)))
    np.testing.assert_allclose(tpu(q, k, v), xla(q, k, v), rtol=1e-5, atol=1e-5)
    for g, w in zip(tpu.grads(q, k, v), xla.grads(q, k, v)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


def test_visited_blocks_equal_the_count_by_hand():
    """T = 512 causal, blocks of 64. Λ with 64 sinks and a window of 128: every query block visits the
    sink block (8), and its window part visits 0, 1, 2, then 3 key blocks (18): 26, against 36 for full
    causal attention. Four parallel windows of 128 and a task of 64: each window's two query blocks
    visit 1 + 2 of its own blocks (12), the task block its own (1) and the 8 window blocks (8): 21 of 45."""
    length, block = 512, 64
    ones, causal = jnp.ones((1, length), jnp.int32), jnp.zeros((1, length), bool)
    q = k = v = jnp.zeros((1, length, 1, 16))
    parts = masks.range_parts(ones, causal, lambda_shape=LambdaShape(sink=64, window=128))
    per_part = [int(visited_blocks(ones, causal, block, block, ranges=part)[0]) for part in parts]
    assert per_part == [8, 18] and int(visited_blocks(ones, causal, block, block)[0]) == 36
    measured = [count_forward_visits(q, k, v, ones, causal, block_q=block, block_k=block, ranges=part)
                for part in parts]  # the Triton kernel's own loop counters (interpret mode)
    assert [int(sum(np.asarray(m).sum() for m in counts)) for counts in measured] == per_part

    _, ids = context_window_layout([128] * 4, 64)
    length = ids.shape[0]
    ones, causal = jnp.ones((1, length), jnp.int32), jnp.zeros((1, length), bool)
    parts = masks.range_parts(ones, causal, context_windows=jnp.asarray(ids[None]))
    assert [int(visited_blocks(ones, causal, block, block, ranges=part)[0]) for part in parts] == [13, 8]
    assert int(visited_blocks(ones, causal, block, block)[0]) == 45


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="window 0 must be a whole number >= 1"):
        LambdaShape(sink=4, window=0)
    with pytest.raises(ValueError, match="sink -1 must be a whole number >= 0"):
        LambdaShape(sink=-1, window=4)
    segments, prefix = glm_rows()
    with pytest.raises(ValueError, match="separate options; use one"):
        masks.range_parts(segments, prefix, lambda_shape=LambdaShape(1, 2), context_windows=jnp.zeros((B, T), int))


# ------------------------------------------------------------------ the model
def model_config(**overrides):
    from glm_jax.model import ModelConfig

    return ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                       position="rope", norm="rmsnorm", mlp_activation="swiglu", scan_layers=False, **overrides)


def window_model_inputs():
    """Row 0: three context windows (7, 9, 5 tokens) and a task of 6; row 1: two windows (6, 6), the
    first bidirectional (a GLM Part A), a task of 8, then padding. Positions as PCW lays them out."""
    pos0, ids0 = context_window_layout([7, 9, 5], 6)
    pos1, ids1 = context_window_layout([6, 6], 8)
    length = len(ids0)
    pad = length - len(ids1)
    positions = np.stack([pos0, np.r_[pos1, np.zeros(pad, int)]])
    ids = np.stack([ids0, np.r_[ids1, np.zeros(pad, int)]])
    segments = np.stack([np.ones(length, int), np.r_[np.ones(len(ids1), int), np.zeros(pad, int)]])
    prefix = np.zeros_like(segments, bool)
    prefix[1, :6] = True
    tokens = np.random.default_rng(0).integers(0, 61, segments.shape)
    positions = np.stack([positions, np.zeros_like(positions)], axis=1)
    return tuple(jnp.asarray(x, jnp.int32) for x in (tokens, positions, segments)) + (jnp.asarray(prefix),), \
        jnp.asarray(ids, jnp.int32)


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_the_model_with_each_option_equals_the_independent_numpy_glm(impl):
    import flax.linen as nn

    import reference_model
    from glm_jax.model import GLM, init_params

    inputs, ids = window_model_inputs()
    for config, windows in ((model_config(attention_impl=impl, attention_sink=2, attention_window=4), None),
                            (model_config(attention_impl=impl), ids)):
        params = nn.unbox(init_params(config, jax.random.key(0)))
        got = GLM(config).apply({"params": params}, *inputs, context_windows=windows)
        want = reference_model.forward(config, jax.tree_util.tree_map(np.asarray, params),
                                       *(np.asarray(x) for x in inputs),
                                       context_windows=None if windows is None else np.asarray(windows))
        real = np.asarray(inputs[2]) > 0
        np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=1e-5, atol=1e-5)
        plain = GLM(model_config(attention_impl=impl)).apply({"params": params}, *inputs)
        assert np.abs(np.asarray(plain) - np.asarray(got))[real].max() > 1e-3  # the option changes something


@pytest.mark.parametrize("mode, sink, window", [
    ("causal", 2, 4),  # the ring wraps several times in 10 tokens after prompts of 6 and 3 (bucket 16)
    ("causal", 4, 3),  # the 3-token prompt's first generated token is a sink
    pytest.param("causal", 0, 5, marks=pytest.mark.slow),  # a plain sliding window
    pytest.param("blank", 2, 4, marks=pytest.mark.slow)])
def test_cached_decoding_with_lambda_attention_equals_the_full_forward(mode, sink, window):
    """Decoding through the bounded cache (n sinks + a ring of w slots) == the full forward with the Λ mask."""
    from test_generate import check_blank_decode_matches_full_forward, check_causal_decode_matches_full_forward
    from test_generate import tiny_config

    config = tiny_config("gqa2", "rope", scan=(mode == "blank"), attention_sink=sink, attention_window=window)
    check = check_blank_decode_matches_full_forward if mode == "blank" else check_causal_decode_matches_full_forward
    check(config)


def test_the_lambda_cache_holds_sink_plus_window_slots_whatever_the_lengths():
    from glm_jax.infer.cache import init_cache, kv_bytes, kv_bytes_per_token

    config = model_config(attention_sink=4, attention_window=16)
    per_slot = kv_bytes_per_token(config)  # K and V of every layer, one token
    for context, new in ((8, 4), (4096, 1024), (65536, 8192)):
        cache = jax.eval_shape(lambda context=context, new=new: init_cache(config, 2, context, new))
        assert kv_bytes(cache) == 2 * (4 + 16) * per_slot
    assert kv_bytes(jax.eval_shape(lambda: init_cache(model_config(), 2, 4096, 1024))) == 2 * 5120 * per_slot


def test_a_window_prefill_then_decoding_equals_the_full_forward():
    """Parallel context windows shape the prefill; the generated tokens are task tokens (window 0), which
    see every window: decoding three tokens after a PCW prefill == one forward over all of them."""
    import flax.linen as nn

    from glm_jax.infer.cache import init_cache
    from glm_jax.model import GLM, init_params

    config = model_config()
    params = nn.unbox(init_params(config, jax.random.key(1)))
    (tokens, positions, segments, prefix), ids = window_model_inputs()
    context, new = tokens.shape[1], 3
    extra = jnp.asarray(np.random.default_rng(1).integers(0, 61, (2, new)), jnp.int32)
    last = jnp.max(jnp.where(segments > 0, positions[:, 0], 0), axis=1)  # the task's last position per row
    full_positions = jnp.concatenate([positions, jnp.stack([last[:, None] + 1 + jnp.arange(new),
                                                            jnp.zeros((2, new), jnp.int32)], axis=1)], axis=2)
    model = GLM(config)
    # Row 1's padding comes before its generated tokens in the cache; in the full forward it is padding too.
    full = model.apply({"params": params}, jnp.concatenate([tokens, extra], 1), full_positions,
                       jnp.concatenate([segments, jnp.ones((2, new), jnp.int32)], 1),
                       jnp.concatenate([prefix, jnp.zeros((2, new), bool)], 1),
                       context_windows=jnp.concatenate([ids, jnp.zeros((2, new), jnp.int32)], 1))
    cache = init_cache(config, 2, context, new)
    _, variables = model.apply({"params": params, "cache": cache}, tokens, positions, segments, prefix, cache_index=0,
                               prefill=True, context_windows=ids, mutable=["cache"])
    for t in range(new):
        logits, variables = model.apply({"params": params, "cache": variables["cache"]}, extra[:, t:t + 1],
                                        full_positions[:, :, context + t:context + t + 1], jnp.ones((2, 1), jnp.int32),
                                        jnp.zeros((2, 1), bool), cache_index=context + t, mutable=["cache"])
        np.testing.assert_allclose(logits[:, 0], full[:, context + t], rtol=1e-5, atol=1e-5)


def test_the_lambda_parts_lower_for_cuda_and_compile_for_tpu():
    """Λ-shaped attention's two parts through the flash kernels, forward and backward, on the real GPU
    lowering (Triton) and the real TPU compiler (Mosaic, libtpu): three kernels per part."""
    from jax.experimental.pallas import triton as pallas_triton

    from glm_jax.kernels.attention import merge_parts
    from glm_jax.kernels.flash_attention import flash_attention

    batch, length, heads, kv_heads, dim = 1, 512, 8, 2, 64
    shape = LambdaShape(sink=16, window=128)

    def loss(kernel):
        def value(q, k, v, segments, prefix):
            parts = [kernel(q, k, v, segments, prefix, scale=dim ** -0.5, return_lse=True, ranges=part)
                     for part in masks.range_parts(segments, prefix, lambda_shape=shape)]
            return jnp.sum(merge_parts(parts)[0])
        return jax.jit(jax.value_and_grad(value, argnums=(0, 1, 2)))

    def avals(**sharding):
        def aval(shape, dtype=jnp.bfloat16):
            return jax.ShapeDtypeStruct(shape, dtype, **sharding)
        return (aval((batch, length, heads, dim)), aval((batch, length, kv_heads, dim)),
                aval((batch, length, kv_heads, dim)), aval((batch, length), jnp.int32), aval((batch, length), jnp.bool_))

    triton = functools.partial(flash_attention, compiler_params=pallas_triton.CompilerParams(num_warps=4, num_stages=2))
    module = jax.export.export(loss(triton), platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*avals()).mlir_module()
    assert module.count("__gpu$xla.gpu.triton") == 6
    pytest.importorskip("libtpu")
    from jax.sharding import SingleDeviceSharding

    from glm_jax.parallel.tpu_topology import topology_devices

    device = SingleDeviceSharding(topology_devices("v5e:2x2")[0])
    compiled = loss(flash_attention_tpu).lower(*avals(sharding=device)).compile()
    assert compiled.as_text().count("tpu_custom_call") == 6

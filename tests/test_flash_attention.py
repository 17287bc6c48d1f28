"""The Pallas flash kernel (interpret mode) against the XLA reference: forward, dQ, dK, dV."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_packing
from glm_jax import kernels
from glm_jax.kernels.attention import xla_attention
from glm_jax.kernels.flash_attention import flash_attention, visited_blocks


def make_mask(kind, rng, B, T):
    if kind == "causal":
        return np.ones((B, T), np.int32), np.zeros((B, T), bool)
    if kind == "bidirectional":
        return np.ones((B, T), np.int32), np.ones((B, T), bool)
    if kind == "single_prefix":
        sep = rng.integers(0, T + 1, size=B)
        return np.ones((B, T), np.int32), np.arange(T)[None] < sep[:, None]
    seg, prefix, _ = random_packing(rng, B, T)
    return seg, prefix


def check(B, T, Hq, Hkv, D, kind, block_q, block_k, seed=0):
    rng = np.random.default_rng(seed)
    seg, prefix = make_mask(kind, rng, B, T)
    q = jnp.asarray(rng.normal(size=(B, T, Hq, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, Hkv, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, Hkv, D)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(B, T, Hq, D)), jnp.float32)
    scale = D ** -0.5

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, seg, prefix) * cotangent)

    flash = lambda q, k, v, s, p: flash_attention(q, k, v, s, p, scale=scale, block_q=block_q, block_k=block_k,
                                                  interpret=True)
    reference = lambda q, k, v, s, p: xla_attention(q, k, v, s, p, scale=scale)
    out, grads = jax.value_and_grad(loss(flash), argnums=(0, 1, 2))(q, k, v)
    want, want_grads = jax.value_and_grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(flash(q, k, v, seg, prefix), reference(q, k, v, seg, prefix), rtol=1e-5, atol=1e-5)
    for name, got, ref in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref)) + 1), err_msg=f"d{name}")


# A cheap default grid: every mask kind, MHA / GQA / MQA, T not a block multiple,
# head dim 80 (padded), block_q != block_k both ways.
DEFAULT = [
    (2, 37, 4, 4, 16, "packed", 16, 16),
    (1, 64, 4, 2, 80, "single_prefix", 32, 16),
    (2, 45, 4, 1, 64, "causal", 16, 32),
    (1, 33, 2, 2, 16, "bidirectional", 16, 16),
    (1, 1, 2, 1, 16, "packed", 16, 16),
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,kind,block_q,block_k", DEFAULT)
def test_flash_matches_reference(B, T, Hq, Hkv, D, kind, block_q, block_k):
    check(B, T, Hq, Hkv, D, kind, block_q, block_k)


@pytest.mark.slow
@pytest.mark.parametrize("B,T,heads,D,kind", list(itertools.product(
    [1, 2], [1, 127, 256, 1000], [(8, 8), (8, 2), (8, 1)], [64, 80, 128],
    ["causal", "single_prefix", "packed", "bidirectional"])))
def test_flash_full_grid(B, T, heads, D, kind):
    check(B, T, heads[0], heads[1], D, kind, 64, 32 if T % 2 else 64)


def test_block_skipping_is_real():
    # A packed GLM batch: the visited key blocks equal the count from the key ranges,
    # and are well below the dense count.
    rng = np.random.default_rng(3)
    seg, prefix, _ = random_packing(rng, 4, 512, max_segments=5, pad=True)
    visited = np.asarray(visited_blocks(jnp.asarray(seg), jnp.asarray(prefix), 64, 64))
    from glm_jax.kernels import masks
    ks, ke = (np.asarray(x) for x in masks.key_ranges(jnp.asarray(seg), jnp.asarray(prefix)))
    by_hand = [sum(-(-ke[b, i:i + 64].max() // 64) - ks[b, i:i + 64].min() // 64 for i in range(0, 512, 64))
               for b in range(4)]
    np.testing.assert_array_equal(visited, by_hand)
    dense = (512 // 64) ** 2
    assert (visited < dense).all() and visited.mean() < 0.75 * dense


def test_visited_and_unmasked_blocks_match_the_dense_mask():
    """Blocks visited = blocks with any allowed pair; blocks run unmasked = blocks with only allowed pairs."""
    from glm_jax.kernels import masks

    seg, prefix, _ = random_packing(np.random.default_rng(5), 3, 256, max_segments=4, pad=True)
    for bq, bk in [(32, 32), (64, 32), (32, 64)]:
        dense = np.asarray(masks.dense_mask(jnp.asarray(seg), jnp.asarray(prefix)))
        tiles = dense.reshape(3, 256 // bq, bq, 256 // bk, bk)
        any_allowed, all_allowed = tiles.any(axis=(2, 4)).sum(axis=(1, 2)), tiles.all(axis=(2, 4)).sum(axis=(1, 2))
        args = (jnp.asarray(seg), jnp.asarray(prefix), bq, bk)
        np.testing.assert_array_equal(visited_blocks(*args), any_allowed)
        np.testing.assert_array_equal(visited_blocks(*args, fully_visible=True), all_allowed)
        assert all_allowed.sum() > 0  # the unmasked path is exercised


def test_dispatch_uses_the_kernel_in_interpret_mode():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 20, 2, 16)), jnp.float32)
    seg, prefix = jnp.ones((1, 20), jnp.int32), jnp.arange(20)[None] < 7
    np.testing.assert_allclose(kernels.attention(x, x, x, seg, prefix, impl="pallas_interpret"),
                               kernels.attention(x, x, x, seg, prefix, impl="xla"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,T,Hq,Hkv,D", [(1, 1000, 8, 2, 80), (2, 256, 8, 8, 64), (1, 127, 8, 1, 128)])
def test_forward_and_backward_lower_for_cuda_through_triton(B, T, Hq, Hkv, D):
    from jax.experimental.pallas import triton as pallas_triton

    params = pallas_triton.CompilerParams(num_warps=4, num_stages=2)

    def loss(q, k, v, seg, prefix):
        out = flash_attention(q, k, v, seg, prefix, scale=D ** -0.5, compiler_params=params)
        return jnp.sum(out.astype(jnp.float32))

    avals = [jax.ShapeDtypeStruct((B, T, Hq, D), jnp.bfloat16), jax.ShapeDtypeStruct((B, T, Hkv, D), jnp.bfloat16),
             jax.ShapeDtypeStruct((B, T, Hkv, D), jnp.bfloat16), jax.ShapeDtypeStruct((B, T), jnp.int32),
             jax.ShapeDtypeStruct((B, T), jnp.bool_)]
    exported = jax.export.export(
        jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*avals)
    module = exported.mlir_module()
    assert module.count("__gpu$xla.gpu.triton") == 3  # forward, dQ, dK/dV
    for name in ("glm_flash_forward", "glm_flash_dq", "glm_flash_dkv"):
        assert name in module


def test_glm_with_pallas_trains_like_xla():
    import optax

    from test_model import packed_batch, params_of, tiny
    from glm_jax.model import GLM
    from glm_jax.train.loss import masked_cross_entropy

    xla = tiny("chatglm2", num_layers=1)
    pallas = xla.replace(attention_impl="pallas_interpret")
    tokens, pos, seg, prefix = packed_batch(xla, seed=21)
    targets = np.roll(tokens, -1, axis=1)
    mask = np.ones(tokens.shape, np.float32)
    tx = optax.sgd(0.5)

    def run(config):
        loss_fn = lambda p: masked_cross_entropy(GLM(config).apply({"params": p}, tokens, pos, seg, prefix),
                                                 targets, mask)[0]
        step = jax.jit(jax.value_and_grad(loss_fn))
        params, opt_state, history = params_of(xla), tx.init(params_of(xla)), []
        for _ in range(3):
            loss, grads = step(params)
            history.append((loss, grads))
            updates, opt_state = tx.update(grads, opt_state)
            params = optax.apply_updates(params, updates)
        return history

    for (loss_p, grads_p), (loss_x, grads_x) in zip(run(pallas), run(xla)):
        np.testing.assert_allclose(loss_p, loss_x, rtol=1e-5)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_p, grads_x)


@pytest.mark.parametrize("Hkv,kind", [(2, "packed"), (1, "single_prefix")])
def test_bfloat16_error_is_within_the_references_own_bf16_error(Hkv, kind):
    """bf16 tolerance, justified: against the float32 result, the kernel on bf16 inputs may be off by
    no more than 2x what the XLA reference itself is off by on the same bf16 inputs (both round the
    inputs and the probabilities to bf16 and accumulate in float32; the kernel's online softmax and
    its block order are the only extra differences)."""
    rng = np.random.default_rng(3)
    B, T, Hq, D = 2, 100, 4, 64
    seg, prefix = make_mask(kind, rng, B, T)
    q, k, v, cot = (jnp.asarray(rng.normal(size=shape), jnp.float32)
                    for shape in ((B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, Hq, D)))
    scale = D ** -0.5
    flash = lambda q, k, v: flash_attention(q, k, v, seg, prefix, scale=scale, block_q=32, block_k=32,  # noqa: E731
                                            interpret=True)
    reference = lambda q, k, v: xla_attention(q, k, v, seg, prefix, scale=scale)  # noqa: E731

    def out_and_grads(fn, dtype):
        args = [x.astype(dtype) for x in (q, k, v)]
        out, vjp = jax.vjp(fn, *args)
        return [np.asarray(x, np.float32) for x in (out, *vjp(cot.astype(dtype)))]

    exact = out_and_grads(reference, jnp.float32)
    ref_bf16 = out_and_grads(reference, jnp.bfloat16)
    flash_bf16 = out_and_grads(flash, jnp.bfloat16)
    for name, want, ref, got in zip(("out", "dq", "dk", "dv"), exact, ref_bf16, flash_bf16):
        reference_error = np.max(np.abs(ref - want))
        assert reference_error > 0  # the bf16 path really is lossy
        assert np.max(np.abs(got - want)) <= 2 * reference_error, name

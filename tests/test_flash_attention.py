"""The Pallas flash kernel (interpret mode) against the XLA reference: forward, dQ, dK, dV."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_packing
from glm_jax import kernels
from glm_jax.kernels.attention import xla_attention
from glm_jax.kernels.blocks import visited_blocks
from glm_jax.kernels.flash_attention import count_forward_visits, flash_attention


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


def random_inputs(rng, B, T, S, Hq, Hkv, D):
    """q, k, v and an output cotangent, float32."""
    return [jnp.asarray(rng.normal(size=shape), jnp.float32)
            for shape in ((B, T, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D), (B, T, Hq, D))]


def assert_matches_reference(kernel, B, T, Hq, Hkv, D, kind, S=None, q_offset=None, seed=0):
    """Output and dQ, dK, dV of kernel(q, k, v, seg, prefix, scale=, q_offset=) vs the XLA reference at 1e-5."""
    rng = np.random.default_rng(seed)
    S = T if S is None else S
    seg, prefix = make_mask(kind, rng, B, S)
    q, k, v, cotangent = random_inputs(rng, B, T, S, Hq, Hkv, D)
    scale = D ** -0.5
    flash = lambda q, k, v: kernel(q, k, v, seg, prefix, scale=scale, q_offset=q_offset)  # noqa: E731
    reference = lambda q, k, v: xla_attention(q, k, v, seg, prefix, scale=scale, q_offset=q_offset)  # noqa: E731
    out, vjp = jax.vjp(flash, q, k, v)
    want, want_vjp = jax.vjp(reference, q, k, v)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    for name, got, ref in zip("qkv", vjp(cotangent), want_vjp(cotangent)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref)) + 1), err_msg=f"d{name}")


def check(B, T, Hq, Hkv, D, kind, block_q, block_k, S=None, q_offset=None, seed=0):
    kernel = functools.partial(flash_attention, block_q=block_q, block_k=block_k, interpret=True)
    assert_matches_reference(kernel, B, T, Hq, Hkv, D, kind, S=S, q_offset=q_offset, seed=seed)


# A cheap default grid: every mask kind, MHA / GQA / MQA, T not a block multiple,
# head dims 16-256 (80, 96 padded), block_q != block_k both ways, and query windows shorter than
# the keys (the last T keys, the first T, one in the middle, a single query).
DEFAULT = [
    (2, 37, 4, 4, 16, "packed", 16, 16, None, None),
    (1, 64, 4, 2, 80, "single_prefix", 32, 16, None, None),
    (2, 45, 4, 1, 64, "causal", 16, 32, None, None),
    (1, 33, 2, 2, 16, "bidirectional", 16, 16, None, None),
    (1, 1, 2, 1, 16, "packed", 16, 16, None, None),
    (2, 37, 4, 2, 16, "packed", 16, 32, 100, None),
    (1, 40, 2, 1, 16, "single_prefix", 32, 16, 90, 0),
    (2, 1, 4, 2, 16, "packed", 16, 16, 70, 33),
    (1, 40, 2, 1, 96, "packed", 16, 32, None, None),
    (1, 40, 2, 2, 256, "single_prefix", 32, 16, None, None),
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,kind,block_q,block_k,S,q_offset", DEFAULT)
def test_flash_matches_reference(B, T, Hq, Hkv, D, kind, block_q, block_k, S, q_offset):
    check(B, T, Hq, Hkv, D, kind, block_q, block_k, S=S, q_offset=q_offset)


@pytest.mark.slow
@pytest.mark.parametrize("B,T,heads,D,kind", list(itertools.product(
    [1, 2], [1, 127, 256, 1000], [(8, 8), (8, 2), (8, 1)], [64, 80, 128],
    ["causal", "single_prefix", "packed", "bidirectional"])))
def test_flash_full_grid(B, T, heads, D, kind):
    check(B, T, heads[0], heads[1], D, kind, 64, 32 if T % 2 else 64)


@pytest.mark.slow
@pytest.mark.parametrize("T,S,q_offset", [(127, 1000, None), (256, 1000, 0), (1, 1000, None), (200, 256, 31)])
@pytest.mark.parametrize("kind", ["causal", "single_prefix", "packed", "bidirectional"])
def test_flash_query_windows(T, S, q_offset, kind):
    check(2, T, 8, 2, 80, kind, 64, 32, S=S, q_offset=q_offset)


def test_block_skipping_is_real():
    """A packed GLM batch: the key blocks the forward kernel's loops really ran (counted inside the
    kernel) equal the count from the key ranges, by hand and by visited_blocks, and are well below
    the dense count; the unmasked visits equal the fully visible blocks."""
    from glm_jax.kernels import masks

    rng = np.random.default_rng(3)
    seg, prefix, _ = random_packing(rng, 4, 512, max_segments=5, pad=True)
    x = jnp.asarray(rng.normal(size=(4, 512, 2, 16)), jnp.float32)
    masked, unmasked = count_forward_visits(x, x[:, :, :1], x[:, :, :1], seg, prefix, block_q=64, block_k=64)
    assert masked.shape == (4, 2, 512 // 64)
    np.testing.assert_array_equal(masked[:, 0], masked[:, 1])  # both query heads of the KV head
    counted = np.asarray(masked[:, 0] + unmasked[:, 0]).sum(axis=1)
    ks, ke = (np.asarray(x) for x in masks.key_ranges(jnp.asarray(seg), jnp.asarray(prefix)))
    by_hand = [sum(-(-ke[b, i:i + 64].max() // 64) - ks[b, i:i + 64].min() // 64 for i in range(0, 512, 64))
               for b in range(4)]
    np.testing.assert_array_equal(counted, by_hand)
    np.testing.assert_array_equal(counted, visited_blocks(jnp.asarray(seg), jnp.asarray(prefix), 64, 64))
    np.testing.assert_array_equal(np.asarray(unmasked[:, 0]).sum(axis=1),
                                  visited_blocks(jnp.asarray(seg), jnp.asarray(prefix), 64, 64, fully_visible=True))
    dense = (512 // 64) ** 2
    assert (counted < dense).all() and counted.mean() < 0.75 * dense
    assert np.asarray(unmasked).sum() > 0


@pytest.mark.parametrize("q_len,q_offset", [(None, None), (128, 64), (64, None)])
def test_visited_and_unmasked_blocks_match_the_dense_mask(q_len, q_offset):
    """Blocks visited = blocks with any allowed pair; blocks run unmasked = blocks with only allowed pairs
    (for all 256 queries, and for query windows of the keys)."""
    from glm_jax.kernels import masks

    seg, prefix, _ = random_packing(np.random.default_rng(5), 3, 256, max_segments=4, pad=True)
    T = q_len or 256
    offset = 256 - T if q_offset is None else q_offset
    dense = np.asarray(masks.dense_mask(jnp.asarray(seg), jnp.asarray(prefix), q_len=T, q_offset=offset))
    unmasked = 0
    for bq, bk in [(32, 32), (64, 32), (32, 64)]:
        tiles = dense.reshape(3, T // bq, bq, 256 // bk, bk)
        any_allowed, all_allowed = tiles.any(axis=(2, 4)).sum(axis=(1, 2)), tiles.all(axis=(2, 4)).sum(axis=(1, 2))
        count = functools.partial(visited_blocks, jnp.asarray(seg), jnp.asarray(prefix), bq, bk, q_len=q_len,
                                  q_offset=q_offset)
        np.testing.assert_array_equal(count(), any_allowed)
        np.testing.assert_array_equal(count(fully_visible=True), all_allowed)
        unmasked += all_allowed.sum()
    assert unmasked > 0  # the unmasked path is exercised


def test_query_window_errors_say_what_to_pass():
    x, seg, prefix = jnp.zeros((1, 8, 2, 16)), jnp.ones((1, 8), jnp.int32), jnp.zeros((1, 8), bool)
    with pytest.raises(ValueError, match="at least as many keys"):
        kernels.attention(jnp.zeros((1, 9, 2, 16)), x, x, seg, prefix, impl="xla")
    with pytest.raises(ValueError, match="0 <= q_offset <= 4"):
        kernels.attention(x[:, :4], x, x, seg, prefix, impl="xla", q_offset=5)
    with pytest.raises(ValueError, match=r"describe the keys and must both be \[B, S\]"):
        kernels.attention(x[:, :4], x, x, seg[:, :4], prefix[:, :4], impl="xla")


def test_dispatch_uses_the_kernel_in_interpret_mode():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 20, 2, 16)), jnp.float32)
    seg, prefix = jnp.ones((1, 20), jnp.int32), jnp.arange(20)[None] < 7
    np.testing.assert_allclose(kernels.attention(x, x, x, seg, prefix, impl="pallas_interpret"),
                               kernels.attention(x, x, x, seg, prefix, impl="xla"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,T,Hq,Hkv,D,S", [(1, 1000, 8, 2, 80, 1000), (2, 256, 8, 8, 64, 256),
                                              (1, 127, 8, 1, 128, 127), (1, 100, 8, 2, 96, 1000)])
def test_forward_and_backward_lower_for_cuda_through_triton(B, T, Hq, Hkv, D, S):
    from jax.experimental.pallas import triton as pallas_triton

    params = pallas_triton.CompilerParams(num_warps=4, num_stages=2)

    def loss(q, k, v, seg, prefix):
        out = flash_attention(q, k, v, seg, prefix, scale=D ** -0.5, compiler_params=params)
        return jnp.sum(out.astype(jnp.float32))

    avals = [jax.ShapeDtypeStruct((B, T, Hq, D), jnp.bfloat16), jax.ShapeDtypeStruct((B, S, Hkv, D), jnp.bfloat16),
             jax.ShapeDtypeStruct((B, S, Hkv, D), jnp.bfloat16), jax.ShapeDtypeStruct((B, S), jnp.int32),
             jax.ShapeDtypeStruct((B, S), jnp.bool_)]
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
    from glm_jax.model.loss import masked_cross_entropy

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

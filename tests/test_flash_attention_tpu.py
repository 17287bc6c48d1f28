"""The TPU (Mosaic) flash kernel: interpret-mode semantics vs the XLA reference, block skipping,
and a real TPU compile for v5e / v4 / v5p topologies from this CPU machine (libtpu)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from glm_jax.kernels.attention import resolve_impl, xla_attention
from glm_jax.kernels.flash_attention import visited_blocks
from glm_jax.kernels import masks
from glm_jax.kernels.flash_attention_tpu import _block_ranges, flash_attention_tpu
from test_flash_attention import make_mask

CASES = [(2, 200, 4, 2, 64, "packed"), (1, 127, 4, 1, 128, "single_prefix"), (1, 1, 2, 2, 80, "causal"),
         (1, 256, 2, 2, 64, "bidirectional")]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,kind", CASES)
def test_tpu_kernel_matches_reference_in_interpret_mode(B, T, Hq, Hkv, D, kind):
    rng = np.random.default_rng(1)
    seg, prefix = make_mask(kind, rng, B, T)
    q, k, v, cot = (jnp.asarray(rng.normal(size=s), jnp.float32)
                    for s in ((B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, Hq, D)))
    scale = D ** -0.5
    flash = lambda q, k, v: flash_attention_tpu(q, k, v, seg, prefix, scale=scale, interpret=True)  # noqa: E731
    reference = lambda q, k, v: xla_attention(q, k, v, seg, prefix, scale=scale)  # noqa: E731
    out, vjp = jax.vjp(flash, q, k, v)
    want, want_vjp = jax.vjp(reference, q, k, v)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    for name, got, ref in zip("qkv", vjp(cot), want_vjp(cot)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref)) + 1), err_msg=f"d{name}")


def test_tpu_block_ranges_skip_exactly_like_the_generic_kernel(rng):
    from conftest import random_packing

    seg, prefix, _ = random_packing(rng, 4, 1024, max_segments=5, pad=False)
    ks, ke = masks.key_ranges(jnp.asarray(seg), jnp.asarray(prefix))
    first, full_first, full_last, last = _block_ranges(ks, ke, 128, 128)
    visited = np.asarray(jnp.sum(last - first, axis=1))
    np.testing.assert_array_equal(visited, visited_blocks(jnp.asarray(seg), jnp.asarray(prefix), 128, 128))
    np.testing.assert_array_equal(jnp.sum(full_last - full_first, axis=1),
                                  visited_blocks(jnp.asarray(seg), jnp.asarray(prefix), 128, 128, fully_visible=True))
    assert visited.max() < (1024 // 128) ** 2


def test_auto_picks_the_kernel_on_accelerators_only():
    assert resolve_impl("auto", "tpu") == resolve_impl("auto", "gpu") == "pallas"
    assert resolve_impl("auto", "cpu") == "xla"
    with pytest.raises(ValueError, match="TPU blocks must be multiples of 128"):
        x = jnp.zeros((1, 8, 2, 64))
        flash_attention_tpu(x, x, x, jnp.ones((1, 8), jnp.int32), jnp.zeros((1, 8), bool), scale=1.0, block_q=64)


@pytest.mark.parametrize("topology", ["v5e:2x2", "v4:2x2x1", "v5p:2x2x1"])
def test_forward_and_backward_compile_for_tpu(topology):
    """The real TPU compiler (Mosaic included) accepts all three kernels for these shapes."""
    pytest.importorskip("libtpu")
    from glm_jax.preflight import topology_devices

    device = SingleDeviceSharding(topology_devices(topology)[0])
    for B, T, Hq, Hkv, D in [(1, 1000, 8, 2, 80), (2, 256, 8, 8, 64), (1, 127, 8, 1, 128)]:
        def loss(q, k, v, seg, prefix):
            return jnp.sum(flash_attention_tpu(q, k, v, seg, prefix, scale=D ** -0.5).astype(jnp.float32))

        aval = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=device)  # noqa: E731
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(
            aval((B, T, Hq, D)), aval((B, T, Hkv, D)), aval((B, T, Hkv, D)), aval((B, T), jnp.int32),
            aval((B, T), jnp.bool_)).compile()
        text = compiled.as_text()
        assert text.count("tpu_custom_call") == 3, (topology, B, T)  # forward, dQ, dK/dV

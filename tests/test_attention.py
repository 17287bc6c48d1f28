"""The XLA attention reference vs a per-head numpy reference, and GQA grouping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_packing
from glm_jax import kernels
from reference_model import mask_by_loops


def numpy_attention(q, k, v, seg, prefix):
    """Per batch, per head loops; query head h reads KV head h // (Hq // Hkv)."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    out = np.zeros(q.shape, np.float64)
    for b in range(B):
        allowed = mask_by_loops(seg[b], prefix[b])
        for h in range(Hq):
            g = h // (Hq // Hkv)
            s = q[b, :, h].astype(np.float64) @ k[b, :, g].T / math.sqrt(D)
            s = np.where(allowed, s, -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, h] = (w / w.sum(-1, keepdims=True)) @ v[b, :, g]
    return out


_jitted = jax.jit(kernels.attention, static_argnames=("impl", "scale"))


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_xla_attention_equals_numpy(hq, hkv):
    rng = np.random.default_rng(hq * 10 + hkv)
    B, T, D = 2, 19, 8
    seg, prefix, _ = random_packing(rng, B, T)
    q = rng.normal(size=(B, T, hq, D)).astype(np.float32)
    k = rng.normal(size=(B, T, hkv, D)).astype(np.float32)
    v = rng.normal(size=(B, T, hkv, D)).astype(np.float32)
    got = _jitted(q, k, v, seg, prefix, impl="xla")
    np.testing.assert_allclose(got, numpy_attention(q, k, v, seg, prefix), rtol=1e-5, atol=1e-5)


def test_grouped_kv_equals_repeated_kv():
    # GQA must equal MHA whose KV heads are repeated per group (contiguous groups).
    rng = np.random.default_rng(7)
    B, T, Hq, Hkv, D = 1, 16, 8, 2, 4
    seg, prefix, _ = random_packing(rng, B, T)
    q = rng.normal(size=(B, T, Hq, D)).astype(np.float32)
    k = rng.normal(size=(B, T, Hkv, D)).astype(np.float32)
    v = rng.normal(size=(B, T, Hkv, D)).astype(np.float32)
    grouped = _jitted(q, k, v, seg, prefix, impl="xla")
    repeated = _jitted(q, np.repeat(k, Hq // Hkv, 2), np.repeat(v, Hq // Hkv, 2), seg, prefix, impl="xla")
    np.testing.assert_allclose(grouped, repeated, rtol=1e-6, atol=1e-6)


def test_padding_rows_are_finite():
    seg = jnp.asarray([[1, 1, 1, 0, 0]])
    prefix = jnp.asarray([[True, False, False, False, False]])
    x = jnp.ones((1, 5, 2, 4))
    assert bool(jnp.all(jnp.isfinite(kernels.attention(x, x, x, seg, prefix))))


def test_bad_shapes_and_impl_are_explained():
    x = jnp.ones((1, 4, 3, 8))
    seg, prefix = jnp.ones((1, 4), jnp.int32), jnp.zeros((1, 4), bool)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        kernels.attention(x, jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)), seg, prefix)
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        kernels.attention(x, x, x, seg[:, :3], prefix)
    with pytest.raises(ValueError, match="impl"):
        kernels.attention(x, x, x, seg, prefix, impl="flash")


@pytest.mark.parametrize("kv_heads", [8, 2, 1])
def test_cached_attention_over_parts_equals_dense_attention(kv_heads):
    """The decode layout (keys [B, G, D, S], values [B, G, S, D], in two parts, queries grouped
    per KV head as matmul rows) against the dense reference on the same keys, T = 3 queries."""
    rng = np.random.default_rng(kv_heads)
    B, T, H, D, parts = 2, 3, 8, 16, (11, 5)
    q = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    keys = [jnp.asarray(rng.normal(size=(B, kv_heads, D, S)), jnp.float32) for S in parts]
    values = [jnp.asarray(rng.normal(size=(B, kv_heads, S, D)), jnp.float32) for S in parts]
    allowed = rng.random((B, T, sum(parts))) < 0.6
    allowed[..., 0] = True  # every query sees something
    out = kernels.cached_attention(q, tuple(keys), tuple(values), jnp.asarray(allowed))
    k = jnp.concatenate(keys, axis=3).transpose(0, 3, 1, 2)  # [B, S, G, D]
    v = jnp.concatenate(values, axis=2).transpose(0, 2, 1, 3)
    reference = kernels.masked_attention(q, k, v, jnp.asarray(allowed), scale=D ** -0.5)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-6)

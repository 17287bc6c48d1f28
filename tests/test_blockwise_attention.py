"""The XLA blockwise attention (the CPU path of 'auto') against the dense reference: forward, dQ, dK, dV."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax import kernels
from glm_jax.kernels.attention import BLOCKWISE_MIN_KEYS, resolve_impl, xla_attention
from glm_jax.kernels.blockwise_attention import blockwise_attention
from test_flash_attention import DEFAULT, assert_matches_reference


# The flash kernel's grid (test_flash_attention.DEFAULT): packed MHA, GQA with one prefix and
# block_q != block_k, MQA causal, a window of the last 37 of 100 keys, one query in the middle of 70
# keys; the rest of the grid is marked slow (each case compiles its own loops).
FAST = [DEFAULT[i] for i in (0, 1, 2, 5, 7)]
SLOW = [pytest.param(*case, marks=pytest.mark.slow) for case in DEFAULT if case not in FAST]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,kind,block_q,block_k,S,q_offset", FAST + SLOW)
def test_blockwise_matches_reference(B, T, Hq, Hkv, D, kind, block_q, block_k, S, q_offset):
    """Every mask kind, MHA / GQA / MQA, lengths off the blocks, query windows shorter than the keys."""
    kernel = jax.jit(functools.partial(blockwise_attention, block_q=block_q, block_k=block_k),
                     static_argnames=("scale", "q_offset"))  # compiled: its loops run op by op otherwise
    assert_matches_reference(kernel, B, T, Hq, Hkv, D, kind, S=S, q_offset=q_offset)


def test_auto_on_cpu_is_blockwise_from_the_threshold_and_dense_below():
    assert resolve_impl("auto", "cpu", kv_len=BLOCKWISE_MIN_KEYS - 1) == "xla"
    assert resolve_impl("auto", "cpu", kv_len=BLOCKWISE_MIN_KEYS) == "blockwise"
    rng = np.random.default_rng(1)
    T = BLOCKWISE_MIN_KEYS
    q, k, v = (jnp.asarray(rng.normal(size=(1, T, 2, 16)), jnp.float32) for _ in range(3))
    seg, prefix = jnp.ones((1, T), jnp.int32), jnp.arange(T)[None] < 300

    def auto(q, k, v):
        return kernels.attention(q, k, v, seg, prefix, impl="auto")

    assert "while" in str(jax.make_jaxpr(auto)(q, k, v))  # the blockwise loops, not the dense reference
    want = xla_attention(q, k, v, seg, prefix, scale=0.25)
    np.testing.assert_allclose(jax.jit(auto)(q, k, v), want, rtol=1e-5, atol=1e-6)


def _temporary_bytes(impl, T):
    B, H, D = 1, 2, 16
    x = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
    seg, prefix = jnp.ones((B, T), jnp.int32), jnp.arange(T)[None] < T // 3

    def loss(q, k, v):
        return jnp.sum(kernels.attention(q, k, v, seg, prefix, impl=impl) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_memory_is_linear_in_length():
    """Forward + backward never forms [T, T]: at T = 2048 the dense reference's temporaries hold several
    T x T float32 arrays per head (16 MiB each), the blockwise path's a few blocks and O(T) vectors."""
    dense, blockwise = _temporary_bytes("xla", 2048), _temporary_bytes("blockwise", 2048)
    assert dense > 2 * 2 * 2048 * 2048 * 4  # at least two [H, T, T] float32 arrays
    assert blockwise * 16 < dense, (blockwise, dense)

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


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_blockwise_under_a_sharded_batch_and_heads_equals_the_reference(axis_type):
    """Batch over 'data' and heads over 'tensor' (4 of the 8 simulated devices): the loops' carries keep
    the inputs' sharding (explicit mesh axes reject a replicated carry) and the result is the reference's."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(getattr(AxisType, axis_type),) * 2,
                         devices=jax.devices()[:4])
    rng = np.random.default_rng(3)
    B, T, H, D = 4, 200, 4, 16
    q, k, v, cotangent = (jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32) for _ in range(4))
    seg = jnp.asarray(np.repeat([[1] * 120 + [2] * 80], B, axis=0).astype(np.int32))
    prefix = jnp.asarray(np.repeat([np.arange(T) % 120 < 30], B, axis=0))
    sharding = NamedSharding(mesh, PartitionSpec("data", None, "tensor", None))
    q, k, v, cotangent = (jax.device_put(x, sharding) for x in (q, k, v, cotangent))

    def loss_and_grads(attend):
        loss = lambda q, k, v: jnp.sum(attend(q, k, v, seg, prefix, scale=0.25) * cotangent)  # noqa: E731
        with jax.set_mesh(mesh):
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    got = loss_and_grads(functools.partial(blockwise_attention, block_q=64, block_k=32))
    want = loss_and_grads(xla_attention)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for name, a, b in zip("qkv", got[1], want[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")

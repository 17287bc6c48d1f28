"""The TPU (Mosaic) flash kernel: interpret-mode semantics vs the XLA reference, block skipping,
and a real TPU compile for v5e / v4 / v5p topologies from this CPU machine (libtpu)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from glm_jax.kernels.attention import BLOCKWISE_MIN_KEYS, resolve_impl
from glm_jax.kernels.blocks import visited_blocks
from glm_jax.kernels import masks
from glm_jax.kernels.flash_attention_tpu import _block_ranges, flash_attention_tpu
from test_flash_attention import assert_matches_reference

# Every mask kind, MHA / GQA / MQA, T not a block multiple, head dims 64-256 (80 and 96
# padded to 128 lanes), block_q != block_k both ways, query windows shorter than the keys.
CASES = [(2, 200, 4, 2, 64, "packed", None, None, (128, 128)),
         (1, 127, 4, 1, 128, "single_prefix", None, None, (128, 128)),
         (1, 1, 2, 2, 80, "causal", None, None, (128, 128)),
         (1, 256, 2, 2, 64, "bidirectional", None, None, (128, 128)),
         (2, 37, 4, 1, 64, "packed", 300, None, (128, 256)),
         (1, 130, 2, 2, 96, "single_prefix", 300, 0, (256, 128)),
         (1, 150, 2, 1, 256, "packed", None, None, (128, 128))]
interpreted = functools.partial(flash_attention_tpu, interpret=True)


@pytest.mark.parametrize("B,T,Hq,Hkv,D,kind,S,q_offset,blocks", CASES)
def test_tpu_kernel_matches_reference_in_interpret_mode(B, T, Hq, Hkv, D, kind, S, q_offset, blocks):
    kernel = functools.partial(interpreted, block_q=blocks[0], block_k=blocks[1])
    assert_matches_reference(kernel, B, T, Hq, Hkv, D, kind, S=S, q_offset=q_offset, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("B,T,heads,D,kind", list(itertools.product(
    [1, 2], [1, 127, 256, 1000], [(8, 8), (8, 2), (8, 1)], [64, 80, 128],
    ["causal", "single_prefix", "packed", "bidirectional"])))
def test_tpu_kernel_full_grid(B, T, heads, D, kind):
    """The issue's acceptance grid for the Mosaic kernel (128-row blocks), in interpret mode."""
    assert_matches_reference(interpreted, B, T, heads[0], heads[1], D, kind)


@pytest.mark.slow
@pytest.mark.parametrize("T,S,q_offset", [(127, 1000, None), (256, 1000, 0), (1, 1000, None), (200, 256, 31)])
@pytest.mark.parametrize("kind", ["causal", "single_prefix", "packed", "bidirectional"])
def test_tpu_kernel_query_windows(T, S, q_offset, kind):
    assert_matches_reference(interpreted, 2, T, 8, 2, 80, kind, S=S, q_offset=q_offset)


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
    assert resolve_impl("auto", "cpu", kv_len=BLOCKWISE_MIN_KEYS - 1) == "xla"
    assert resolve_impl("auto", "cpu", kv_len=4096) == "blockwise"
    with pytest.raises(ValueError, match="TPU blocks must be multiples of 128"):
        x = jnp.zeros((1, 8, 2, 64))
        flash_attention_tpu(x, x, x, jnp.ones((1, 8), jnp.int32), jnp.zeros((1, 8), bool), scale=1.0, block_q=64)


@pytest.mark.parametrize("topology", ["v5e:2x2", "v4:2x2x1", "v5p:2x2x1"])
def test_forward_and_backward_compile_for_tpu(topology):
    """The real TPU compiler (Mosaic included) accepts all three kernels for these shapes."""
    pytest.importorskip("libtpu")
    from glm_jax.parallel.tpu_topology import topology_devices

    device = SingleDeviceSharding(topology_devices(topology)[0])
    for B, T, Hq, Hkv, D, S in [(1, 1000, 8, 2, 80, 1000), (2, 256, 8, 8, 64, 256), (1, 127, 8, 1, 128, 127),
                                (1, 100, 8, 2, 96, 1000)]:
        def loss(q, k, v, seg, prefix):
            return jnp.sum(flash_attention_tpu(q, k, v, seg, prefix, scale=D ** -0.5).astype(jnp.float32))

        aval = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=device)  # noqa: E731
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(
            aval((B, T, Hq, D)), aval((B, S, Hkv, D)), aval((B, S, Hkv, D)), aval((B, S), jnp.int32),
            aval((B, S), jnp.bool_)).compile()
        text = compiled.as_text()
        assert text.count("tpu_custom_call") == 3, (topology, B, T)  # forward, dQ, dK/dV


def test_the_tpu_benchmark_programs_compile_for_v5e():
    """experiments/benchmarks/attention.py --backend tpu times these two programs; both compile."""
    pytest.importorskip("libtpu")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"))
    import attention as benchmark
    from glm_jax.parallel.tpu_topology import topology_devices

    device = SingleDeviceSharding(topology_devices("v5e:2x2")[0])
    args = [jax.ShapeDtypeStruct(a.shape, jnp.bfloat16, sharding=device) for a in benchmark.avals(512)]
    # Splash leaves its dots' precision to the global default, and conftest's 'highest' makes
    # Mosaic reject bf16 dots; the benchmark runs with jax's default.
    with jax.default_matmul_precision("default"):
        for name, program in benchmark.tpu_programs(512).items():
            assert program.lower(*args).compile().as_text().count("tpu_custom_call") == 3, name

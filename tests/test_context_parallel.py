"""Context parallelism (glm_jax/kernels/context_parallel.py) on 8 simulated CPU devices: the token layout,
attention over a sequence split across devices against the unsplit XLA reference (forward and
dQ, dK, dV), the work each device does, and the errors for sizes that do not split."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from conftest import random_packing
from glm_jax.kernels.attention import xla_attention
from glm_jax.kernels.context_parallel import (check_sequence_split, context_order, context_parallel_attention,
                                              from_context_order, to_context_order, work_per_device)


def test_each_device_holds_chunks_from_both_ends_of_every_group():
    # T = 16 over 2 devices in chunks of 2: groups of 4 chunks; device 0 holds the 1st and 4th of
    # each group, device 1 the 2nd and 3rd.
    np.testing.assert_array_equal(context_order(16, 2, chunk=2), [[0, 1, 6, 7, 8, 9, 14, 15],
                                                                   [2, 3, 4, 5, 10, 11, 12, 13]])
    # One group when T / 2n is below the chunk: the plain zigzag.
    np.testing.assert_array_equal(context_order(16, 2, chunk=128), [[0, 1, 2, 3, 12, 13, 14, 15],
                                                                     [4, 5, 6, 7, 8, 9, 10, 11]])
    x = np.arange(3 * 48).reshape(3, 48)
    np.testing.assert_array_equal(from_context_order(to_context_order(x, 3, chunk=4), 3, chunk=4), x)
    np.testing.assert_array_equal(from_context_order(to_context_order(jnp.asarray(x), 3), 3), x)
    np.testing.assert_array_equal(context_order(8, 1), [np.arange(8)])  # one device: everything in order


def glm_rows(rng, B, T):
    """Row 0: one segment whose Part A (prefix) ends in another device's chunk; row 1: a causal row;
    the rest: random packings (several segments, each with a prefix) whose segments cross chunk edges."""
    segments, prefix, _ = random_packing(rng, B, T, max_segments=4)
    segments[0], prefix[0] = 1, np.arange(T) < int(0.6 * T)
    segments[1], prefix[1] = 1, False
    return jnp.asarray(segments), jnp.asarray(prefix)


def attention_and_grads(fn, q, k, v, segments, prefix, cotangent):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segments, prefix), q, k, v)
    return (out, *vjp(cotangent))


@functools.lru_cache(maxsize=None)
def _split_attention(mesh_shape: tuple, impl: str, chunk: int):
    """The jitted context-parallel forward + backward on a mesh of ((axis, size), ...), in sequence order."""
    axes, sizes = zip(*mesh_shape)
    mesh = Mesh(np.asarray(jax.devices()[:int(np.prod(sizes))]).reshape(sizes), axes)  # as parallel/mesh.py
    shards = dict(mesh_shape)["sequence"]

    def split(q, k, v, segments, prefix, cotangent):
        order = functools.partial(to_context_order, shards=shards, chunk=chunk)

        def attend(q, k, v):
            return context_parallel_attention(order(q), order(k), order(v), order(segments), order(prefix), mesh=mesh,
                                              impl=impl, chunk=chunk)

        out, vjp = jax.vjp(attend, q, k, v)
        return (from_context_order(out, shards, chunk=chunk), *vjp(order(cotangent)))

    return jax.jit(split)


@pytest.mark.parametrize("mesh_shape,Hq,Hkv,impl,chunk", [
    ((("data", 2), ("sequence", 4)), 4, 4, "xla", 8),  # the 4-way sequence x 2 data, MHA, one zigzag
    ((("data", 2), ("sequence", 4)), 4, 2, "xla", 4),  # GQA, the zigzag twice along the sequence
    ((("data", 2), ("sequence", 2), ("tensor", 2)), 4, 1, "xla", 4),  # MQA, heads over tensor
    ((("data", 2), ("sequence", 4)), 4, 2, "blockwise", 4),  # the CPU flash path, positions per device
    pytest.param((("data", 2), ("sequence", 4)), 4, 2, "pallas_interpret", 4, marks=pytest.mark.slow),
])
def test_split_sequence_attention_equals_the_whole_sequence(mesh_shape, Hq, Hkv, impl, chunk):
    rng = np.random.default_rng(0)
    B, T, D = 4, 64, 8
    segments, prefix = glm_rows(rng, B, T)
    q, cotangent = (jnp.asarray(rng.normal(size=(B, T, Hq, D)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(B, T, Hkv, D)), jnp.float32) for _ in range(2))
    got = _split_attention(mesh_shape, impl, chunk)(q, k, v, segments, prefix, cotangent)
    reference = functools.partial(xla_attention, scale=D ** -0.5)
    want = attention_and_grads(reference, q, k, v, segments, prefix, cotangent)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_the_layout_balances_the_work_of_causal_and_glm_rows():
    """Visited key blocks per device (the flash loops' work) within 10% of equal for causal rows, a row
    whose Part A is most of the sequence, and packed rows; the contiguous split gives the last device
    several times the first's causal work, and one zigzag over the whole sequence leaves the long
    prefix unbalanced."""
    rng = np.random.default_rng(3)
    T, shards = 4096, 4
    causal = (jnp.ones((2, T), jnp.int32), jnp.zeros((2, T), bool))
    long_prefix = (jnp.ones((2, T), jnp.int32), jnp.arange(T)[None].repeat(2, 0) < jnp.asarray([[1500], [3000]]))
    packed = tuple(jnp.asarray(x) for x in random_packing(rng, 8, T, max_segments=6, pad=False)[:2])
    for segments, prefix in (causal, long_prefix, packed):
        work = work_per_device(segments, prefix, shards)
        assert work.max() <= 1.10 * work.min(), work
    contiguous = work_per_device(*causal, shards, chunk=None)
    assert contiguous.max() >= 5 * contiguous.min(), contiguous
    one_zigzag = work_per_device(*long_prefix, shards, chunk=T // (2 * shards))
    assert one_zigzag.max() >= 1.2 * one_zigzag.min(), one_zigzag


def test_sizes_that_do_not_split_name_the_knob():
    with pytest.raises(ValueError, match=r"seq_len = 100 .* MeshConfig.sequence = 4.*multiple of 8"):
        check_sequence_split(100, 4)
    with pytest.raises(ValueError, match=r"chunks of 8 tokens, not a multiple of the attention block 64"):
        check_sequence_split(64, 4, block=64)
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("sequence", "tensor"))
    ids = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"MeshConfig.tensor = 2, which must divide .* 3 KV heads"):
        context_parallel_attention(jnp.zeros((1, 8, 6, 8)), jnp.zeros((1, 8, 3, 8)), jnp.zeros((1, 8, 3, 8)), ids,
                                   ids.astype(bool), mesh=mesh)


def packed_batch(rng, B, T, vocab):
    """A GLM batch of packed rows (several segments, each with a Part A prefix) with random tokens."""
    segments, prefix, positions = random_packing(rng, B, T, max_segments=4)
    return {"tokens": rng.integers(0, vocab, (B, T)).astype(np.int32),
            "targets": rng.integers(0, vocab, (B, T)).astype(np.int32),
            "loss_mask": ((segments > 0) & ~prefix & (rng.random((B, T)) < 0.7)).astype(np.float32),
            "positions": positions, "segment_ids": segments, "prefix_mask": prefix}


@pytest.mark.parametrize("kv_heads", [4, 2])  # MHA, GQA
def test_loss_and_gradients_on_a_split_sequence_equal_one_device(kv_heads):
    """The train step's objective (loss sums and parameter gradients) of a model whose every
    activation is split 4 ways along the sequence and 2 ways along the rows, vs one device."""
    from glm_jax.evaluation import loss_sums
    from glm_jax.model import GLM, ModelConfig, init_params
    from glm_jax.parallel.batch import batch_shardings, global_batch
    from glm_jax.parallel.mesh import MeshConfig, make_mesh
    from glm_jax.parallel.rules import logical_axis_rules
    import flax.linen as nn

    config = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
                         mlp_dim=64, max_position=128, attention_impl="xla")
    model = GLM(config)
    params = nn.unbox(init_params(config, jax.random.key(0)))
    batch = packed_batch(np.random.default_rng(1), 4, 64, 256)

    def objective(params, batch):
        with nn.logical_axis_rules(logical_axis_rules("fsdp")):
            return loss_sums(model, params, batch, z_loss=1e-4, chunk_length=16)

    gradient = jax.jit(jax.grad(objective, has_aux=True))
    want_grads, want_sums = gradient(params, batch)
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, sequence=4, tensor=1))
    with jax.set_mesh(mesh):
        split = global_batch(batch, batch_shardings(mesh))  # tokens in context order, T over 'sequence'
        assert split["tokens"].sharding.spec[-1] == "sequence"
        hlo = gradient.lower(params, split).as_text()
        assert "all_gather" in hlo and "manual_computation" in hlo  # the context-parallel attention ran
        grads, sums = gradient(params, split)
    for key in want_sums:
        np.testing.assert_allclose(sums[key], want_sums[key], rtol=1e-5, err_msg=key)
    jax.tree_util.tree_map_with_path(
        lambda path, g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path)),
        grads, want_grads)


def test_training_settings_that_cannot_split_a_sequence_name_the_knob():
    from glm_jax.parallel.batch import check_sequence_fits_mesh
    from glm_jax.parallel.mesh import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=1, sequence=3, tensor=1, num_devices=6))
    with pytest.raises(ValueError, match=r"DataConfig.seq_len = 64 does not split into 2 x 3 .* multiple of 6"):
        check_sequence_fits_mesh(64, mesh)
    for kind, name in (("prefix", "P-tuning v2"), ("prompt", "prompt tuning")):
        with pytest.raises(ValueError, match=rf"{name} \(train.adapter = '{kind}'\) .* MeshConfig.sequence = 1"):
            check_sequence_fits_mesh(60, mesh, kind)
    check_sequence_fits_mesh(60, mesh)  # 6 chunks of 10 tokens
    with pytest.raises(ValueError, match=r"mesh sizes .* do not divide the 8 devices"):
        make_mesh(MeshConfig(data=1, fsdp=1, sequence=3, tensor=1))

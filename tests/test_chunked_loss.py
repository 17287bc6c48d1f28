"""The chunked head + loss against the whole-logits loss, numpy, and the memory it must save."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.evaluation import loss_sums
from glm_jax.model import GLM, ModelConfig, init_params
from glm_jax.model import vocab_sharding
from glm_jax.model.chunked_loss import chunked_cross_entropy
from glm_jax.model.glm import example_inputs
from glm_jax.model.loss import cross_entropy_sums

Z_LOSS = 1e-2


def _problem(seed=0, B=2, T=37, E=16, V=101):
    k = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k[0], (B, T, E))
    kernel = jax.random.normal(k[1], (E, V))
    targets = jax.random.randint(k[2], (B, T), 0, V)
    mask = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)
    return hidden, kernel, targets, mask


def _whole_logits(hidden, kernel, targets, mask):
    sums = cross_entropy_sums(hidden @ kernel, targets, mask, Z_LOSS)
    return sums["loss_sum"] + sums["z_sum"], sums


def _relative(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("chunk_length", [1, 5, 16, 37, 64])  # 37 = T; 5 and 16 leave a padded last chunk
def test_loss_and_gradients_equal_whole_logits(chunk_length):
    hidden, kernel, targets, mask = _problem()
    (d_ref, sums_ref) = jax.grad(_whole_logits, argnums=(0, 1), has_aux=True)(hidden, kernel, targets, mask)
    chunked = lambda h, w: chunked_cross_entropy(h, w, targets, mask, Z_LOSS, chunk_length)  # noqa: E731
    (d_chunked, sums) = jax.jit(jax.grad(chunked, argnums=(0, 1), has_aux=True))(hidden, kernel)
    for key in ("loss_sum", "z_sum"):
        np.testing.assert_allclose(sums[key], sums_ref[key], rtol=1e-6)
    for key in ("correct", "count"):
        assert float(sums[key]) == float(sums_ref[key])
    assert _relative(d_chunked[0], d_ref[0]) < 1e-6
    assert _relative(d_chunked[1], d_ref[1]) < 1e-6


def test_sums_match_float64_numpy():
    hidden, kernel, targets, mask = _problem(seed=1)
    logits = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target_logit = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    m = np.asarray(mask, np.float64)
    objective, sums = chunked_cross_entropy(hidden, kernel, targets, mask, Z_LOSS, chunk_length=8)
    np.testing.assert_allclose(sums["loss_sum"], ((lse - target_logit) * m).sum(), rtol=1e-6)
    np.testing.assert_allclose(sums["z_sum"], Z_LOSS * (lse ** 2 * m).sum(), rtol=1e-6)
    np.testing.assert_allclose(objective, ((lse - target_logit + Z_LOSS * lse ** 2) * m).sum(), rtol=1e-6)
    assert float(sums["correct"]) == ((logits.argmax(-1) == np.asarray(targets)) * m).sum()


def test_correct_counts_ties_as_argmax_does():
    """Two equal vocabulary columns tie for the maximum wherever they lead: a hit is the first, as argmax says."""
    hidden, kernel, targets, mask = _problem(seed=4)
    kernel = kernel.at[:, 3].multiply(20.0)
    kernel = kernel.at[:, 7].set(kernel[:, 3])  # columns 3 and 7 tie, and lead wherever they are positive
    tied = jnp.argmax(hidden @ kernel, axis=-1) == 3
    targets = jnp.where(tied, 7, targets).at[0].set(3)  # the tie's second index; row 0: its first
    _, sums = chunked_cross_entropy(hidden, kernel, targets, mask, Z_LOSS, chunk_length=8)
    reference = _whole_logits(hidden, kernel, targets, mask)[1]["correct"]
    assert float(jnp.sum(tied * mask)) > 10 and float(reference) > 0  # both kinds of tie occur
    assert float(sums["correct"]) == float(reference)


def test_upstream_cotangent_scales_the_gradient():
    """The forward pass computes the gradient for cotangent 1; a mean (1 / count) must scale it."""
    hidden, kernel, targets, mask = _problem(seed=2)
    mean = lambda h, whole: ((_whole_logits(h, kernel, targets, mask)[0] if whole else  # noqa: E731
                              chunked_cross_entropy(h, kernel, targets, mask, Z_LOSS, 7)[0]) / 13.0)
    assert _relative(jax.grad(mean)(hidden, False), jax.grad(mean)(hidden, True)) < 1e-6


def test_bad_chunk_length_is_a_clear_error():
    hidden, kernel, targets, mask = _problem()
    with pytest.raises(ValueError, match="chunk_length is 0; it must be a whole number >= 1"):
        chunked_cross_entropy(hidden, kernel, targets, mask, chunk_length=0)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_model_loss_and_parameter_gradients_equal_whole_logits(tie_embeddings):
    config = ModelConfig(vocab_size=97, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64,
                         tie_embeddings=tie_embeddings, dtype="float32")
    params = nn.meta.unbox(init_params(config, jax.random.key(0)))
    tokens, positions, segment_ids, prefix_mask = example_inputs(2, 24)
    rng = np.random.default_rng(0)
    batch = dict(tokens=jnp.asarray(rng.integers(0, 97, (2, 24)), jnp.int32), positions=positions,
                 segment_ids=segment_ids, prefix_mask=prefix_mask,
                 targets=jnp.asarray(rng.integers(0, 97, (2, 24)), jnp.int32),
                 loss_mask=jnp.asarray(rng.random((2, 24)) < 0.6, jnp.float32))
    model = GLM(config)
    grads = {chunk: jax.jit(jax.grad(lambda p: loss_sums(model, p, batch, Z_LOSS, chunk), has_aux=True))(params)
             for chunk in (None, 5)}
    (g_ref, s_ref), (g_chunk, s_chunk) = grads[None], grads[5]
    np.testing.assert_allclose(s_chunk["loss_sum"], s_ref["loss_sum"], rtol=1e-6)
    # Through the whole model (float32 sums in another order). Relative to the largest gradient:
    # some are zero up to rounding (a key bias shifts every score of a query equally).
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g_ref))
    for chunked, whole in zip(jax.tree_util.tree_leaves(g_chunk), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6 * scale)


def _temporary_bytes(fn, *shapes):
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_glm4_vocabulary_head_and_loss_use_an_eighth_of_the_memory():
    """GLM-4's 151,552-token head at T = 4096: compiled temporaries of loss + gradients, whole vs chunked."""
    B, T, E, V = 1, 4096, 256, 151_552
    shapes = [((B, T, E), jnp.float32), ((E, V), jnp.float32), ((B, T), jnp.int32), ((B, T), jnp.float32)]

    def whole(h, w, t, m):
        return jax.grad(lambda h, w: _whole_logits(h, w, t, m)[0], argnums=(0, 1))(h, w)

    def chunked(h, w, t, m):
        return jax.grad(lambda h, w: chunked_cross_entropy(h, w, t, m, Z_LOSS, 256)[0], argnums=(0, 1))(h, w)

    whole_bytes, chunked_bytes = _temporary_bytes(whole, *shapes), _temporary_bytes(chunked, *shapes)
    assert whole_bytes >= B * T * V * 4  # at least the float32 logits
    assert chunked_bytes * 8 <= whole_bytes, (chunked_bytes, whole_bytes)


# The vocabulary-parallel head (vocab_sharding.rows_shared_pay): the same numbers on a mesh, no [E, V] buffer.
# 8 rows x 24 positions = 192 tokens: at V = 200 sharing the rows pays, at V = 64 (192 > 2.5 x 64) gathering
# the kernel does, unless the rows are split over 'data' too.
VP_SHAPE = dict(B=8, T=24, E=16)


def _sharded_grads(mesh_config, strategy, hidden, kernel, targets, mask):
    """((sums, d hidden, d kernel), whether rows were shared, compiled HLO) of the chunked loss on a mesh,
    inputs placed as the train step places them."""
    from glm_jax.parallel.mesh import make_mesh
    from glm_jax.parallel.rules import logical_axis_rules

    mesh, rules = make_mesh(mesh_config), logical_axis_rules(strategy)
    spec = lambda *axes: jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(axes, rules))  # noqa: E731
    activations = spec("activation_batch", "activation_length", "activation_embed")
    rows = spec("activation_batch", "activation_length")
    placed = [jax.device_put(x, s) for x, s in ((hidden, activations), (kernel, spec("embed", "vocab")),
                                                 (targets, rows), (mask, rows))]
    shared = []

    def grads(h, w, t, m):
        with nn.logical_axis_rules(rules):
            shared.append(vocab_sharding.rows_shared_pay(*h.shape[:2], w.shape[1], "split_vocab"))
            loss = lambda h, w: chunked_cross_entropy(h, w, t, m, Z_LOSS, 5)  # noqa: E731
            (d_h, d_w), sums = jax.grad(loss, argnums=(0, 1), has_aux=True)(h, w)
        return sums, d_h, d_w

    with jax.set_mesh(mesh):
        step = jax.jit(grads)
        return step(*placed), shared[0], step.lower(*placed).compile().as_text()


@pytest.mark.parametrize("vocab", [200, 64])
@pytest.mark.parametrize("mesh_config, strategy", [
    (dict(fsdp=8), "fsdp"), (dict(data=2, fsdp=4), "fsdp"), (dict(fsdp=2, tensor=4), "fsdp_tp"),
    (dict(data=2, fsdp=2, tensor=2), "fsdp_tp"), (dict(data=8, fsdp=1), "fsdp")])
def test_head_sharded_either_way_equals_one_device(mesh_config, strategy, vocab):
    from glm_jax.parallel.mesh import MeshConfig

    hidden, kernel, targets, mask = _problem(seed=3, V=vocab, **VP_SHAPE)
    (d_ref, sums_ref) = jax.grad(_whole_logits, argnums=(0, 1), has_aux=True)(hidden, kernel, targets, mask)
    (sums, d_h, d_w), shared, hlo = _sharded_grads(MeshConfig(**mesh_config), strategy, hidden, kernel, targets, mask)
    tokens_per_group = 8 * 24 // mesh_config.get("data", 1)
    assert shared == (mesh_config.get("data", 1) < 8 and tokens_per_group <= 2.5 * vocab)
    np.testing.assert_allclose(sums["loss_sum"], sums_ref["loss_sum"], rtol=1e-6)
    np.testing.assert_allclose(sums["z_sum"], sums_ref["z_sum"], rtol=1e-6)
    assert float(sums["correct"]) == float(sums_ref["correct"]) and float(sums["count"]) == float(sums_ref["count"])
    # d hidden adds the vocabulary slices' partial sums across devices: float32 sums in another order.
    assert _relative(d_h, d_ref[0]) < 4e-6 and _relative(d_w, d_ref[1]) < 1e-6
    whole_kernel = f"[{VP_SHAPE['E']},{vocab}]"
    if shared:  # no device ever holds the whole kernel or its gradient
        assert whole_kernel not in hlo
    elif mesh_config.get("tensor", 1) == 1:  # gathered whole (under tensor parallelism its vocabulary stays split)
        assert whole_kernel in hlo


def test_model_with_shared_rows_equals_one_device_and_holds_no_vocabulary_sized_buffer():
    """The embedding (looked up in each device's columns) and the head (vocabulary-parallel) of a model
    trained with FSDP over 8 devices: loss sums and every parameter gradient equal one device's, and the
    compiled step never holds a whole [vocab, embed] table, kernel or gradient."""
    from glm_jax.parallel.mesh import MeshConfig, make_mesh
    from glm_jax.parallel.rules import logical_axis_rules

    V, E = 512, 32  # 8 rows x 32 tokens = 256 <= 2.5 x 512: rows are shared
    config = ModelConfig(vocab_size=V, hidden_size=E, num_layers=1, num_heads=4, mlp_dim=64, dtype="float32")
    model, rules = GLM(config), logical_axis_rules("fsdp")
    boxed = init_params(config, jax.random.key(0))
    params = nn.meta.unbox(boxed)
    tokens, positions, segment_ids, prefix_mask = example_inputs(8, 32)
    rng = np.random.default_rng(5)
    batch = dict(tokens=jnp.asarray(rng.integers(0, V, (8, 32)), jnp.int32), positions=positions,
                 segment_ids=segment_ids, prefix_mask=prefix_mask,
                 targets=jnp.asarray(rng.integers(0, V, (8, 32)), jnp.int32),
                 loss_mask=jnp.asarray(rng.random((8, 32)) < 0.6, jnp.float32))

    def gradient(p, b):
        with nn.logical_axis_rules(rules):
            return jax.grad(lambda p: loss_sums(model, p, b, Z_LOSS, 8), has_aux=True)(p)

    want_grads, want_sums = jax.jit(gradient)(params, batch)
    mesh = make_mesh(MeshConfig(fsdp=8))
    with jax.set_mesh(mesh):
        sharded = jax.device_put(params, nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules))
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
        placed = {k: jax.device_put(v, rows) for k, v in batch.items()}
        step = jax.jit(gradient)
        grads, sums = step(sharded, placed)
        hlo = step.lower(sharded, placed).compile().as_text()
    for key in want_sums:
        np.testing.assert_allclose(sums[key], want_sums[key], rtol=1e-5, err_msg=key)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(want_grads))
    jax.tree_util.tree_map_with_path(
        lambda path, g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * scale,
                                                      err_msg=jax.tree_util.keystr(path)), grads, want_grads)
    assert f"[{V},{E}]" not in hlo and f"[{E},{V}]" not in hlo


def _computations(hlo: str) -> dict[str, str]:
    """The compiled module's computations: name -> body text."""
    return dict(re.findall(r"^(?:ENTRY )?%(\S+) .*?\{\n(.*?)^\}", hlo, re.M | re.S))


def _computations_run_per_iteration(bodies: dict[str, str], hlo: str) -> set[str]:
    """Names of the computations that run inside a while loop (bodies and what they call)."""
    calls = {name: set(re.findall(r"(?:calls|to_apply|body|condition|branch_computations|called_computations)="
                                  r"\{?%([\w.\-]+)", text)) for name, text in bodies.items()}
    inside = set(re.findall(r"body=%([\w.\-]+)", hlo))
    frontier = set(inside)
    while frontier:
        frontier = set().union(*(calls.get(name, set()) for name in frontier)) - inside
        inside |= frontier
    return {name for name in inside if name in bodies}


def test_a_gathered_head_is_gathered_and_reduced_once_per_step_on_tpu():
    """The TPU compiler's SPMD output for a head that is gathered (tokens > 2.5 x vocab): no collective on a
    whole [E, V] kernel inside the chunk loop. Before, the kernel was all-gathered and its whole float32
    gradient reduced in every chunk (glm4_9b at 8k: 32 times per step, ~110 GiB of operands per chip)."""
    pytest.importorskip("libtpu", reason="the TPU compiler needs the tpu extra (pip install 'glm_jax[tpu]')")
    from jax.sharding import Mesh, NamedSharding

    from glm_jax.parallel import tpu_topology
    from glm_jax.parallel.mesh import MESH_AXES
    from glm_jax.parallel.rules import logical_axis_rules

    mesh = Mesh(np.asarray(tpu_topology.topology_devices("v5e:2x2")).reshape(1, 1, 4, 1, 1), MESH_AXES)
    rules = logical_axis_rules("fsdp")
    B, T, E, V = 4, 512, 256, 512  # 2048 tokens > 2.5 x 512
    place = lambda shape, dtype, *axes: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=NamedSharding(mesh, nn.logical_to_mesh_axes(axes, rules)))
    args = (place((B, T, E), jnp.bfloat16, "activation_batch", "activation_length", "activation_embed"),
            place((E, V), jnp.float32, "embed", "vocab"),
            place((B, T), jnp.int32, "activation_batch", "activation_length"),
            place((B, T), jnp.float32, "activation_batch", "activation_length"))

    def grads(h, w, t, m):
        with nn.logical_axis_rules(rules):
            assert not vocab_sharding.rows_shared_pay(B, T, V, "split_vocab")
            return jax.grad(lambda h, w: chunked_cross_entropy(h, w, t, m, 0.0, 64)[0], argnums=(0, 1))(h, w)

    with jax.set_mesh(mesh):
        hlo = jax.jit(grads).lower(*args).compile().as_text()
    bodies = _computations(hlo)
    per_iteration = _computations_run_per_iteration(bodies, hlo)
    assert per_iteration, "the chunk loop is a while loop"
    whole_kernel = [(name, shape) for name, text in bodies.items()
                    for shape in re.findall(r"= \w+(\[\d+,\d+\])\S* (?:all-gather|all-reduce|reduce-scatter)\(", text)
                    if shape == f"[{E},{V}]"]
    assert whole_kernel, "the kernel is gathered and its gradient reduced (once)"
    assert not [name for name, _ in whole_kernel if name in per_iteration], whole_kernel

"""Pipeline parallelism (glm_jax/model/pipeline_parallel.py) on 8 simulated CPU devices: the staged layer
stack against the unstaged model (loss and every gradient, packed GLM rows with several segments and
prefixes, MHA and GQA), where the parameters lie, the bubble, and the errors for sizes that do not split."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from conftest import random_packing
from glm_jax.evaluation import loss_sums
from glm_jax.model import GLM, ModelConfig, init_params
from glm_jax.model.pipeline_parallel import bubble_fraction, check_stages, check_stages_fit_mesh, run_stages
from glm_jax.parallel.rules import MESH_AXES, logical_axis_rules

CONFIG = dict(vocab_size=96, hidden_size=32, num_layers=4, num_heads=4, mlp_dim=64, max_position=64,
              position="rope", norm="rmsnorm", mlp_activation="swiglu", scan_layers=True)


def mesh_of(**sizes):
    """A mesh over the first devices with MESH_AXES' order (as parallel/mesh.py builds it)."""
    shape = tuple(sizes.get(axis, 1) for axis in MESH_AXES)
    return Mesh(np.asarray(jax.devices()[:int(np.prod(shape))]).reshape(shape), MESH_AXES)


def glm_batch(config: ModelConfig, rows: int, length: int = 16, seed: int = 0) -> dict:
    """Packed rows (up to 3 segments, each with its own Part A), loss on the Part B tokens."""
    rng = np.random.default_rng(seed)
    segments, prefix, positions = random_packing(rng, rows, length, max_segments=3)
    return {"tokens": rng.integers(0, config.vocab_size, (rows, length)).astype(np.int32),
            "targets": rng.integers(0, config.vocab_size, (rows, length)).astype(np.int32),
            "loss_mask": ((segments > 0) & ~prefix).astype(np.float32), "positions": positions,
            "segment_ids": segments, "prefix_mask": prefix}


@functools.lru_cache(maxsize=None)
def loss_and_grads(config: ModelConfig, mesh_sizes: tuple = (), strategy: str = "fsdp_tp"):
    """The jitted (loss, grads) of a batch, on a mesh of ((axis, size), ...) or on one device."""
    model, rules = GLM(config), logical_axis_rules(strategy)

    def objective(params, batch):
        with nn.logical_axis_rules(rules):
            return loss_sums(model, params, batch, z_loss=1e-4)[0]

    step = jax.jit(jax.value_and_grad(objective))
    if not mesh_sizes:
        return step
    mesh = mesh_of(**dict(mesh_sizes))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(
        jax.eval_shape(lambda: init_params(config, jax.random.key(0)))), mesh, rules)

    def on_mesh(params, batch):
        with jax.set_mesh(mesh):
            return step(jax.device_put(params, shardings), batch)

    return on_mesh


@pytest.mark.parametrize("kv_heads, microbatches, mesh_sizes", [
    (4, 0, (("stage", 2), ("fsdp", 2), ("tensor", 2))),  # MHA, one micro-batch per stage, bottleneck adapters
    # GQA, one layer per stage, more micro-batches than stages, P-tuning v2's learned prefixes
    (2, 4, (("stage", 4), ("data", 2))),
])
def test_staged_stack_equals_one_device_loss_and_grads(kv_heads, microbatches, mesh_sizes):
    four_stages = dict(mesh_sizes)["stage"] == 4
    config = ModelConfig(**CONFIG, num_kv_heads=kv_heads, pipeline_microbatches=microbatches,
                         pre_seq_len=3 if four_stages else 0, adapter_dim=0 if four_stages else 4)
    params = nn.meta.unbox(init_params(config, jax.random.key(1)))
    if config.adapter_dim:  # up-projections away from their zero init, so the adapters change the function
        up = params["layers"]["mlp_adapter"]["adapter_up"]
        params["layers"]["mlp_adapter"]["adapter_up"] = 0.1 * jax.random.normal(jax.random.key(2), up.shape)
    batch = glm_batch(config, rows=8)
    assert len(np.unique(batch["segment_ids"][batch["segment_ids"] > 0])) >= 2 and batch["prefix_mask"].any()
    loss, grads = loss_and_grads(config)(params, batch)
    staged_loss, staged_grads = loss_and_grads(config, mesh_sizes)(params, batch)
    np.testing.assert_allclose(staged_loss, loss, rtol=1e-5)
    # Sums over micro-batches and shards change the float32 summation order: 1e-5 of each gradient's scale.
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()),
                           staged_grads, grads)
    # The layer stack really is split: each stage holds its own layers (and their gradients).
    kernel = staged_grads["layers"]["mlp"]["wi"]["kernel"]
    assert kernel.sharding.spec[0] == "stage"
    stages = dict(mesh_sizes)["stage"]
    assert {s.data.shape[0] for s in kernel.addressable_shards} == {config.num_layers // stages}


def test_run_stages_equals_the_layers_in_order():
    """The schedule alone, with a layer whose order matters: x -> w_l * x + l, S = 2 stages x 3 micro-batches."""
    weights = jnp.arange(1.0, 7.0)  # 6 layers
    offsets = jnp.arange(6.0)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3, 2)), jnp.float32)
    row_scale = jnp.arange(6.0) + 1  # a per-row input every layer reads

    def layer(params, h, per_row):
        w, b = params
        return w * h + b * per_row[0][:, None, None]

    expected = x
    for w, b in zip(weights, offsets):
        expected = layer((w, b), expected, (row_scale,))
    mesh = mesh_of(stage=2, data=2)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda x, r: run_stages(layer, (weights, offsets), x, (r,), stages=2, microbatches=3))(
            x, row_scale)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_bubble_fraction():
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(8, 32) == pytest.approx(7 / 39)
    assert bubble_fraction(1, 5) == 0


def test_sizes_that_do_not_split_name_the_knob():
    with pytest.raises(ValueError, match=r"num_layers = 70 .* MeshConfig.stage = 8 .*\[2, 5, 7, 10, 14, 35, 70\]"):
        check_stages(70, 8, 8)
    with pytest.raises(ValueError, match="pipeline_microbatches = 3"):
        check_stages(4, 2, 3, rows=8)
    with pytest.raises(ValueError, match="pipeline_microbatches"):
        ModelConfig(**CONFIG, pipeline_microbatches=-1)


def test_meshes_and_batches_that_stages_cannot_run_name_the_knob():
    config = ModelConfig(**CONFIG)
    check_stages_fit_mesh(config, 8, 1, mesh_of(stage=2, fsdp=2, tensor=2))  # 4 rows per micro-batch: fine
    with pytest.raises(ValueError, match=r"num_layers = 4 .* MeshConfig.stage = 8"):
        check_stages_fit_mesh(config, 8, 1, mesh_of(stage=8))
    with pytest.raises(ValueError, match=r"micro-batch has 1 rows .* 2 devices of the data x fsdp"):
        check_stages_fit_mesh(config.replace(pipeline_microbatches=4), 8, 2, mesh_of(stage=2, fsdp=2))
    with pytest.raises(ValueError, match="MeshConfig.sequence = 2"):
        check_stages_fit_mesh(config, 8, 1, mesh_of(stage=2, sequence=2))
    with pytest.raises(ValueError, match="train.adapter = 'lora'"):
        check_stages_fit_mesh(config, 8, 1, mesh_of(stage=2), adapter_kind="lora")
    with pytest.raises(ValueError, match="prompt tuning .train.adapter = 'prompt'. does not run with pipeline stages"):
        check_stages_fit_mesh(config, 8, 1, mesh_of(stage=2), adapter_kind="prompt")
    check_stages_fit_mesh(config, 8, 1, mesh_of(stage=2), adapter_kind="bottleneck")  # adapters are Block parameters
    from glm_jax.parallel.mesh import MeshConfig, make_mesh

    with pytest.raises(ValueError, match=r"mesh sizes .*'stage': 3.* do not divide the 8 devices"):
        make_mesh(MeshConfig(data=1, fsdp=1, stage=3))
    with pytest.raises(ValueError, match=r"uses 4 devices but 8 are present; set one MeshConfig axis to -1"):
        make_mesh(MeshConfig(data=1, fsdp=2, stage=2))
    assert dict(make_mesh(MeshConfig(data=1, fsdp=-1, stage=4)).shape)["fsdp"] == 2


def test_lora_adapters_are_refused_rather_than_dropped_by_the_stages():
    pytest.importorskip("qwix")
    from glm_jax.model.glm import example_inputs
    from glm_jax.model.lora import LoraConfig, lora_model

    model = lora_model(ModelConfig(**CONFIG), LoraConfig(rank=2))
    params = nn.meta.unbox(model.init(jax.random.key(0), *example_inputs(batch=2))["params"])
    with jax.set_mesh(mesh_of(stage=2)), pytest.raises(ValueError, match="LoRA adapters do not run with pipeline"):
        jax.jit(model.apply)({"params": params}, *example_inputs(batch=2))


def test_pipeline_needs_the_scanned_stack():
    config = ModelConfig(**{**CONFIG, "scan_layers": False})
    params = nn.meta.unbox(init_params(config, jax.random.key(0)))
    with pytest.raises(ValueError, match="scan_layers = True"):
        loss_and_grads(config, (("stage", 2),), "fsdp")(params, glm_batch(config, rows=2))


def test_parameters_keep_one_layout_at_every_stage_count():
    config = ModelConfig(**CONFIG)
    boxed = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    specs = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh_of(stage=4, fsdp=2),
                                        logical_axis_rules("fsdp"))
    assert specs["layers"]["attention"]["query"]["kernel"].spec == PartitionSpec("stage", ("fsdp", "sequence"), None, None)
    assert specs["embedding"].spec == PartitionSpec(None, ("fsdp", "sequence"))  # not staged: every stage has it

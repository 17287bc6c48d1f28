"""Pipeline parallelism: the layer stack split into stages over the mesh's 'stage' axis (GPipe).

Parameters. The scanned stack's leading [L] axis (logical name 'layers') is split over
'stage' (glm_jax/parallel/rules.py), so stage s holds layers [s L/S, (s + 1) L/S). The
parameter tree is the same [L, ...] at every stage count: a checkpoint written with 4 stages
restores onto 2, or onto none (Orbax reshards on restore).

Schedule (GPipe, Huang et al. 2019, arXiv 1811.06965). The rows of the batch are cut into M
micro-batches, strided like gradient accumulation's (micro-batch m = rows m, m + M, ...), so
each data-parallel device keeps its own rows. All stages run as one program, vmapped over a
state of S micro-batch activations whose leading axis is split over 'stage' (jax.vmap's
spmd_axis_name puts that axis on 'stage' inside every sharding constraint of the block): at
iteration i stage s applies its L/S layers to micro-batch i - s, then the state rolls by one
along its stage axis, so each stage's output becomes the next stage's input (XLA lowers the
roll of a stage-split axis to a collective permute). M + S - 1 iterations run; during the
first and last S - 1, some stages work on filler whose results are dropped: the bubble,
(S - 1) / (M + S - 1) of the stack's time. The backward is JAX's transpose of the same loop:
the iterations in reverse, each permute reversed, all forwards before all backwards, as
GPipe. Each stage keeps what its layers save for the M micro-batches it has seen; the
config's remat_policy decides how much that is per layer.

This is MaxText's design (vmap over stages, a shifting state). Unlike MaxText the stored
layout stays [L, ...] instead of [stages, layers per stage, ...], so pipelining is a mesh
choice, not a different checkpoint. Only the stack is pipelined: the embedding, the final
norm, the head and the loss run on every stage for the whole batch (rows split over
'data' / 'fsdp' as always), which repeats their work S times. Pipelining is for models
like GLM-130B, whose stack is 98.6% of the multiply-adds per token (70 layers of
12288 x (4 x 12288 + 3 x 32768) against a 12288 x 150528 head); GLM-4-9B's is 93%.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from glm_jax.kernels.context_parallel import BATCH_AXES, sequence_shards
from glm_jax.model.config import ModelConfig

STAGE_AXIS = "stage"
STATE_ACTIVATION = ("activation_stage", "activation_batch", "activation_length", "activation_embed")


def pipeline_stages(mesh) -> int:
    """Devices on the mesh's 'stage' axis (1 when the mesh has none)."""
    if mesh is None or mesh.empty or STAGE_AXIS not in mesh.axis_names:
        return 1
    return dict(mesh.shape)[STAGE_AXIS]


def bubble_fraction(stages: int, microbatches: int) -> float:
    """The share of the stack's iterations in which a stage idles: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


def check_stages(num_layers: int, stages: int, microbatches: int, rows: int | None = None) -> None:
    """A ValueError naming the knob when the layers or the rows do not split into the stages / micro-batches."""
    if num_layers % stages:
        divisors = [d for d in range(2, num_layers + 1) if num_layers % d == 0]
        raise ValueError(f"ModelConfig.num_layers = {num_layers} does not split into MeshConfig.stage = {stages} "
                         f"equal pipeline stages; choose a stage count dividing it ({divisors}) or stage = 1")
    if microbatches < 1:
        raise ValueError(f"ModelConfig.pipeline_microbatches = {microbatches}; use a positive count (0 means one "
                         "per stage)")
    if rows is not None and rows % microbatches:
        raise ValueError(f"a batch of {rows} rows does not split into ModelConfig.pipeline_microbatches = "
                         f"{microbatches} pipeline micro-batches; make the rows per step (DataConfig.batch_size / "
                         "OptimizerConfig.grad_accum_steps) a multiple of it")


def check_stages_fit_mesh(model: ModelConfig, batch_size: int, grad_accum_steps: int, mesh: Mesh,
                          adapter_kind: str | None = None) -> None:
    """Raises a ValueError naming the knobs when the mesh's pipeline stages cannot run this model and
    batch: layers per stage, rows per micro-batch, and the combinations pipelining does not run with."""
    stages = pipeline_stages(mesh)
    if stages == 1:
        return
    microbatches = model.pipeline_microbatches or stages
    check_stages(model.num_layers, stages, microbatches, batch_size // grad_accum_steps)
    if sequence_shards(mesh) > 1:
        raise ValueError(f"pipeline stages (MeshConfig.stage = {stages}) and context parallelism (MeshConfig.sequence "
                         f"= {sequence_shards(mesh)}) do not run together yet; set one of them to 1")
    if adapter_kind == "prompt":
        raise ValueError(f"prompt tuning (train.adapter = 'prompt') does not run with pipeline stages "
                         f"(MeshConfig.stage = {stages}): its soft prompt runs beside every stage's rows. Use "
                         "MeshConfig.stage = 1")
    if adapter_kind == "lora":
        raise ValueError(f"LoRA (train.adapter = 'lora') does not run with pipeline stages (MeshConfig.stage = "
                         f"{stages}): its adapters wrap the projections of the unstaged model. Fine-tune with "
                         "MeshConfig.stage = 1 (the frozen base can be split over 'fsdp' and 'tensor' instead)")
    row_devices = math.prod(dict(mesh.shape).get(axis, 1) for axis in BATCH_AXES)
    rows = batch_size // grad_accum_steps // microbatches
    if rows % row_devices:
        raise ValueError(f"a pipeline micro-batch has {rows} rows (DataConfig.batch_size {batch_size} / "
                         f"grad_accum_steps {grad_accum_steps} / ModelConfig.pipeline_microbatches {microbatches}), "
                         f"which do not spread over the {row_devices} devices of the data x fsdp axes; raise the "
                         "batch size or lower the micro-batch count")


def run_stages(layer: Callable, layer_params, x: jax.Array, per_row, stages: int, microbatches: int) -> jax.Array:
    """x [B, T, E] through every layer of the stack, as `stages` pipeline stages of `microbatches` micro-batches.

    Equal to scanning layer(params_l, x, per_row) over the leading [L] axis of layer_params in order.
    per_row: a tuple of [B, ...] arrays every layer reads (positions, segment ids, prefix flags).
    Call inside jit under a mesh with a 'stage' axis of `stages` devices.
    """
    num_layers = jax.tree_util.tree_leaves(layer_params)[0].shape[0]
    check_stages(num_layers, stages, microbatches, x.shape[0])
    stage_params = jax.tree_util.tree_map(lambda p: p.reshape(stages, num_layers // stages, *p.shape[1:]),
                                          layer_params)
    xs = _to_microbatches(x, microbatches)
    rows = jax.tree_util.tree_map(lambda a: _to_microbatches(a, microbatches), per_row)

    def stage(params, h, stage_rows):  # one stage: its L / S layers in order
        return jax.lax.scan(lambda h, p: (layer(p, h, stage_rows), None), h, params)[0]

    all_stages = jax.vmap(stage, spmd_axis_name=STAGE_AXIS)
    last = microbatches - 1

    def iteration(state, i):
        state = state.at[0].set(xs[jnp.minimum(i, last)])  # stage 0 takes micro-batch i (filler after the last)
        working_on = jnp.clip(i - jnp.arange(stages), 0, last)  # stage s: micro-batch i - s
        stage_rows = jax.tree_util.tree_map(lambda a: a[working_on], rows)
        out = nn.with_logical_constraint(all_stages(stage_params, state, stage_rows), STATE_ACTIVATION)
        return jnp.roll(out, 1, axis=0), out[-1]  # stage s's output is stage s + 1's next input

    state = nn.with_logical_constraint(jnp.zeros((stages, *xs.shape[1:]), x.dtype), STATE_ACTIVATION)
    _, finished = jax.lax.scan(iteration, state, jnp.arange(microbatches + stages - 1))
    return _from_microbatches(finished[stages - 1:])  # the last stage finishes micro-batch m at iteration m + S - 1


def _to_microbatches(a: jax.Array, count: int) -> jax.Array:
    """[B, ...] -> [count, B / count, ...]: micro-batch m is rows m, m + count, ... (strided, so a device's
    contiguous rows hold an equal share of every micro-batch)."""
    return a.reshape(a.shape[0] // count, count, *a.shape[1:]).swapaxes(0, 1)


def _from_microbatches(a: jax.Array) -> jax.Array:
    return a.swapaxes(0, 1).reshape(-1, *a.shape[2:])

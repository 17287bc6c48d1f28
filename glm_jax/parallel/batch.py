"""How a batch lies on the mesh: rows over ('data', 'fsdp'), the length axis over 'sequence'
(every pipeline stage holds the whole batch: glm_jax/model/pipeline_parallel.py).

Derived from the batch schema (glm_jax.data.batch), so the training loop's input
shardings, the preflight's abstract batch and gradient accumulation's micro-batches
agree on one definition. When the mesh splits sequences (MeshConfig.sequence > 1) the
tokens of every row are put in context order first (glm_jax/kernels/context_parallel.py), so
each device's slice of the length axis is its load-balanced share of the sequence.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glm_jax.data import batch as batch_schema
from glm_jax.kernels.context_parallel import SEQUENCE_AXIS, layout_chunk, sequence_shards, to_context_order

ROW_AXES = ("data", "fsdp")


def batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    """{field: NamedSharding}: the batch axis over ('data', 'fsdp'), the length axis over 'sequence'."""
    return {f.name: NamedSharding(mesh, PartitionSpec(ROW_AXES, *([None] * len(f.leading)), SEQUENCE_AXIS))
            for f in batch_schema.FIELDS}


# Adapters whose keys and values every query sees, which the sequence split does not distribute.
_UNSPLIT_ADAPTERS = {"prefix": "P-tuning v2", "prompt": "prompt tuning"}


def check_sequence_fits_mesh(seq_len: int, mesh: Mesh, adapter_kind: str | None = None) -> None:
    """Raises a ValueError naming the knobs when sequences cannot be split over the mesh's 'sequence' axis."""
    shards = sequence_shards(mesh)
    if shards == 1:
        return
    layout_chunk(seq_len, shards)
    if adapter_kind in _UNSPLIT_ADAPTERS:
        raise ValueError(f"{_UNSPLIT_ADAPTERS[adapter_kind]} (train.adapter = '{adapter_kind}') does not run with "
                         f"context parallelism (MeshConfig.sequence = {shards}); use MeshConfig.sequence = 1")


def check_batch_fits_mesh(batch_size: int, grad_accum_steps: int, mesh: Mesh) -> None:
    """Raises a ValueError naming the settings when the global batch cannot be laid out on the mesh.

    Rows are split over ('data', 'fsdp') and over the processes that load them, and into
    grad_accum_steps micro-batches (a micro-batch with fewer rows than devices is allowed:
    split_micro_batches leaves its layout to XLA).
    """
    row_devices = math.prod(mesh.shape[axis] for axis in ROW_AXES)
    layout = ", ".join(f"{axis}={mesh.shape[axis]}" for axis in mesh.axis_names)
    if batch_size % grad_accum_steps:
        raise ValueError(f"DataConfig.batch_size {batch_size} does not split into OptimizerConfig.grad_accum_steps "
                         f"{grad_accum_steps} micro-batches; make the batch size a multiple of it")
    if batch_size % row_devices:
        raise ValueError(f"DataConfig.batch_size = {batch_size} rows cannot be spread over the {row_devices} devices "
                         f"of the mesh's data x fsdp axes ({layout}); use a batch size that is a multiple of "
                         f"{row_devices}, or change MeshConfig (num_devices or the axis sizes)")
    loaders = row_shard(mesh)[1]  # processes that share a split sequence load the same rows
    if batch_size % loaders:
        raise ValueError(f"DataConfig.batch_size {batch_size} does not divide among the {loaders} processes that load "
                         "rows; use a multiple of it")


def abstract_batch(mesh: Mesh, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a global batch with its shardings (ahead-of-time compiles)."""
    shardings = batch_shardings(mesh)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[name])
            for name, (shape, dtype) in batch_schema.batch_shapes(batch_size, seq_len).items()}


def row_shard(mesh: Mesh) -> tuple[int, int]:
    """(index, count): which slice of every global batch's rows this process loads, of how many.

    Normally each process holds rows of its own: (process index, process count). When one
    sequence is split over devices of several processes ('sequence' spanning hosts), those
    processes hold the same rows (each its part of the tokens), so they load the same slice:
    processes are grouped by the row coordinates (data, fsdp) of their devices.
    """
    rows_of = {}
    row_axes = [mesh.axis_names.index(axis) for axis in ROW_AXES if axis in mesh.axis_names]
    for coords in np.ndindex(mesh.devices.shape):
        owner = mesh.devices[coords].process_index
        rows_of.setdefault(owner, set()).add(tuple(coords[i] for i in row_axes))
    groups = sorted({frozenset(rows) for rows in rows_of.values()}, key=min)
    if len(groups) == jax.process_count():
        return jax.process_index(), jax.process_count()
    return groups.index(frozenset(rows_of[jax.process_index()])), len(groups)


def global_batch(local: dict, shardings: dict[str, NamedSharding], row_shards: int | None = None
                 ) -> dict[str, jax.Array]:
    """This process's rows -> global jax.Arrays sharded over ('data', 'fsdp') (and their tokens in
    context order over 'sequence' when the mesh splits sequences). row_shards: how many slices of
    rows make the global batch (row_shard; default one per process). Every row is passed whole:
    a process whose devices hold part of a sequence takes its part from it."""
    shards = sequence_shards(next(iter(shardings.values())).mesh)
    if shards > 1:
        local = {k: to_context_order(v, shards, axis=v.ndim - 1) for k, v in local.items()}
    row_shards = jax.process_count() if row_shards is None else row_shards
    return {k: jax.make_array_from_process_local_data(shardings[k], v, (v.shape[0] * row_shards, *v.shape[1:]))
            for k, v in local.items()}


def split_micro_batches(batch: dict, num_micro: int) -> dict:
    """[B, ...] -> [num_micro, B / num_micro, ...] with micro-batch a = rows a, a + A, a + 2A, ...

    A strided split: each device's contiguous block of rows holds an equal share of
    every micro-batch (a contiguous split would give micro-batch 0 to the first
    devices only), and the constraint keeps each micro-batch's rows over
    ('data', 'fsdp'), so no rows move between devices. Call inside jit under a mesh.
    """
    mesh = jax.sharding.get_abstract_mesh()
    row_devices = 1 if mesh.empty else math.prod(mesh.shape.get(axis, 1) for axis in ROW_AXES)

    def split(x):
        rows = x.shape[0]
        if rows % num_micro:
            raise ValueError(f"batch of {rows} rows does not split into {num_micro} micro-batches; make "
                             "DataConfig.batch_size a multiple of OptimizerConfig.grad_accum_steps")
        micro = x.reshape(rows // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)
        if mesh.empty or (rows // num_micro) % row_devices:
            return micro  # fewer rows per micro-batch than devices: no even split exists
        length = SEQUENCE_AXIS if SEQUENCE_AXIS in mesh.axis_names else None  # every field ends with T
        spec = PartitionSpec(None, ROW_AXES, *([None] * (x.ndim - 2)), length)
        return jax.lax.with_sharding_constraint(micro, spec)

    return jax.tree_util.tree_map(split, batch)

"""How a batch lies on the mesh: rows over ('data', 'fsdp'), everything else whole.

Derived from the batch schema (glm_jax.data.batch), so the training loop's input
shardings, the preflight's abstract batch and gradient accumulation's micro-batches
agree on one definition.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glm_jax.data import batch as batch_schema

ROW_AXES = ("data", "fsdp")


def batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    """{field: NamedSharding}: the batch axis over ('data', 'fsdp'), the rest replicated."""
    return {f.name: NamedSharding(mesh, PartitionSpec(ROW_AXES, *([None] * (len(f.leading) + 1))))
            for f in batch_schema.FIELDS}


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
    if batch_size % jax.process_count():
        raise ValueError(f"DataConfig.batch_size {batch_size} does not divide among {jax.process_count()} processes")


def abstract_batch(mesh: Mesh, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a global batch with its shardings (ahead-of-time compiles)."""
    shardings = batch_shardings(mesh)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[name])
            for name, (shape, dtype) in batch_schema.batch_shapes(batch_size, seq_len).items()}


def global_batch(local: dict, shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """This process's rows -> global jax.Arrays sharded over ('data', 'fsdp')."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}


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
        spec = PartitionSpec(None, ROW_AXES, *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(micro, spec)

    return jax.tree_util.tree_map(split, batch)

"""Ahead-of-time compile of the full sharded train step for a TPU topology, on a CPU machine.

    python -m glm_jax.preflight --topology=v5e:4x4 --gin_file=experiments/configs/glm_tiny_stdlib.gin

Uses libtpu's topology descriptions (`pip install 'glm_jax[tpu]'`): the REAL TPU
compiler (Mosaic included) builds the step for the pod's devices, and
`compiled.memory_analysis()` gives per-device HBM. Exits 1 when the step does not
fit a chip, so an OOM is found before a pod is booked (MaxText's train_compile).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import gin
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# HBM per chip (bytes), from the vendor specifications.
HBM_BYTES = {"TPU v4": 32 << 30, "TPU v5 lite": 16 << 30, "TPU v5e": 16 << 30, "TPU v5p": 95 << 30,
             "TPU v5": 95 << 30, "TPU v6 lite": 32 << 30, "TPU v6e": 32 << 30}


def hbm_capacity(device_kind: str) -> int:
    for name, capacity in HBM_BYTES.items():
        if device_kind.startswith(name):
            return capacity
    raise ValueError(f"unknown TPU kind {device_kind!r}; known: {sorted(HBM_BYTES)}")


def topology_devices(topology: str):
    from jax.experimental import topologies

    # Describing a topology loads libtpu; let several processes (test workers, a
    # preflight next to another job) do so without fighting over its lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as error:  # libtpu missing or a bad name: say which
        raise SystemExit(f"preflight: cannot describe TPU topology {topology!r} ({error}); install libtpu "
                         "with `pip install 'glm_jax[tpu]'` and use names like v5e:2x2, v4:2x2x1, v5p:2x2x2")


def compile_train_step(devices, mesh_config, model_config, optimizer_config, data_config, sharding: str):
    """The compiled train step for `devices` (abstract inputs only; nothing is allocated)."""
    from glm_jax.parallel.mesh import make_mesh
    from glm_jax.parallel.rules import logical_axis_rules
    from glm_jax.train.optim import make_optimizer
    from glm_jax.train.state import abstract_state, state_shardings
    from glm_jax.train.step import make_train_step

    mesh: Mesh = make_mesh(mesh_config, devices)
    rules = logical_axis_rules(sharding)
    tx, schedule = make_optimizer(optimizer_config, 1000)
    shardings = state_shardings(model_config, tx, mesh, rules)
    state = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   abstract_state(model_config, tx), shardings)
    B, T = data_config.batch_size, data_config.seq_len
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    batch = {k: jax.ShapeDtypeStruct((B, T), dtype, sharding=rows) for k, dtype in
             (("tokens", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.float32),
              ("segment_ids", jnp.int32), ("prefix_mask", jnp.bool_))}
    batch["positions"] = jax.ShapeDtypeStruct((B, 2, T), jnp.int32,
                                              sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, None)))
    step = make_train_step(model_config, tx, schedule, rules, optimizer_config.grad_accum_steps)
    with jax.set_mesh(mesh):
        return jax.jit(step, donate_argnums=0).lower(state, batch).compile()


def report(compiled, device_kind: str) -> dict:
    stats = compiled.memory_analysis()
    used = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes + stats.generated_code_size_in_bytes)
    capacity = hbm_capacity(device_kind)
    return {"device_kind": device_kind, "arguments": stats.argument_size_in_bytes,
            "outputs": stats.output_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
            "aliased": stats.alias_size_in_bytes, "per_device_bytes": used, "hbm_bytes": capacity,
            "fits": used <= capacity}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_jax.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5e:4x4, v4:2x2x1, v5p:2x2x2")
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin_param", action="append", default=[])
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    from glm_jax import gin_utils
    from glm_jax.data.pipeline import DataConfig
    from glm_jax.model import ModelConfig
    from glm_jax.parallel.mesh import MeshConfig
    from glm_jax.train.loop import train  # noqa: F401  (registers the configurables)
    from glm_jax.train.optim import OptimizerConfig

    bad = [a for a in rest if not a.startswith("--gin.")]
    if bad:
        parser.error(f"unrecognised arguments {bad}")
    gin_utils.parse(args.gin_file, args.gin_param + [gin_utils.binding_from_flag(a) for a in rest])
    devices = topology_devices(args.topology)
    model = ModelConfig()
    if model.dtype == "auto":
        model = model.replace(dtype="bfloat16")  # the accelerator default
    try:
        sharding = gin.query_parameter("train.sharding")
    except ValueError:
        sharding = "fsdp"
    mesh_config = dataclasses.replace(MeshConfig(), num_devices=None)
    gib = 1 << 30
    print(f"preflight {args.topology} ({len(devices)} x {devices[0].device_kind}), {model.num_params() / 1e6:.1f}M "
          f"params, sharding {sharding}:")
    try:
        compiled = compile_train_step(devices, mesh_config, model, OptimizerConfig(), DataConfig(), sharding)
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        # The TPU compiler itself refuses a step that cannot fit in HBM.
        print(f"  DOES NOT FIT: {str(error).splitlines()[0]}")
        return 1
    result = report(compiled, devices[0].device_kind)
    print(f"  per device: arguments {result['arguments'] / gib:.2f} GiB, outputs {result['outputs'] / gib:.2f} GiB, "
          f"temporaries {result['temporaries'] / gib:.2f} GiB, aliased {result['aliased'] / gib:.2f} GiB")
    print(f"  total {result['per_device_bytes'] / gib:.2f} GiB of {result['hbm_bytes'] / gib:.0f} GiB HBM: "
          f"{'fits' if result['fits'] else 'DOES NOT FIT'}")
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())

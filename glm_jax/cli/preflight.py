"""glm_jax preflight --topology=v5e:4x4 --gin_file=CONFIG [--gin.NAME=VALUE ...]

Compiles the experiment's full sharded train step for a TPU topology on this
machine with the real TPU compiler (glm_jax.train.preflight) and prints per-device
HBM. Exits 1 when the step does not fit a chip.
"""

from __future__ import annotations

import argparse

from glm_jax.cli import flags


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="glm_jax preflight", description=__doc__.splitlines()[0])
    parser.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5e:4x4, v4:2x2x1, v5p:2x2x2")
    flags.add_gin_arguments(parser)
    args, bindings = flags.parse_with_gin(parser, argv)
    import jax

    from glm_jax import experiment as experiment_lib
    from glm_jax.train import preflight

    experiment = preflight.accelerator_experiment(experiment_lib.from_gin(args.gin_file, bindings))
    devices = preflight.topology_devices(args.topology)
    gib = 1 << 30
    print(f"preflight {args.topology} ({len(devices)} x {devices[0].device_kind}), "
          f"{experiment.model.num_params() / 1e6:.1f}M params, sharding {experiment.train.sharding}:")
    try:
        compiled = preflight.compile_train_step(devices, experiment)
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        # The TPU compiler itself refuses a step that cannot fit in HBM.
        print(f"  DOES NOT FIT: {str(error).splitlines()[0]}")
        return 1
    result = preflight.report(compiled, devices[0].device_kind)
    print(f"  per device: arguments {result['arguments'] / gib:.2f} GiB, outputs {result['outputs'] / gib:.2f} GiB, "
          f"temporaries {result['temporaries'] / gib:.2f} GiB, aliased {result['aliased'] / gib:.2f} GiB")
    print(f"  total {result['per_device_bytes'] / gib:.2f} GiB of {result['hbm_bytes'] / gib:.0f} GiB HBM: "
          f"{'fits' if result['fits'] else 'DOES NOT FIT'}")
    return 0 if result["fits"] else 1

"""glm_jax preflight --topology=v5e:4x4 --gin_file=CONFIG [--inference --batch B --context T --new_tokens N]
[--gin.NAME=VALUE ...]

Compiles the experiment's full sharded train step (or, with --inference, its generation
program: prefill of B prompts of T tokens and N decode steps) for a TPU topology on this
machine with the real TPU compiler and prints per-device HBM. Exits 1 when it does not
fit a chip. A quantized model (--gin.ModelConfig.quant_bits=4, or a quantized run's
config.gin) is compiled with its integer weights: --inference only, it does not train.
"""

from __future__ import annotations

import argparse

from glm_jax.cli import flags


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="glm_jax preflight", description=__doc__.splitlines()[0])
    parser.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5e:4x4, v4:2x2x1, v5p:2x2x2")
    parser.add_argument("--inference", action="store_true", help="compile generation instead of the train step")
    parser.add_argument("--batch", type=int, default=1, help="--inference: prompts decoded together")
    parser.add_argument("--context", type=int, default=2048, help="--inference: prompt length (tokens)")
    parser.add_argument("--new_tokens", type=int, default=128, help="--inference: decoded tokens")
    flags.add_gin_arguments(parser)
    args, bindings = flags.parse_with_gin(parser, argv)
    import jax

    from glm_jax import experiment as experiment_lib
    from glm_jax.infer.preflight import compile_generator
    from glm_jax.model.pipeline_parallel import bubble_fraction
    from glm_jax.parallel.rules import logical_axis_rules
    from glm_jax.parallel.tpu_topology import memory_report, topology_devices
    from glm_jax.train import preflight

    experiment = preflight.accelerator_experiment(experiment_lib.from_gin(args.gin_file, bindings))
    devices = topology_devices(args.topology)
    gib = 1 << 30
    model = experiment.adapted_model
    precision = f"INT{model.quant_bits} projections" if model.quant_bits else model.param_dtype
    what = (f"generation of {args.batch} x {args.context} + {args.new_tokens} tokens" if args.inference
            else "train step")
    print(f"preflight {args.topology} ({len(devices)} x {devices[0].device_kind}), {what}, "
          f"{model.num_params() / 1e6:.1f}M params ({precision}), sharding {experiment.train.sharding}:")
    try:
        if args.inference:
            compiled = compile_generator(devices, model, experiment.mesh, logical_axis_rules(experiment.train.sharding),
                                         args.batch, args.context, args.new_tokens)
        else:
            compiled = preflight.compile_train_step(devices, experiment)
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        # The TPU compiler itself refuses a program that cannot fit in HBM.
        print(f"  DOES NOT FIT: {str(error).splitlines()[0]}")
        return 1
    result = memory_report(compiled, devices[0].device_kind)
    print(f"  per device: arguments {result['arguments'] / gib:.2f} GiB, outputs {result['outputs'] / gib:.2f} GiB, "
          f"temporaries {result['temporaries'] / gib:.2f} GiB, aliased {result['aliased'] / gib:.2f} GiB")
    print(f"  total {result['per_device_bytes'] / gib:.2f} GiB of {result['hbm_bytes'] / gib:.0f} GiB HBM: "
          f"{'fits' if result['fits'] else 'DOES NOT FIT'}")
    if experiment.mesh.stage > 1 and not args.inference:
        microbatches = model.pipeline_microbatches or experiment.mesh.stage
        print(f"  pipeline: {experiment.mesh.stage} stages x {microbatches} micro-batches (GPipe), bubble "
              f"{bubble_fraction(experiment.mesh.stage, microbatches):.1%} of the layer stack's time")
    return 0 if result["fits"] else 1

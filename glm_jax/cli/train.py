"""glm_jax train --gin_file=CONFIG [--gin.NAME=VALUE ...] [--gin_param='NAME = VALUE' ...]

Builds the experiment from gin and trains it (glm_jax.train.loop.train).
Multi-process runs (launch.sh multiprocess / tpu / slurm) start jax.distributed first.
"""

from __future__ import annotations

import argparse

from glm_jax.cli import flags


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="glm_jax train", description=__doc__.splitlines()[0])
    flags.add_gin_arguments(parser)
    args, bindings = flags.parse_with_gin(parser, argv)
    from glm_jax import experiment
    from glm_jax.parallel.mesh import initialize_distributed
    from glm_jax.train.loop import train

    initialize_distributed()
    summary = train(experiment.from_gin(args.gin_file, bindings))
    return 130 if summary.get("stopped_by") == "SIGINT" else 0  # a shell sees that Ctrl-C stopped the run

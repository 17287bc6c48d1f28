"""glm_jax train --gin_file=CONFIG [--gin.NAME=VALUE ...] [--gin_param='NAME = VALUE' ...]

Builds the experiment from gin and trains it (glm_jax.train.loop.train).
Multi-process runs (launch.sh multiprocess / tpu / slurm) start jax.distributed first.

A run is extended or resumed by training its own config.gin: `--gin_file=RUN/config.gin
--gin.STEPS=N`. That run directory is where it trains, wherever it was moved or copied to
and whatever the working directory (its config.gin records the RUN_DIR it was created with).
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
    summary = train(experiment.from_gin(args.gin_file, bindings + self_located(args.gin_file, bindings)))
    return 130 if summary.get("stopped_by") == "SIGINT" else 0  # a shell sees that Ctrl-C stopped the run


def self_located(gin_files: list[str], bindings: list[str]) -> list[str]:
    """`train.run_dir = <the run directory>` when the last gin file is a run's own config.gin and the command
    line does not set RUN_DIR: a copied or moved run trains where it is, not where it was made. It binds
    the parameter rather than the RUN_DIR macro because runs converted by earlier versions bind
    train.run_dir directly, and a macro they do not read would be rejected as a typo."""
    from glm_jax.run_dir import RunDir

    run = RunDir.holding_config(gin_files[-1]) if gin_files else None
    if run is None or any(b.replace(" ", "").startswith(("RUN_DIR=", "train.run_dir=")) for b in bindings):
        return []
    return [f"train.run_dir = {str(run.path)!r}"]

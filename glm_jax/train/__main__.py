"""python -m glm_jax.train --gin_file=CONFIG [--gin.NAME=VALUE ...] [--gin_param='NAME = VALUE' ...]

Runs glm_jax.train.loop.train with the parsed bindings. Multi-process runs
(launch.sh multiprocess / tpu / slurm) start jax.distributed first.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(prog="python -m glm_jax.train", description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
    parser.add_argument("--gin_param", action="append", default=[], help="gin binding 'NAME = VALUE' (repeatable)")
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--gin.")]
    unknown = [a for a in rest if not a.startswith("--gin.")]
    if unknown:
        parser.error(f"unrecognised arguments {unknown}; gin overrides are --gin.NAME=VALUE")
    if not args.gin_file:
        parser.error("give at least one --gin_file (e.g. experiments/configs/glm_tiny_stdlib.gin)")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from glm_jax import gin_utils
    from glm_jax.parallel.mesh import initialize_distributed
    from glm_jax.train.loop import train  # registers every configurable before parsing

    initialize_distributed()
    bindings = args.gin_param + [gin_utils.binding_from_flag(flag) for flag in overrides]
    gin_utils.parse(args.gin_file, bindings)
    train()
    return 0


if __name__ == "__main__":
    sys.exit(main())

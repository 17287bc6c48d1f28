"""glm_jax convert uptrain --from RUN_OR_CKPT --num_kv_heads G --method mean|first|random --out NEW_RUN

Converts an MHA (or GQA) checkpoint to G key/value heads and writes a run
directory that `./launch.sh train NEW_RUN/config.gin` uptrains (see
glm_jax/convert/uptrain.py and glm_jax/configs/uptrain_gqa.gin).
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="glm_jax convert", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    uptrain = commands.add_parser("uptrain", help="MHA -> GQA/MQA by pooling key/value heads")
    uptrain.add_argument("--from", dest="source", required=True,
                         help="run directory, its checkpoints/ folder, or RUN/checkpoints/STEP")
    uptrain.add_argument("--num_kv_heads", type=int, required=True, help="G: key/value heads after conversion")
    uptrain.add_argument("--method", choices=("mean", "first", "random"), default="mean")
    uptrain.add_argument("--out", required=True, help="new run directory")
    uptrain.add_argument("--alpha", type=float, default=None,
                         help="uptraining steps as a fraction of the source's (default: the recipe's 0.05)")
    uptrain.add_argument("--recipe", default=None, help="recipe gin file (default: the shipped uptrain_gqa.gin)")
    uptrain.add_argument("--seed", type=int, default=0, help="initialiser seed of --method random")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from glm_jax.convert.uptrain import DEFAULT_RECIPE, convert_run

    provenance = convert_run(args.source, args.num_kv_heads, args.method, args.out, seed=args.seed,
                             alpha=args.alpha, recipe_file=args.recipe or DEFAULT_RECIPE)
    print(json.dumps(provenance, indent=2))
    print(f"uptrain it with: ./launch.sh train {args.out}/config.gin", file=sys.stderr)
    return 0

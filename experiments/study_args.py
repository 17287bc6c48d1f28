"""The command line every study script shares: --config, --quick, --out_dir, --results and gin overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

from glm_jax.cli import flags

REPO = Path(__file__).resolve().parents[1]


def parse_study_args(parser: argparse.ArgumentParser, argv: list[str], config: str,
                     runs: str) -> tuple[argparse.Namespace, list[str]]:
    """(arguments, gin overrides) of a study whose gin file is experiments/configs/CONFIG.gin
    (CONFIG_quick.gin with --quick) and whose runs go to runs/RUNS (runs/RUNS_quick)."""
    parser.add_argument("--config", default=None, help=f"study gin file (default {config}.gin)")
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes ({config}_quick.gin): a smoke run")
    parser.add_argument("--out_dir", default=None, help=f"run directories (default runs/{runs}[_quick])")
    parser.add_argument("--results", default=None, help="report directory (default experiments/results)")
    args, overrides = flags.parse_with_gin(parser, argv)
    suffix = "_quick" if args.quick else ""
    args.config = args.config or str(REPO / "experiments" / "configs" / f"{config}{suffix}.gin")
    args.out_dir = Path(args.out_dir or REPO / "runs" / f"{runs}{suffix}")
    args.results = Path(args.results or REPO / "experiments" / "results")
    return args, overrides

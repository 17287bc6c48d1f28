"""The command-line form of an experiment, shared by every CLI: --gin_file, --gin_param, --gin.NAME=VALUE."""

from __future__ import annotations

import argparse


def add_gin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gin_file", action="append", default=[], required=True,
                        help="gin config file (repeatable); shipped configs by name, e.g. models/glm_tiny.gin")
    parser.add_argument("--gin_param", action="append", default=[], help="gin binding 'NAME = VALUE' (repeatable)")


def binding_from_flag(flag: str) -> str:
    """'--gin.train.steps=20' -> 'train.steps = 20'."""
    name, _, value = flag[len("--gin."):].partition("=")
    if not name or not value:
        raise ValueError(f"{flag!r}: write gin overrides as --gin.NAME=VALUE (e.g. --gin.train.steps=20)")
    return f"{name} = {value}"


def parse_with_gin(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the parser's arguments, gin bindings): --gin_param values then --gin.NAME=VALUE overrides, in order.

    Anything else left over is an error that says how overrides are written.
    """
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--gin.")]
    if unknown:
        parser.error(f"unrecognised arguments {unknown}; gin overrides are --gin.NAME=VALUE")
    try:
        overrides = [binding_from_flag(a) for a in rest]
    except ValueError as error:
        parser.error(str(error))
    return args, list(getattr(args, "gin_param", [])) + overrides

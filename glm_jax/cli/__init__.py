"""The command line: `python -m glm_jax COMMAND ...` (or the `glm_jax` script).

Every command is one module here with a `main(argv) -> exit code`; each builds its
inputs (an Experiment from gin flags, a run directory) and calls the library.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "train": "train a model from gin configs (resumes its run directory)",
    "generate": "fill [MASK]s or continue a prompt with a run's latest checkpoint",
    "convert": "convert a run's checkpoint (MHA -> GQA/MQA uptraining)",
    "preflight": "compile the sharded train step for a TPU topology here and report HBM",
}


def usage() -> str:
    lines = ["usage: python -m glm_jax COMMAND [--help | arguments]", "", "commands:"]
    lines += [f"  {name:<10} {what}" for name, what in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"glm_jax: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        return importlib.import_module(f"glm_jax.cli.{command}").main(rest)
    except _user_errors() as error:
        if os.environ.get("GLM_JAX_TRACEBACK"):
            raise
        print(f"glm_jax {command}: {error}\n(set GLM_JAX_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type, ...]:
    """What a user's input can cause (bad config, path, checkpoint, data, disk): a message, not a traceback."""
    from glm_jax.checkpoint import CheckpointSaveError, DamagedCheckpoint
    from glm_jax.train.loop import TrainingDiverged

    return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, DamagedCheckpoint,
            CheckpointSaveError, TrainingDiverged)

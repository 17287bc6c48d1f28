"""The command line: `python -m glm_jax COMMAND ...` (or the `glm_jax` script).

Every command is one module here with a `main(argv) -> exit code`; each builds its
inputs (an Experiment from gin flags, a run directory) and calls the library.
"""

from __future__ import annotations

import glob
import importlib
import os
import sys

COMMANDS = {
    "train": "train a model from gin configs (resumes its run directory)",
    "generate": "fill [MASK]s or continue a prompt with a run's latest checkpoint",
    "chat": "multi-turn chat (ChatGLM3 / GLM-4 format, tool calls) with a run",
    "convert": "convert a run (MHA -> GQA/MQA uptraining, Hugging Face import/export, LoRA merge)",
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
    pin_cpu_unless_accelerator()
    try:
        return importlib.import_module(f"glm_jax.cli.{command}").main(rest)
    except _user_errors() as error:
        if os.environ.get("GLM_JAX_TRACEBACK"):
            raise
        message = str(error).split("\n  In call to configurable")[0]  # gin appends where it called the class
        print(f"glm_jax {command}: {message}\n(set GLM_JAX_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2


# Device files of TPUs (/dev/accel*, /dev/vfio/N) and NVIDIA GPUs (/dev/nvidiaN).
ACCELERATOR_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")


def pin_cpu_unless_accelerator() -> None:
    """JAX_PLATFORMS=cpu when the machine has no accelerator device files (and the user set none).

    Without it an installed libtpu (the tpu extra, which the preflight uses) probes for a TPU
    on every start and prints initialisation errors. launch.sh does the same for its commands.
    Must run before jax is imported.
    """
    if not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _user_errors() -> tuple[type, ...]:
    """What a user's input can cause (bad config, path, checkpoint, data, disk): a message, not a traceback."""
    from glm_jax.checkpoint import CheckpointSaveError, DamagedCheckpoint
    from glm_jax.train.loop import TrainingDiverged

    return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, DamagedCheckpoint,
            CheckpointSaveError, TrainingDiverged)

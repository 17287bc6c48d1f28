"""Parsing gin experiment configs: one search path, fail-fast errors that name the file."""

from __future__ import annotations

import logging
from pathlib import Path

import gin

CONFIG_DIR = Path(__file__).resolve().parents[1] / "experiments" / "configs"


class _QuietProbe(logging.Filter):
    # gin's package-resource reader logs "Path not found" for every search path it
    # probes before the one that has the file; the include still succeeds.
    def filter(self, record):
        return not record.getMessage().startswith("Path not found")


logging.getLogger().addFilter(_QuietProbe())


def binding_from_flag(flag: str) -> str:
    """'--gin.train.steps=20' -> 'train.steps = 20'."""
    name, _, value = flag[len("--gin."):].partition("=")
    if not value:
        raise ValueError(f"{flag!r}: write gin overrides as --gin.NAME=VALUE (e.g. --gin.train.steps=20)")
    return f"{name} = {value}"


def parse(files: list[str | Path], bindings: list[str], clear: bool = True) -> None:
    """Parses config files then bindings; errors name the offending file or binding.

    Includes inside the files resolve against experiments/configs/ (so presets are
    'models/glm_tiny.gin') as well as the working directory.
    """
    if clear:
        gin.clear_config()
    gin.add_config_file_search_path(str(CONFIG_DIR))
    for file in files:
        if not Path(file).exists() and not (CONFIG_DIR / file).exists():
            raise FileNotFoundError(f"gin config {file} does not exist (looked in . and {CONFIG_DIR})")
        path = file if Path(file).exists() else CONFIG_DIR / file
        try:
            gin.parse_config_file(str(path))
        except (ValueError, KeyError, SyntaxError, NameError) as error:
            raise ValueError(f"in gin config {path}: {error}") from error
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except (ValueError, KeyError, SyntaxError, NameError) as error:
            raise ValueError(f"in gin binding {binding!r}: {error}") from error
    gin.finalize()

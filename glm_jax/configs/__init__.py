"""The gin configs shipped with the package: base.gin, models/, objectives/, meshes/, uptrain_gqa.gin.

They are package data, so a pip-installed glm_jax (a pod worker, a wheel) has them
too. User gin files include them by these short names (`include 'models/glm_tiny.gin'`):
glm_jax.experiment puts this directory on gin's search path.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def config_dir() -> Path:
    """The directory holding the shipped gin files (a real directory: the package is installed unzipped)."""
    return Path(str(importlib.resources.files(__name__)))


def model_preset_names() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "models").glob("*.gin"))

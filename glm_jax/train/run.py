"""A run directory read back: operative config, tokenizer and parameters.

What generation, evaluation and conversion start from. A run directory (written
by glm_jax.train) holds config.gin (the operative gin config), tokenizer.model
and checkpoints/. Parameters are restored alone (no optimizer state).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import flax.linen as nn
import gin

from glm_jax import gin_utils
from glm_jax.data.objectives import Objective
from glm_jax.data.pipeline import DataConfig
from glm_jax.data.tokenizer import Tokenizer
from glm_jax.model import ModelConfig, abstract_params
from glm_jax.train.checkpoint import restore_params


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The configurables of a run, as its operative config.gin bound them."""

    model: ModelConfig
    data: DataConfig
    objective: Objective
    gin_text: str


@dataclasses.dataclass
class Run:
    directory: Path
    config: RunConfig
    tokenizer: Tokenizer
    params: object
    step: int


def read_run_config(run_dir: str | Path) -> RunConfig:
    """Model, data and objective configs of a run directory's operative config.gin."""
    path = Path(run_dir) / "config.gin"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a run directory written by glm_jax.train "
                                "(it holds config.gin, tokenizer.model and checkpoints/)")
    import glm_jax.train.loop  # noqa: F401  (registers every configurable the file binds)

    gin_utils.parse([path], [])
    try:
        return RunConfig(ModelConfig(), DataConfig(), Objective(), path.read_text())
    finally:
        gin.clear_config()


def load_run(run_dir: str | Path, step: int | None = None, shardings=None) -> Run:
    """The latest (or given) checkpoint of a run with its configs and tokenizer."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    tokenizer = Tokenizer.load(run_dir / "tokenizer.model")
    params, step = restore_params(run_dir, nn.unbox(abstract_params(config.model)), step, shardings)
    return Run(run_dir, config, tokenizer, params, step)

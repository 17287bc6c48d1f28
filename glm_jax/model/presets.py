"""Model presets: gin files under experiments/configs/models/, loaded by name."""

from __future__ import annotations

import gin

from glm_jax import gin_utils
from glm_jax.model.config import ModelConfig

CONFIG_DIR = gin_utils.CONFIG_DIR


def preset_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.gin"))


def load_preset(name: str, **overrides) -> ModelConfig:
    """ModelConfig of preset `name` (e.g. 'chatglm2_6b'), with field overrides.

    Parses the preset into a fresh gin config and clears it afterwards, so
    loading a preset does not leak bindings into the caller's gin state.
    """
    path = CONFIG_DIR / "models" / f"{name}.gin"
    if not path.exists():
        raise ValueError(f"model preset {name!r} not found at {path}; known presets: {preset_names()}")
    try:
        gin_utils.parse([path], [])
        config = ModelConfig()
    finally:
        gin.clear_config()
    return config.replace(**overrides) if overrides else config

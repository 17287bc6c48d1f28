"""Model presets: gin files under experiments/configs/models/, loaded by name."""

from __future__ import annotations

from pathlib import Path

import gin

from glm_jax.model.config import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "experiments" / "configs"


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
    gin.clear_config()
    gin.add_config_file_search_path(str(CONFIG_DIR))
    try:
        gin.parse_config_file(str(path))
        config = ModelConfig()
    finally:
        gin.clear_config()
    return config.replace(**overrides) if overrides else config

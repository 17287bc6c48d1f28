"""GLM-family model: ModelConfig and the GLM flax.linen module."""

from glm_jax.model.config import ModelConfig
from glm_jax.model.glm import GLM, abstract_params, example_inputs, init_params, param_bytes, quantize_params

__all__ = ["ModelConfig", "GLM", "abstract_params", "example_inputs", "init_params", "param_bytes",
           "quantize_params"]

"""Adapter tuning (Houlsby et al. 2019): small bottleneck layers in every block, the rest frozen.

    adapters = BottleneckAdapters(dim=16)
    model = adapters.model(config)                # GLM with config.adapter_dim = 16
    params = model.init(rng, *example_inputs())["params"]
    base, trained = split_adapters(params)        # every layer's attention_adapter/*, mlp_adapter/*

Each layer's attention output and MLP output pass h + up(gelu(down(h))) before their
residual sums (glm_jax.model.layers.Bottleneck: down [E, dim], up [dim, E], with biases,
2 L (2 E dim + dim + E) parameters in all). The up-projections start at zero, so the
adapted model starts as its base.

The adapter is nonlinear, so unlike LoRA it cannot be merged into the base weights: an
adapter run is generated from, chatted with and evaluated as it is (its model has
ModelConfig.adapter_dim), at the cost of two small extra matmuls per sublayer.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from glm_jax.model.config import ModelConfig
from glm_jax.model.glm import GLM


@dataclasses.dataclass(frozen=True)
class BottleneckAdapters:
    """dim: the bottleneck width (Houlsby et al. use 8 to 256 for BERT-large's 1024)."""

    dim: int = 16

    kind = "bottleneck"  # the train.adapter value (glm_jax.model.adapters.Adapter)
    dropout = 0.0
    mergeable = False

    def __post_init__(self):
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim < 1:
            raise ValueError(f"BottleneckAdapters.dim {self.dim!r} must be a whole number >= 1 (the bottleneck width)")

    def model_config(self, config: ModelConfig) -> ModelConfig:
        return config.replace(adapter_dim=self.dim)

    def model(self, config: ModelConfig) -> nn.Module:
        return GLM(self.model_config(config))

    def for_evaluation(self) -> "BottleneckAdapters":
        return self

    def check(self, adapters) -> None:
        if not adapters:
            raise ValueError("adapter tuning created no adapters; is ModelConfig.adapter_dim overridden to 0?")

    def merge(self, params) -> dict:
        raise ValueError("bottleneck adapters are nonlinear layers, not a weight change, so they cannot be merged into "
                         "the base weights; generate, chat and evaluate use the adapter run directly (its model has "
                         "ModelConfig.adapter_dim = BottleneckAdapters.dim)")

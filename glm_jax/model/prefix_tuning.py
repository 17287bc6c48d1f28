"""P-tuning v2 (Liu et al. 2021), as ChatGLM2/3 fine-tune with it: a trained key/value prefix per layer.

    prefix = PrefixTuning(length=16)
    model = prefix.model(config)                  # GLM with config.pre_seq_len = 16
    params = model.init(rng, *example_inputs())["params"]
    base, adapters = split_adapters(params)       # adapters: every layer's prefix_key, prefix_value

Each layer gets P slots of keys and values [P, G, D] that every query attends to,
with no position (ChatGLM passes them as past_key_values, which its rotary
embedding never sees); glm_jax.kernels.learned_prefix merges them with the
sequence's attention. Only these train; the base model stays frozen. ChatGLM's
optional `prefix_projection` (an MLP reparameterisation of the prefix while
training) is not provided: its default is off.

Unlike LoRA, a prefix is not a weight delta, so it cannot be merged into the base
weights: a P-tuning run is generated from, chatted with and evaluated as it is
(its model has pre_seq_len = P), and `export-hf` refuses it.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from glm_jax.model.config import ModelConfig
from glm_jax.model.glm import GLM


@dataclasses.dataclass(frozen=True)
class PrefixTuning:
    """length: prefix slots P per layer (ChatGLM3's P-tuning v2 example uses 128)."""

    length: int = 16

    kind = "prefix"
    dropout = 0.0
    mergeable = False

    def __post_init__(self):
        if not isinstance(self.length, int) or isinstance(self.length, bool) or self.length < 1:
            raise ValueError(f"PrefixTuning.length {self.length!r} must be a whole number >= 1 "
                             "(key/value slots per layer)")

    def model_config(self, config: ModelConfig) -> ModelConfig:
        return config.replace(pre_seq_len=self.length)

    def model(self, config: ModelConfig) -> nn.Module:
        return GLM(self.model_config(config))

    def for_evaluation(self) -> "PrefixTuning":
        return self

    def check(self, adapters) -> None:
        if not adapters:
            raise ValueError("P-tuning created no prefix parameters; is ModelConfig.pre_seq_len overridden to 0?")

    def merge(self, params) -> dict:
        raise ValueError(NOT_MERGEABLE)


NOT_MERGEABLE = ("a P-tuning v2 prefix is extra attention keys and values, not a weight change, so it cannot be merged "
                 "into the base weights; generate, chat and evaluate use the P-tuning run directly (its model has "
                 "ModelConfig.pre_seq_len = PrefixTuning.length)")

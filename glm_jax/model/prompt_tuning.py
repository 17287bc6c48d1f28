"""Prompt tuning (Lester et al. 2021): P trained input embeddings, the only parameters that train.

    prompt = PromptTuning(length=16)
    model = prompt.model(config)                  # GLM with config.prompt_len = 16
    params = model.init(rng, *example_inputs())["params"]
    base, adapters = split_adapters(params)       # adapters: {'soft_prompt': [16, E]}

The soft prompt is what prepending P virtual tokens to every example gives, made to fit
packed rows: its states run through every layer beside the sequence (the same weights,
glm_jax.model.glm.Block), attend to one another bidirectionally (a GLM Part A of their
own), carry no position (as P-tuning v2's slots), and every query of every packed
segment sees their keys and values (glm_jax.model.attention). The prompt depends on no
token, so it is computed once per batch rather than once per segment, and the sequence's
own positions are not shifted by it.

Against P-tuning v2 (glm_jax.model.prefix_tuning), which trains the per-layer keys and
values directly (2 L P G D parameters), prompt tuning trains P E parameters and reaches
the layers only through the frozen weights. Like P-tuning it cannot be merged into the base
weights: a prompt-tuning run is generated from, chatted with and evaluated as it is.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from glm_jax.model.config import ModelConfig
from glm_jax.model.glm import GLM


@dataclasses.dataclass(frozen=True)
class PromptTuning:
    """length: soft-prompt tokens P (Lester et al. use 5 to 150; 20 is their common choice)."""

    length: int = 20

    kind = "prompt"  # the train.adapter value (glm_jax.model.adapters.Adapter)
    dropout = 0.0
    mergeable = False

    def __post_init__(self):
        if not isinstance(self.length, int) or isinstance(self.length, bool) or self.length < 1:
            raise ValueError(f"PromptTuning.length {self.length!r} must be a whole number >= 1 (soft-prompt tokens)")

    def model_config(self, config: ModelConfig) -> ModelConfig:
        return config.replace(prompt_len=self.length)

    def model(self, config: ModelConfig) -> nn.Module:
        return GLM(self.model_config(config))

    def for_evaluation(self) -> "PromptTuning":
        return self

    def check(self, adapters) -> None:
        if "soft_prompt" not in adapters:
            raise ValueError("prompt tuning created no soft prompt; is ModelConfig.prompt_len overridden to 0?")

    def merge(self, params) -> dict:
        raise ValueError("a soft prompt is extra input tokens, not a weight change, so it cannot be merged into the "
                         "base weights; generate, chat and evaluate use the prompt-tuning run directly (its model "
                         "has ModelConfig.prompt_len = PromptTuning.length)")

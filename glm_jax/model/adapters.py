"""Parameter-efficient fine-tuning: the seam every method plugs into, and the parameter-tree
operations they share.

A method is a frozen gin dataclass (glm_jax.model.lora.LoraConfig,
glm_jax.model.prefix_tuning.PrefixTuning, glm_jax.model.prompt_tuning.PromptTuning,
glm_jax.model.bottleneck_adapters.BottleneckAdapters) with the `Adapter` methods below. Training,
evaluation, checkpoints and the preflight only use those methods: the train state holds
the adapter parameters and their optimizer moments, the frozen base parameters come in
beside it, and a checkpoint holds the adapters alone.

Adapter parameters are told apart by name wherever they sit in the tree: LoRA's
`<kernel>_lora_a` / `_lora_b` (qwix's names), P-tuning v2's `prefix_key` /
`prefix_value`, prompt tuning's `soft_prompt` and the bottleneck adapters' `adapter_*`.
"""

from __future__ import annotations

from typing import Protocol

import flax.linen as nn
import jax

from glm_jax.model.config import ModelConfig
from glm_jax.model.glm import example_inputs

ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
ADAPTER_NAMES = ("prefix_key", "prefix_value", "soft_prompt", "adapter_down", "adapter_down_bias", "adapter_up",
                 "adapter_up_bias")


class Adapter(Protocol):
    """What a parameter-efficient method provides (train.adapter names it)."""

    kind: str  # the train.adapter value: 'lora', 'prefix', 'prompt', 'bottleneck'
    dropout: float  # > 0: the train step passes a 'dropout' rng
    mergeable: bool  # merge() gives plain GLM parameters (RunDir.load returns such runs merged)

    def model_config(self, config: ModelConfig) -> ModelConfig:
        """The architecture the adapted model has (e.g. with P learned prefix slots, a soft prompt, adapters)."""

    def model(self, config: ModelConfig) -> nn.Module:
        """A linen module with GLM's call signature: the base model with the adapters."""

    def for_evaluation(self) -> "Adapter":
        """The same adapters with training-only randomness (dropout) off."""

    def check(self, adapters) -> None:
        """A ValueError if the adapter parameters of a fresh init show a misconfiguration."""

    def merge(self, params) -> dict:
        """base + adapters -> plain GLM parameters of the same function; a ValueError saying
        what to do instead where the method cannot be merged."""


def is_adapter(path) -> bool:
    name = str(getattr(path[-1], "key", path[-1]))
    return name.endswith(ADAPTER_SUFFIXES) or name in ADAPTER_NAMES


def leaves(tree):
    """(path, leaf) of a parameter tree; a boxed (logically partitioned) parameter is one leaf."""
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))[0]


def split_adapters(params) -> tuple[dict, dict]:
    """(base parameters, adapter parameters): the same nesting, each holding only its own leaves."""
    base, adapters = {}, {}
    for path, leaf in leaves(params):
        _insert(adapters if is_adapter(path) else base, path, leaf)
    return base, adapters


def join_adapters(base: dict, adapters: dict) -> dict:
    """base + adapters -> the parameter tree the adapted model applies with (split_adapters' inverse)."""
    joined: dict = {}
    for tree in (base, adapters):
        for path, leaf in leaves(tree):
            _insert(joined, path, leaf)
    return joined


def _insert(tree: dict, path, leaf) -> None:
    *parents, last = [str(getattr(k, "key", k)) for k in path]
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = leaf


def init_adapters(config: ModelConfig, adapter: Adapter, rng: jax.Array):
    """Boxed (logically partitioned) adapter parameters alone: what an adapter run trains."""
    adapters = split_adapters(adapter.model(config).init(rng, *example_inputs())["params"])[1]
    adapter.check(adapters)
    return adapters


def init_adapted_params(config: ModelConfig, adapter: Adapter, rng: jax.Array):
    """Parameters of adapter.model(config), base and adapters (unboxed), checked."""
    params = nn.unbox(adapter.model(config).init(rng, *example_inputs())["params"])
    adapter.check(split_adapters(params)[1])
    return params


def count_adapter_params(params) -> int:
    return sum(nn.unbox(leaf).size for path, leaf in leaves(params) if is_adapter(path))

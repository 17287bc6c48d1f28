"""LoRA (Hu et al. 2021) on chosen projections of a GLM, through qwix's LoRA provider.

    lora = LoraConfig(rank=8, alpha=16, targets=("attention/query", "attention/value"))
    model = lora_model(model_config, lora)            # a linen module: GLM with adapters
    params = model.init(rng, *example_inputs())["params"]
    base, adapters = split_adapters(params)           # only `adapters` train
    merged = merge_adapters(params, lora)             # plain GLM parameters, same function

qwix (Google's JAX quantization library, which has LoRA / QLoRA for Flax linen)
intercepts the dot_general of every module whose path matches a target and adds
x A B * alpha / rank next to the frozen kernel W, creating `kernel_lora_a` and
`kernel_lora_b` beside `kernel` (inside the scanned layer stack too: one adapter
per layer, stacked like the kernels). A is [inputs, rank] (he-uniform), B is
[rank, outputs] (zeros), so a fresh adapter leaves the model's function unchanged.
Merging adds (A B) * alpha / rank, reshaped to W's (inputs..., outputs...) layout,
to W: the merged parameters are a plain GLM's.
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax.numpy as jnp

from glm_jax.model.adapters import is_adapter, leaves, split_adapters
from glm_jax.model.config import ModelConfig
from glm_jax.model.glm import GLM


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (the update is scaled by alpha / r), targets: module paths inside a layer
    ('attention/query', 'attention/key', 'attention/value', 'attention/out', 'mlp/wi', 'mlp/wo'),
    each a regular expression matched against the end of the module's path; dropout on the
    adapter's input while training."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention/query", "attention/value")
    dropout: float = 0.0

    kind = "lora"  # the train.adapter value (glm_jax.model.adapters.Adapter)
    mergeable = True

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank {self.rank!r} must be a whole number >= 1")
        if self.alpha <= 0:
            raise ValueError(f"LoraConfig.alpha {self.alpha} must be positive (the update is scaled by alpha / rank)")
        if not self.targets:
            raise ValueError("LoraConfig.targets is empty; name the projections to adapt, e.g. "
                             "('attention/query', 'attention/value')")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout {self.dropout} must be in [0, 1)")

    def model_config(self, config: ModelConfig) -> ModelConfig:
        return config  # the adapters wrap the projections; the architecture is the base's

    def model(self, config: ModelConfig) -> nn.Module:
        return lora_model(config, self)

    def for_evaluation(self) -> "LoraConfig":
        return dataclasses.replace(self, dropout=0.0)

    def check(self, adapters) -> None:
        check_targets(adapters, self)

    def merge(self, params) -> dict:
        return merge_adapters(params, self)

    @property
    def module_pattern(self) -> str:
        """The regular expression qwix matches (fully) against a module's path, e.g. 'layers/attention/query'."""
        return "(.*/)?(" + "|".join(f"(?:{t})" for t in self.targets) + ")"


def lora_model(config: ModelConfig, lora: LoraConfig) -> nn.Module:
    """GLM(config) with LoRA adapters on lora.targets (a linen module with GLM's call signature)."""
    import qwix  # only LoRA runs need it

    provider = qwix.LoraProvider(module_path=lora.module_pattern, rank=lora.rank, alpha=float(lora.alpha),
                                 dropout=lora.dropout)
    return qwix.apply_lora_to_model(GLM(config), provider)


def check_targets(params, lora: LoraConfig) -> None:
    """Every target must have adapted at least one kernel."""
    adapted = ["/".join(str(getattr(k, "key", k)) for k in path[:-1]) for path, _ in leaves(params)
               if is_adapter(path)]
    missing = [t for t in lora.targets if not any(re.search(f"(^|/)(?:{t})$", p) for p in adapted)]
    if missing:
        raise ValueError(f"LoRA targets {missing} match no projection of this model; targets are module paths "
                         "inside a layer: 'attention/query', 'attention/key', 'attention/value', 'attention/out', "
                         "'mlp/wi', 'mlp/wo' (regular expressions)")


def merge_adapters(params, lora: LoraConfig) -> dict:
    """Plain GLM parameters: W + (A B) * alpha / rank for every adapted kernel, adapters removed."""
    base, adapters = split_adapters(params)
    scale = lora.alpha / lora.rank

    def merge(tree: dict, extra: dict) -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out[key] = merge(value, extra.get(key, {}))
            elif f"{key}_lora_a" in extra:
                a, b = extra[f"{key}_lora_a"], extra[f"{key}_lora_b"]
                delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
                out[key] = (value.astype(jnp.float32) + scale * delta.reshape(value.shape)).astype(value.dtype)
            else:
                out[key] = value
        return out

    return merge(base, adapters)

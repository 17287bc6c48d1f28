"""AdamW with GLM-10B defaults, warmup + cosine decay to 10%, global-norm clipping.

Weight decay applies to matmul kernels and embedding tables, not to norm scales
and biases (docs/glm_objective.md: the GLM-10B recipe).
"""

from __future__ import annotations

import dataclasses

import jax
import optax

NO_DECAY = ("bias", "scale")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """learning_rate is the peak; warmup_steps (if set) overrides warmup_fraction."""

    learning_rate: float = 1e-4
    warmup_fraction: float = 0.04
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum_steps: int = 1

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"OptimizerConfig.learning_rate {self.learning_rate} must be positive")
        if self.grad_accum_steps < 1:
            raise ValueError(f"OptimizerConfig.grad_accum_steps {self.grad_accum_steps} must be >= 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"OptimizerConfig.min_lr_ratio {self.min_lr_ratio} must be in [0, 1]")


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to min_lr_ratio * peak at total_steps."""
    warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_fraction * total_steps)
    warmup = min(max(int(warmup), 0), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=config.learning_rate * config.min_lr_ratio)


def decay_mask(params):
    """True for parameters that get weight decay (not biases or norm scales)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) not in NO_DECAY, params)


def make_optimizer(config: OptimizerConfig, total_steps: int):
    """(optax transformation, learning-rate schedule)."""
    schedule = learning_rate_schedule(config, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=decay_mask),
    )
    return tx, schedule

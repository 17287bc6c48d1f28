"""Train state and its shardings, derived from jax.eval_shape and the logical axis names.

What trains is the whole model, or with an Adapter (LoRA, P-tuning v2, prompt tuning,
bottleneck adapters) only its adapter parameters (glm_jax.model.adapters): the state then
holds them and their optimizer moments, and the frozen base parameters travel beside it (frozen_shardings).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glm_jax.checkpoint import Checkpointer
from glm_jax.model import ModelConfig, init_params
from glm_jax.model.adapters import Adapter, init_adapters


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def check_trainable(config: ModelConfig) -> None:
    """A quantized model (glm_jax convert quantize) is for inference: its integer weights have no gradient."""
    if config.quant_bits:
        raise ValueError(f"this model's projections are INT{config.quant_bits}-quantized (ModelConfig.quant_bits), "
                         "which is for generation and evaluation only: integer weights cannot train. Train or "
                         "fine-tune the float run it was quantized from, then quantize again")


def init_trainable(config: ModelConfig, rng: jax.Array, adapter: Adapter | None = None):
    """Boxed parameters that train: the model's, or only its adapters."""
    return init_params(config, rng) if adapter is None else init_adapters(config, adapter, rng)


def abstract_boxed_params(config: ModelConfig, adapter: Adapter | None = None):
    return jax.eval_shape(lambda: init_trainable(config, jax.random.key(0), adapter))


def param_shardings(config: ModelConfig, mesh: Mesh, rules, adapter: Adapter | None = None):
    """NamedSharding of every (trained) parameter from its logical axis names and the rules table."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_boxed_params(config, adapter)), mesh, rules)


def frozen_shardings(config: ModelConfig, mesh: Mesh, rules):
    """Shardings of the frozen base parameters of an adapter run (the model's own)."""
    return param_shardings(config, mesh, rules)


def state_shardings(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rules,
                    adapter: Adapter | None = None) -> TrainState:
    """Shardings of the whole TrainState: optimizer moments follow their parameters."""
    params = param_shardings(config, mesh, rules, adapter)
    abstract = abstract_state(config, tx, adapter)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract.opt_state, params,
                                      transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params, opt_state=opt_state)


def create_state(config: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array,
                 adapter: Adapter | None = None) -> TrainState:
    params = nn.meta.unbox(init_trainable(config, rng, adapter))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_state(config: ModelConfig, tx: optax.GradientTransformation, adapter: Adapter | None = None) -> TrainState:
    """Shapes and dtypes of the TrainState, nothing allocated."""
    return jax.eval_shape(lambda: create_state(config, tx, jax.random.key(0), adapter))


def placed(abstract, shardings):
    """Abstract arrays (shapes, dtypes) with the shardings they will have: restore and compile targets."""
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def init_state(config: ModelConfig, tx, rng: jax.Array, shardings: TrainState,
               adapter: Adapter | None = None) -> TrainState:
    """The TrainState created directly in its shards (never whole on one device)."""
    return jax.jit(lambda r: create_state(config, tx, r, adapter), out_shardings=shardings)(rng)


def restore_state(checkpoints: Checkpointer, step: int, config: ModelConfig, tx: optax.GradientTransformation,
                  shardings: TrainState, adapter: Adapter | None = None) -> tuple[TrainState, dict]:
    """(TrainState placed on `shardings`, meta) of a saved step.

    A checkpoint without optimizer state (a converted or imported model) gets a fresh
    one, created directly in its shards.
    """
    targets = placed(abstract_state(config, tx, adapter), shardings)
    params, opt_state, meta = checkpoints.restore(step, targets.params, targets.opt_state)
    if opt_state is None:
        opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step_array = jax.device_put(np.asarray(meta["step"], np.int32), shardings.step)
    return TrainState(step=step_array, params=params, opt_state=opt_state), meta

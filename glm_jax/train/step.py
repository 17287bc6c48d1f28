"""The pure train step: (state, batch) -> (state, metrics).

The loss is the float32 cross-entropy summed over loss_mask and divided by the
number of masked tokens of the WHOLE batch, so gradient accumulation over
micro-batches gives exactly the gradient of one big batch. Micro-batches are a
strided split that keeps every device's share equal (glm_jax.parallel.batch).
With an Adapter (LoRA, P-tuning v2, prompt tuning, bottleneck adapters) only its
parameters train: the state holds them, the frozen base parameters come in as a third
argument (never differentiated, never donated).
The eval step is glm_jax.evaluation.make_eval_step.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from glm_jax.evaluation import loss_sums
from glm_jax.model.chunked_loss import DEFAULT_LOSS_CHUNK
from glm_jax.model import GLM, ModelConfig
from glm_jax.model.adapters import Adapter, join_adapters
from glm_jax.parallel.batch import split_micro_batches
from glm_jax.train.state import TrainState


def make_train_step(config: ModelConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    rules, grad_accum_steps: int = 1, z_loss: float = 0.0,
                    loss_chunk_length: int | None = DEFAULT_LOSS_CHUNK, adapter: Adapter | None = None,
                    seed: int = 0):
    """A pure train step; compile it with jax.jit(in_shardings, out_shardings, donate_argnums=0).

    loss_chunk_length: positions per chunk of the head + loss (None: whole logits; see loss_sums).
    adapter: train only the adapter's parameters; the step is then (state, batch, frozen base params) -> ...
    (seed: the adapters' dropout draws, folded with the step).
    """
    model = GLM(config) if adapter is None else adapter.model(config)
    dropout = adapter is not None and adapter.dropout > 0

    def objective(trained, batch, frozen, step):
        params = trained if adapter is None else join_adapters(frozen, trained)
        rngs = {"dropout": jax.random.fold_in(jax.random.key(seed), step)} if dropout else None
        return loss_sums(model, params, batch, z_loss, loss_chunk_length, rngs=rngs)

    grad_fn = jax.grad(objective, has_aux=True)

    def accumulate(params, batch, frozen, step):
        if grad_accum_steps == 1:
            return grad_fn(params, batch, frozen, step)
        micro = split_micro_batches(batch, grad_accum_steps)

        def add(carry, micro_batch):
            grads, sums = grad_fn(params, micro_batch, frozen, step)
            return jax.tree_util.tree_map(jnp.add, carry, (grads, sums)), None

        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first, frozen, step))
        (grads, sums), _ = jax.lax.scan(add, zeros, micro)
        return grads, sums

    def train_step(state: TrainState, batch: dict, frozen=None):
        with nn.logical_axis_rules(rules):
            grads, sums = accumulate(state.params, batch, frozen, state.step)
        count = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": sums["loss_sum"] / count, "accuracy": sums["correct"] / count,
                   "z_loss": sums["z_sum"] / count, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state.step), "loss_tokens": sums["count"]}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step

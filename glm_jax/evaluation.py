"""Scoring a model: the loss sums of a batch, the eval step, the eval stream, evaluate().

One definition for everything that scores a model. The train step differentiates
`loss_sums`; the training loop's periodic eval, `glm_jax.infer` and the attention
ablation all call `evaluate` over `eval_stream`, so their numbers agree exactly.
Sums (not means) are returned per batch so micro-batches and eval batches add up
to the mean over all their masked tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import numpy as np

from glm_jax.data import batch as batch_schema
from glm_jax.data.objectives import Objective
from glm_jax.data.pipeline import DataConfig, LocalBatches, make_batches
from glm_jax.data.tokenizer import Tokenizer
from glm_jax.model import GLM, ModelConfig
from glm_jax.model.chunked_loss import DEFAULT_LOSS_CHUNK, chunked_cross_entropy
from glm_jax.model.adapters import Adapter, join_adapters
from glm_jax.model.loss import cross_entropy_sums


def loss_sums(model: GLM, params, batch: dict, z_loss: float = 0.0,
              chunk_length: int | None = DEFAULT_LOSS_CHUNK, rngs: dict | None = None) -> tuple[jax.Array, dict]:
    """(loss_sum + z_sum: what the train step differentiates, the sums) of one batch.

    chunk_length: the head and loss run that many positions at a time
    (glm_jax.model.chunked_loss), never holding [B, T, vocab] logits; None
    materialises the logits (the reference the chunked loss is tested against). rngs: the
    model's random streams (LoRA dropout).
    """
    inputs = batch_schema.model_inputs(batch)
    if chunk_length is None:
        logits = model.apply({"params": params}, **inputs, rngs=rngs)
        sums = cross_entropy_sums(logits, batch["targets"], batch["loss_mask"], z_loss)
        return sums["loss_sum"] + sums["z_sum"], sums
    hidden, kernel = model.apply({"params": params}, **inputs, return_hidden=True, rngs=rngs)
    return chunked_cross_entropy(hidden, kernel, batch["targets"], batch["loss_mask"], z_loss, chunk_length)


def make_eval_step(config: ModelConfig, rules=(), loss_chunk_length: int | None = DEFAULT_LOSS_CHUNK,
                   adapter: Adapter | None = None):
    """(params, batch) -> sums of loss, correct and count over the batch (add them up across batches).

    adapter: params are the adapters and the step takes the frozen base as a third argument.
    """
    model = GLM(config) if adapter is None else adapter.for_evaluation().model(config)

    def eval_step(params, batch: dict, frozen=None):
        params = params if adapter is None else join_adapters(frozen, params)
        with nn.logical_axis_rules(rules):
            _, sums = loss_sums(model, params, batch, chunk_length=loss_chunk_length)
        return sums

    return eval_step


def eval_stream(data: DataConfig, objective: Objective, tokenizer: Tokenizer, split: str = "eval",
                process_index: int | None = None, process_count: int | None = None) -> LocalBatches:
    """The batches a run is evaluated on: its split, corrupted with seed + 1 (not the training draws)."""
    return make_batches(dataclasses.replace(data, seed=data.seed + 1), objective, split,
                        process_index=process_index, process_count=process_count, tokenizer=tokenizer)


def evaluate(eval_step: Callable, params, batches: LocalBatches, num_batches: int,
             to_device: Callable[[dict], dict] = lambda batch: batch) -> dict:
    """{'loss', 'perplexity', 'accuracy', 'tokens'} over the first num_batches batches of the stream.

    loss is the mean cross-entropy of the Part-B (loss_mask) tokens, perplexity
    exp(loss), accuracy the fraction of those tokens whose argmax is the target.
    to_device places a host batch (e.g. as global arrays on a mesh).
    """
    batches.rewind()
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for _ in range(num_batches):
        sums = jax.device_get(eval_step(params, to_device(next(batches))))
        for key in totals:
            totals[key] += float(sums[key])
    count = max(totals["count"], 1.0)
    loss = totals["loss_sum"] / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "accuracy": totals["correct"] / count,
            "tokens": int(totals["count"])}


def evaluate_model(config: ModelConfig, params, data: DataConfig, objective: Objective, tokenizer: Tokenizer,
                   num_batches: int = 8, split: str = "eval") -> dict:
    """evaluate() of one model in this process (no mesh) on a run's eval stream."""
    batches = eval_stream(data, objective, tokenizer, split, process_index=0, process_count=1)
    return evaluate(_jitted_eval_step(config), params, batches, num_batches,
                    to_device=lambda batch: {k: np.asarray(v) for k, v in batch.items()})


@functools.lru_cache(maxsize=8)
def _jitted_eval_step(config: ModelConfig) -> Callable:
    """One compiled eval step per architecture: a study scoring many runs of one layout compiles it once."""
    return jax.jit(make_eval_step(config))


def evaluate_run(run, num_batches: int = 8, split: str = "eval") -> dict:
    """evaluate_model() of a loaded run directory (glm_jax.run_dir.Run) with its own data and objective."""
    experiment = run.experiment
    return evaluate_model(run.model, run.params, experiment.data, experiment.objective, run.tokenizer,
                          num_batches, split)

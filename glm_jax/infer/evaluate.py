"""Teacher-forced evaluation: blank-infilling loss, perplexity and token accuracy.

Scores a model on the eval split with the objective it was trained with (the
same corruption, the same packing, the same seed offset the training loop's
eval uses), so numbers are comparable across runs of one experiment: the
attention ablation compares MHA, GQA and MQA models with it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from glm_jax.data.objectives import Objective
from glm_jax.data.pipeline import DataConfig, make_batches
from glm_jax.data.tokenizer import Tokenizer
from glm_jax.model import ModelConfig
from glm_jax.train.step import make_eval_step


def eval_data_config(data: DataConfig) -> DataConfig:
    """The eval stream of a run (glm_jax.train.loop evaluates with seed + 1)."""
    return dataclasses.replace(data, seed=data.seed + 1)


def evaluate(config: ModelConfig, params, data: DataConfig, objective: Objective, tokenizer: Tokenizer,
             num_batches: int = 8, split: str = "eval") -> dict:
    """{'loss', 'perplexity', 'accuracy', 'tokens'} over the first num_batches batches of a split.

    loss is the mean cross-entropy of the Part-B (loss_mask) tokens, perplexity
    exp(loss), accuracy the fraction of those tokens whose argmax is the target.
    """
    eval_step = jax.jit(make_eval_step(config, rules=()))
    batches = make_batches(eval_data_config(data), objective, split, process_index=0, process_count=1,
                           tokenizer=tokenizer)
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for _ in range(num_batches):
        sums = jax.device_get(eval_step(params, {k: np.asarray(v) for k, v in next(batches).items()}))
        for key in totals:
            totals[key] += float(sums[key])
    count = max(totals["count"], 1.0)
    loss = totals["loss_sum"] / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "accuracy": totals["correct"] / count,
            "tokens": int(totals["count"])}


def evaluate_run(run, num_batches: int = 8, split: str = "eval") -> dict:
    """evaluate() for a glm_jax.train.run.Run with the run's own data and objective."""
    return evaluate(run.config.model, run.params, run.config.data, run.config.objective, run.tokenizer,
                    num_batches, split)

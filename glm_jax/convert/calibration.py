"""Key and value activations of every layer on a calibration batch of a run's own data.

Similarity grouping, weighted and aligned merges (glm_jax/convert/head_grouping.py, head_merging.py)
compare heads by what they compute on real inputs rather than by their weights. The batch is the
run's training split drawn with seed + 2 (neither the training draws nor the eval stream, which the
ablation scores on), formatted by the run's own objective. Keys are taken before RoPE, with their
bias: the maps the merges fold into queries commute with RoPE, so aligning pre-RoPE keys aligns the
rotated ones.

Cost: one forward of `num_batches` batches with the layers unscanned, and
L x tokens x G x D x 2 (keys, values) float64 values kept: 4096 tokens of GLM-4-9B (40 layers,
2 KV heads of 128) are 0.6 GiB; of a 32-head MHA 7B model (32 layers) 2 GiB; the grouping and
merges then work on one layer at a time. Measured on this 2-core CPU for the ablation's
5.8M-parameter MHA models (4 layers, 8 KV heads of 32): 4 batches of 4 x 256 tokens (3971
real tokens, 65 MB of activations) in 12 s (6.5 s of it starting the data pipeline), then a
conversion to MQA in 0.4 s (weighted), 1.5-1.9 s (svd), 4.8-7.3 s (aligned: generalised
Procrustes on the activations), similarity grouping included.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from glm_jax.data import batch as batch_schema
from glm_jax.data.objectives import Objective
from glm_jax.data.pipeline import DataConfig, make_batches
from glm_jax.data.tokenizer import Tokenizer
from glm_jax.model import GLM, ModelConfig
from glm_jax.model.scan_layout import unscan_params

DEFAULT_TOKENS = 4096


def calibration_batches(data: DataConfig, objective: Objective, tokenizer: Tokenizer, num_batches: int = 1):
    """The first num_batches batches of the run's training split drawn with seed + 2."""
    batches = make_batches(dataclasses.replace(data, seed=data.seed + 2), objective, "train",
                           process_index=0, process_count=1, tokenizer=tokenizer)
    return [next(batches) for _ in range(num_batches)]


def kv_activations(params, config: ModelConfig, batches, max_tokens: int = DEFAULT_TOKENS
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(keys, values): per layer [N, G, D] float64 projections of the batches' real tokens (segment id > 0),
    the first max_tokens of them; keys before RoPE."""
    unscanned = config.replace(scan_layers=False)
    layer_params = unscan_params(params, config.num_layers)
    capture = jax.jit(lambda p, inputs: GLM(unscanned).apply(
        {"params": p}, **inputs, capture_intermediates=lambda module, method: module.name in ("key", "value"),
        mutable=["intermediates"])[1]["intermediates"])
    keys, values = [[] for _ in range(config.num_layers)], [[] for _ in range(config.num_layers)]
    for batch in batches:
        captured = jax.device_get(capture(layer_params, batch_schema.model_inputs(batch)))
        real = np.asarray(batch["segment_ids"]) > 0
        for i in range(config.num_layers):
            attention = captured[f"layers_{i}"]["attention"]
            keys[i].append(np.asarray(attention["key"]["__call__"][0], np.float64)[real])
            values[i].append(np.asarray(attention["value"]["__call__"][0], np.float64)[real])
    return ([np.concatenate(k)[:max_tokens] for k in keys], [np.concatenate(v)[:max_tokens] for v in values])

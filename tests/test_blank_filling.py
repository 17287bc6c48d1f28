"""A GLM trained here for 600 steps (~20 s) fills [MASK] spans of a deterministic corpus.

The corpus is counting sequences modulo K (token i+1 = token i + 1 mod K), so a
masked span is fully determined by its context: its first token follows the
token before the mask, and it ends (<eop>) right before the token after the
mask. A model that learned GLM's blank infilling recovers nearly every span; a
model that did not gets a span of length n right with chance about K^-(n+1)
(the tokens and the <eop>), under 0.3% for K = 20. We require 90% exact spans
(measured: 42 of 44). The model uses ChatGLM-6B's 2D RoPE: relative positions make
"the token before the mask" easy to attend to; with GLM's learned absolute tables
the same budget reaches 77% (it needs several times more steps).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from glm_jax.data.objectives import blank_infill
from glm_jax.infer import prompts as prompt_lib
from glm_jax.infer.generate import Generator
from glm_jax.infer.sampling import SamplingConfig
from glm_jax.model import ModelConfig, init_params
from glm_jax.train.state import TrainState
from glm_jax.train.step import make_train_step
from test_generate import SPECIALS

K, FIRST = 20, 10  # content tokens FIRST .. FIRST + K - 1
T, B, STEPS = 64, 16, 600
CONFIG = ModelConfig(vocab_size=32, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
                     max_position=T, position="rope_2d")


def counting_doc(rng):
    n = int(rng.integers(16, 40))
    body = (int(rng.integers(K)) + np.arange(n)) % K + FIRST
    return np.concatenate([[SPECIALS.cls], body]).astype(np.int32)


def training_batch(rng):
    rows = {"tokens": np.full((B, T), SPECIALS.pad, np.int32), "targets": np.full((B, T), SPECIALS.pad, np.int32),
            "loss_mask": np.zeros((B, T), np.float32), "segment_ids": np.zeros((B, T), np.int32),
            "prefix_mask": np.zeros((B, T), bool), "positions": np.zeros((B, 2, T), np.int32)}
    for b in range(B):
        example = blank_infill(counting_doc(rng), rng, SPECIALS, "token")
        n = len(example["tokens"])
        for key in ("tokens", "targets", "loss_mask"):
            rows[key][b, :n] = example[key]
        rows["positions"][b, :, :n] = example["positions"]
        rows["segment_ids"][b, :n] = 1
        rows["prefix_mask"][b, :example["sep"]] = True
    return rows


@pytest.fixture(scope="module")
def trained_params():
    tx = optax.adam(3e-3)
    params = nn.unbox(init_params(CONFIG, jax.random.key(0)))
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
    step = jax.jit(make_train_step(CONFIG, tx, optax.constant_schedule(3e-3), rules=()))
    rng = np.random.default_rng(0)
    accuracy = []
    for _ in range(STEPS):
        state, metrics = step(state, training_batch(rng))
        accuracy.append(metrics["accuracy"])
    recent = float(np.mean(jax.device_get(accuracy[-50:])))
    assert recent > 0.85, f"training did not converge: Part-B token accuracy {recent:.3f} over the last 50 steps"
    return state.params


def masked_prompt(doc, rng):
    """doc with 1-2 spans of 1-4 tokens replaced by [MASK] (at least one token between spans)."""
    n = len(doc)
    starts = sorted(rng.choice(np.arange(2, n - 6, 6), size=int(rng.integers(1, 3)), replace=False))
    spans = [(int(s), int(s) + int(rng.integers(1, 5))) for s in starts]
    pieces, cursor = [], 0
    for start, end in spans:
        pieces += [doc[cursor:start], [SPECIALS.mask]]
        cursor = end
    pieces.append(doc[cursor:])
    return np.concatenate(pieces).astype(np.int32), [doc[s:e] for s, e in spans]


def test_trained_model_fills_masked_spans(trained_params):
    rng = np.random.default_rng(123)  # other documents than training saw
    prompts, truths = zip(*(masked_prompt(counting_doc(rng), rng) for _ in range(32)))
    generator = Generator(CONFIG, trained_params, SPECIALS)
    batch = prompt_lib.make_prompt_batch(list(prompts), SPECIALS, "blank", length_bucket=T)
    out = generator.generate(batch, "blank", 16, SamplingConfig())
    right = total = 0
    for row, truth in enumerate(truths):
        spans = prompt_lib.split_spans(out["tokens"][row, :out["num_tokens"][row]], SPECIALS)
        for i, span in enumerate(truth):
            total += 1
            right += i < len(spans) and np.array_equal(spans[i], span)
    print(f"{right}/{total} spans recovered")
    assert right / total >= 0.9, f"{right}/{total} spans recovered"

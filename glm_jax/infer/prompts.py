"""Prompts -> the padded arrays the decoder compiles for.

Two modes, matching how the family is used (docs/glm_objective.md, "Generation"):
- 'blank' (GLM): the prompt is Part A, bidirectional, with [MASK] / [sMASK] /
  [gMASK] tokens in place; each mask is filled in order, decoding from <sop>
  with position id = the mask's position and block position ids 1, 2, ...
  (the positions the training objective gave Part B).
- 'causal' (ChatGLM2 / GLM-4): the prompt is causal and position ids continue
  counting.
Prompts are right-padded to a bucket length (and the mask table to a bucket
count) so prompts of different lengths in one bucket reuse one compiled program.
"""

from __future__ import annotations

import math

import numpy as np

from glm_jax.data.tokenizer import SpecialTokens

MODES = ("blank", "causal")


def prompt_batch_shapes(batch: int, prompt_length: int, mask_bucket: int = 4) -> dict:
    """{name: (shape, dtype)} of what make_prompt_batch returns (ahead-of-time compiles)."""
    return {"tokens": ((batch, prompt_length), np.int32), "positions": ((batch, 2, prompt_length), np.int32),
            "segment_ids": ((batch, prompt_length), np.int32), "prefix_mask": ((batch, prompt_length), np.bool_),
            "lengths": ((batch,), np.int32), "mask_positions": ((batch, mask_bucket), np.int32),
            "num_masks": ((batch,), np.int32)}


def bucket_length(n: int, bucket: int) -> int:
    """n rounded up to a multiple of `bucket` (at least one bucket)."""
    return max(bucket, math.ceil(n / bucket) * bucket)


def mask_ids(specials: SpecialTokens) -> tuple[int, ...]:
    return tuple(i for i in (specials.mask, specials.smask, specials.gmask) if i is not None)


def make_prompt_batch(prompts: list[np.ndarray], specials: SpecialTokens, mode: str,
                      length_bucket: int = 64, mask_bucket: int = 4) -> dict:
    """Token-id prompts -> dict of numpy arrays for glm_jax.infer.generate.

    tokens [B, P] (pad id after each prompt), positions [B, 2, P] (arange, block 0),
    segment_ids [B, P] (1 on the prompt, 0 on padding), prefix_mask [B, P] (the
    whole prompt in 'blank' mode, nothing in 'causal' mode), lengths [B],
    mask_positions [B, M] (positions of the masks in order, -1 after the last)
    and num_masks [B].
    """
    if mode not in MODES:
        raise ValueError(f"generation mode {mode!r} is unknown; use one of {MODES}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    B = len(prompts)
    P = bucket_length(max(len(p) for p in prompts), length_bucket)
    found = [np.flatnonzero(np.isin(p, mask_ids(specials))) for p in prompts]
    if mode == "blank":
        missing = [i for i, f in enumerate(found) if len(f) == 0]
        if missing:
            raise ValueError(f"prompts {missing} have no [MASK], [sMASK] or [gMASK] to fill; add one "
                             "(or append [gMASK] for open-ended generation), or use mode='causal'")
    M = bucket_length(max(len(f) for f in found) if mode == "blank" else 1, mask_bucket)

    batch = {name: np.zeros(shape, dtype) for name, (shape, dtype) in prompt_batch_shapes(B, P, M).items()}
    batch["tokens"][:] = specials.pad
    batch["lengths"][:] = [len(p) for p in prompts]
    batch["mask_positions"][:] = -1
    for row, (prompt, masks) in enumerate(zip(prompts, found)):
        n = len(prompt)
        batch["tokens"][row, :n] = prompt
        batch["positions"][row, 0, :n] = np.arange(n)
        batch["segment_ids"][row, :n] = 1
        batch["prefix_mask"][row, :n] = mode == "blank"
        if mode == "blank":
            batch["mask_positions"][row, :len(masks)] = masks
            batch["num_masks"][row] = len(masks)
    return batch


def split_spans(generated: np.ndarray, specials: SpecialTokens) -> list[np.ndarray]:
    """The generated tokens of one row (first num_tokens only) -> each span's ids (split at <eop>)."""
    spans, current = [], []
    for token in generated:
        if token in (specials.eop, specials.eos):
            spans.append(np.asarray(current, np.int32))
            current = []
            if token == specials.eos:
                break
        else:
            current.append(int(token))
    if current:
        spans.append(np.asarray(current, np.int32))  # the last span hit max_new_tokens
    return spans


def fill_in(prompt: np.ndarray, spans: list[np.ndarray], specials: SpecialTokens) -> np.ndarray:
    """Replaces the prompt's masks, in order, with the generated spans (unfilled masks stay)."""
    pieces, span_iter = [], iter(spans)
    for token in prompt:
        if token in mask_ids(specials):
            span = next(span_iter, None)
            pieces.append(np.asarray([token]) if span is None else span)
        else:
            pieces.append(np.asarray([token]))
    return np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)

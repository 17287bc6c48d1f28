"""The batch: the one definition of its fields (the batch contract of docs/design.md).

Every field is [B, T] except positions [B, 2, T] (position ids, block position
ids). The packer fills rows from it, the training loop derives its input shardings
from it (glm_jax.parallel.batch), the preflight its abstract batch, and the train and
eval steps the model's inputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    dtype: type
    model_input: bool  # an argument of GLM.__call__ (the rest feed the loss)
    leading: tuple[int, ...] = ()  # axes between the batch and the length axis

    def row_shape(self, seq_len: int) -> tuple[int, ...]:
        return (*self.leading, seq_len)


FIELDS = (
    Field("tokens", np.int32, model_input=True),
    Field("targets", np.int32, model_input=False),
    Field("loss_mask", np.float32, model_input=False),
    Field("positions", np.int32, model_input=True, leading=(2,)),
    Field("segment_ids", np.int32, model_input=True),
    Field("prefix_mask", np.bool_, model_input=True),
)
NAMES = tuple(f.name for f in FIELDS)
MODEL_INPUTS = tuple(f.name for f in FIELDS if f.model_input)


def batch_shapes(batch_size: int, seq_len: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """{field: (shape, dtype)} of a batch of batch_size rows."""
    return {f.name: ((batch_size, *f.row_shape(seq_len)), f.dtype) for f in FIELDS}


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row of padding: pad ids, zero masks, zero positions."""
    row = {f.name: np.zeros(f.row_shape(seq_len), f.dtype) for f in FIELDS}
    row["tokens"][:] = pad_id
    row["targets"][:] = pad_id
    return row


def model_inputs(batch: dict) -> dict:
    """The fields GLM.__call__ takes, by keyword."""
    return {name: batch[name] for name in MODEL_INPUTS}


def stack_rows(rows: list[dict]) -> dict[str, np.ndarray]:
    return {name: np.stack([r[name] for r in rows]) for name in NAMES}


def concatenate(parts: list[dict]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in NAMES}

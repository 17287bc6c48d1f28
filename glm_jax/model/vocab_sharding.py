"""Vocabulary-sized weights under weight-splitting parallelism: gather the weights, or share the rows.

The embedding table and the output head hold vocab x embed numbers (GLM-4: 151,552 x
4096, 2.3 GiB in float32). FSDP's usual way gathers such a weight whole on every device
that splits it, and reduces a whole-size gradient back: for these two weights that is
several GiB per chip at the step's memory peak. The other way keeps each device's slice
of the weight and shares the rows instead: the devices of the group gather the group's
token ids (embedding) or hidden rows (head) and work on their slice for all of them.

Bytes moved per step and device: gathering a weight is vocab x embed in bfloat16 (2
bytes) and reducing its float32 gradient about twice its 4 bytes (a ring all-reduce),
10 * V * E; sharing the rows is the group's tokens x embed gathered in bfloat16 and
their gradient sent back in bfloat16 (reduce-scattered for the head, all-to-all for the
embedding), 4 * tokens * E. So rows are shared while
the devices that split the weight hold at most 2.5 x vocab tokens per step (GLM-4-9B at
8k tokens on 8 chips: 1 or 4 rows per chip, 65,536 or 262,144 <= 378,880), and the
weight is gathered beyond that (a 256-chip FSDP group at 8k tokens each holds 2M
tokens). Sharing rows also keeps every vocab x embed buffer off the device, whatever the
bytes. The logical axes 'shared_batch' and 'shared_length' (the rows as the group shares
them) and 'split_vocab' (the devices the head's vocabulary is split over) come from
glm_jax.parallel.rules.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax


def mesh_axes_size(logical: str) -> int:
    """Devices the current rules and mesh split a logical axis over (1 with no mesh or no rule)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = dict(nn.get_logical_axis_rules()).get(logical)
    if mesh.empty or not axes:
        return 1
    sizes = dict(mesh.shape)
    return math.prod(sizes.get(axis, 1) for axis in ((axes,) if isinstance(axes, str) else axes))


def rows_shared_pay(batch: int, length: int, vocab: int, split_axis: str) -> bool:
    """Whether sharing the rows moves fewer bytes than gathering a [vocab, embed] weight.

    split_axis: the logical axis whose devices split the weight ('split_vocab' for the head,
    'embed' for the embedding table). True when it splits over more than one device and those
    devices hold at most 2.5 x vocab tokens (batch * length, the global shape, over the
    'shared_batch' split): 4 * tokens * E <= 10 * V * E bytes.
    """
    group = mesh_axes_size(split_axis)
    tokens_per_group = batch * length // mesh_axes_size("shared_batch")
    return group > 1 and 4 * tokens_per_group <= 10 * vocab

"""Logical-axis -> mesh-axis rules: one table per parallelism strategy.

Parameters are named with `vocab, embed, heads, kv_heads, head_dim, mlp, layers`;
activations with `activation_batch, activation_length, activation_embed,
activation_heads, activation_kv_heads, activation_mlp, activation_vocab, activation_stage`,
and, for the vocabulary-sized weights (glm_jax/model/vocab_sharding.py), `shared_batch,
shared_length, split_vocab`
(kept apart from the parameter names so FSDP can shard a weight's 'embed' axis without
sharding the activations' model dimension). Mesh axes: ('data', 'stage', 'fsdp',
'sequence', 'tensor'), outermost first: on a TPU slice the later axes get the nearest
chips, so tensor parallelism's all-reduces take the fastest links and the pipeline's
point-to-point sends the slowest. A logical name absent from a table is replicated.
Every table splits the activations' length over 'sequence' (context parallelism,
glm_jax/kernels/context_parallel.py) and the layer stack over 'stage' (pipeline
parallelism, glm_jax/model/pipeline_parallel.py); with MeshConfig.sequence = 1 and
stage = 1 (the defaults) those axes have one device and change nothing.
"""

from __future__ import annotations


MESH_AXES = ("data", "stage", "fsdp", "sequence", "tensor")

_BATCH = ("activation_batch", ("data", "fsdp"))
_LENGTH = ("activation_length", "sequence")
# Weights are split over 'sequence' too (as MaxText does): the devices that share one sequence
# would otherwise each hold a whole FSDP shard, n times the memory for the same model.
_EMBED = ("embed", ("fsdp", "sequence"))
# Pipeline stages (glm_jax/model/pipeline_parallel.py): the scanned stack's layer axis and the
# pipeline state's stage axis over 'stage'; with MeshConfig.stage = 1 nothing changes.
_STAGES = (("layers", "stage"), ("activation_stage", "stage"))
# Vocabulary-sized weights (glm_jax/model/vocab_sharding.py): the devices that split the weights
# share their rows ('shared_*': split over 'data' only) and split the head's vocabulary
# ('split_vocab': the devices that split the 'embed' axis, and 'tensor' where it splits 'vocab').
# Under data parallelism nothing splits the weights: the rows keep the activations' axes.
_SHARED_ROWS = (("shared_batch", "data"),)
_ROWS_AS_ACTIVATIONS = (("shared_batch", _BATCH[1]), ("shared_length", _LENGTH[1]))

RULES: dict[str, tuple[tuple[str, object], ...]] = {
    # Every device holds every parameter; the batch is split over all devices.
    "data_parallel": (_BATCH, _LENGTH, *_STAGES, *_ROWS_AS_ACTIVATIONS),
    # ZeRO-3 style: parameters and optimizer state split over 'fsdp' along 'embed'.
    "fsdp": (_BATCH, _LENGTH, _EMBED, *_STAGES, *_SHARED_ROWS, ("split_vocab", _EMBED[1])),
    # FSDP plus Megatron tensor parallelism over heads / mlp / vocab.
    "fsdp_tp": (
        _BATCH,
        _LENGTH,
        _EMBED,
        *_STAGES,
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("activation_heads", "tensor"),
        ("activation_kv_heads", "tensor"),
        ("activation_mlp", "tensor"),
        ("activation_vocab", "tensor"),
        *_SHARED_ROWS,
        ("split_vocab", (*_EMBED[1], "tensor")),
    ),
}


def logical_axis_rules(strategy: str = "fsdp"):
    """The rules table of a strategy: 'data_parallel', 'fsdp' or 'fsdp_tp'."""
    if strategy not in RULES:
        raise ValueError(f"sharding strategy {strategy!r} is unknown; choose one of {sorted(RULES)}")
    return RULES[strategy]

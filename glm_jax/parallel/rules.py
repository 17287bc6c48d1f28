"""Logical-axis -> mesh-axis rules: one table per parallelism strategy.

Parameters are named with `vocab, embed, heads, kv_heads, head_dim, mlp, layers`;
activations with `activation_batch, activation_length, activation_embed,
activation_heads, activation_kv_heads, activation_mlp, activation_vocab` (kept
apart from the parameter names so FSDP can shard a weight's 'embed' axis without
sharding the activations' model dimension). Mesh axes: ('data', 'fsdp', 'tensor').
A logical name absent from a table is replicated.
"""

from __future__ import annotations


MESH_AXES = ("data", "fsdp", "tensor")

_BATCH = ("activation_batch", ("data", "fsdp"))

RULES: dict[str, tuple[tuple[str, object], ...]] = {
    # Every device holds every parameter; the batch is split over all devices.
    "data_parallel": (_BATCH,),
    # ZeRO-3 style: parameters and optimizer state split over 'fsdp' along 'embed'.
    "fsdp": (_BATCH, ("embed", "fsdp")),
    # FSDP plus Megatron tensor parallelism over heads / mlp / vocab.
    "fsdp_tp": (
        _BATCH,
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("activation_heads", "tensor"),
        ("activation_kv_heads", "tensor"),
        ("activation_mlp", "tensor"),
        ("activation_vocab", "tensor"),
    ),
}


def logical_axis_rules(strategy: str = "fsdp"):
    """The rules table of a strategy: 'data_parallel', 'fsdp' or 'fsdp_tp'."""
    if strategy not in RULES:
        raise ValueError(f"sharding strategy {strategy!r} is unknown; choose one of {sorted(RULES)}")
    return RULES[strategy]

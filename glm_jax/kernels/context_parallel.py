"""Context parallelism: one sequence split over the mesh's 'sequence' axis.

Token order (load balance). With n devices on the axis, T is cut into chunks of `chunk`
tokens, taken 2n at a time; of every 2n consecutive chunks device i holds the i-th and
the (2n-1-i)-th (the "zigzag" of ring-attention implementations, repeated along the
sequence). Pairing an early chunk with its mirror balances a causal row exactly; repeating
the pattern every 2n chunks also balances GLM's rows, whose bidirectional Part A can cover
most of a document ([gMASK]). Key blocks visited per device (`work_per_device`, the flash
loops' work) at T = 4096 over 4 devices, max / min:

    rows                                   contiguous   one zigzag (chunk 512)   chunk 128
    causal                                 6.65         1.00                     1.00
    Part A of 1500 and 3000 tokens         1.59         1.21                     1.01
    packed (<= 6 segments, random Part A)  2.85         1.21                     1.05

(tests/test_context_parallel.py holds all three to 10% of equal.)
Everything but attention is per token, so the model runs on the reordered tokens
unchanged: positions (GLM's 2D positions included) travel with the tokens in the batch
and the loss is a sum over tokens. `to_context_order` reorders a batch,
`from_context_order` undoes it.

Attention. Each device all-gathers K and V and the keys' segment ids and prefix flags
over the axis, puts them back in sequence order, and attends its queries, whose
sequence positions are increasing, against the whole sequence with the ordinary kernel
(Pallas flash on GPU/TPU, blockwise or dense XLA on CPU) given those positions, so GLM's
per-example prefix and segment masks and the kernel's block skipping from key ranges
(kernels/masks.py) are exactly those of the unsplit sequence. The all-gather's
transpose, a reduce-scatter of dK and dV, is the backward's only communication.

Why all-gather and not a ring (KV blocks passed round with collective permutes): the
GLM family's long-context models group their KV heads (ChatGLM2/3: 2 KV heads for 32
query heads, GLM-4: 2), so the gathered K and V of a layer are small next to the queries
and activations: GLM-4-9B at 128k tokens holds 128k x 2 heads x 128 x 2 (K, V) x 2 bytes =
128 MiB per layer, gathered once per layer and freed after it. A ring moves the same
bytes in n steps and needs each step's mask and block skipping re-derived for a rotating
key window; the gather keeps one kernel call per device and lets XLA overlap the
collective with the projections. Llama 3's context parallelism chose all-gather for the
same reasons (GQA, arbitrary masks). For MHA at very long T a ring holds less (K/V of one
shard at a time).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from glm_jax.kernels.attention import attention, resolve_impl

SEQUENCE_AXIS = "sequence"
BATCH_AXES = ("data", "fsdp")
# Tokens per chunk of the layout: two flash query blocks of 64 (one of 128 on TPU), so a
# kernel block never straddles two chunks, and small enough to spread every device over
# the whole sequence.
DEFAULT_CHUNK = 128


def sequence_shards(mesh) -> int:
    """Devices one sequence is split over: the mesh's 'sequence' axis (1 without one, or no mesh)."""
    return 1 if mesh.empty else dict(mesh.shape).get(SEQUENCE_AXIS, 1)


def layout_chunk(seq_len: int, shards: int, chunk: int = DEFAULT_CHUNK) -> int:
    """The chunk length the layout uses: `chunk`, or T / 2n when the sequence is shorter than 2n chunks."""
    if shards < 1:
        raise ValueError(f"MeshConfig.sequence = {shards}: the sequence axis needs at least 1 device")
    if seq_len % (2 * shards):
        raise ValueError(f"DataConfig.seq_len = {seq_len} does not split into 2 x {shards} equal chunks for "
                         f"MeshConfig.sequence = {shards} (each device holds chunks from both ends, for load "
                         f"balance); use a seq_len that is a multiple of {2 * shards}")
    chunk = min(chunk, seq_len // (2 * shards))
    if seq_len % (2 * shards * chunk):
        raise ValueError(f"DataConfig.seq_len = {seq_len} is not a whole number of {2 * shards} chunks of {chunk} "
                         f"tokens (MeshConfig.sequence = {shards}); use a multiple of {2 * shards * chunk}")
    return chunk


def check_sequence_split(seq_len: int, shards: int, block: int = 1, chunk: int = DEFAULT_CHUNK) -> int:
    """layout_chunk, also checking that the chunks are whole attention blocks (`block` query rows)."""
    chunk = layout_chunk(seq_len, shards, chunk)
    if chunk % block:
        raise ValueError(f"DataConfig.seq_len = {seq_len} over MeshConfig.sequence = {shards} gives chunks of "
                         f"{chunk} tokens, not a multiple of the attention block {block}; use a seq_len that is "
                         f"a multiple of {2 * shards * block}")
    return chunk


@functools.lru_cache(maxsize=32)
def context_order(seq_len: int, shards: int, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """[n, T / n] sequence positions of each device's tokens, increasing along each row."""
    chunk = layout_chunk(seq_len, shards, chunk)
    groups = seq_len // (2 * shards * chunk)
    starts = [[(g * 2 * shards + c) * chunk for g in range(groups) for c in (i, 2 * shards - 1 - i)]
              for i in range(shards)]
    order = np.asarray([np.concatenate([np.arange(s, s + chunk) for s in row]) for row in starts], np.int32)
    order.setflags(write=False)
    return order


@functools.lru_cache(maxsize=32)
def _inverse_order(seq_len: int, shards: int, chunk: int) -> np.ndarray:
    """Slot of each sequence position in the layout (from_context_order runs at every layer's trace)."""
    inverse = np.argsort(context_order(seq_len, shards, chunk).ravel()).astype(np.int32)
    inverse.setflags(write=False)
    return inverse


def to_context_order(x, shards: int, axis: int = 1, chunk: int = DEFAULT_CHUNK):
    """Reorders the sequence axis of a numpy or jax array (or a dict of them): device 0's tokens, then
    device 1's, ..., so an even split of that axis over the 'sequence' mesh axis is the layout."""
    if isinstance(x, dict):
        return {k: to_context_order(v, shards, axis, chunk) for k, v in x.items()}
    order = context_order(x.shape[axis], shards, chunk).ravel()
    return np.take(x, order, axis=axis) if isinstance(x, np.ndarray) else jnp.take(x, order, axis=axis)


def from_context_order(x, shards: int, axis: int = 1, chunk: int = DEFAULT_CHUNK):
    """Inverse of to_context_order: back in sequence order."""
    if isinstance(x, dict):
        return {k: from_context_order(v, shards, axis, chunk) for k, v in x.items()}
    inverse = _inverse_order(x.shape[axis], shards, chunk)
    return np.take(x, inverse, axis=axis) if isinstance(x, np.ndarray) else jnp.take(x, inverse, axis=axis)


def local_attention(q, k, v, segment_ids, prefix_mask, *, axis_name: str, shards: int, chunk: int, impl: str,
                    scale: float | None):
    """One device's part, inside shard_map over `axis_name`: q, k, v [B, T/n, H, D] and the ids
    [B, T/n] are this device's tokens (context_order); returns its queries' outputs [B, T/n, Hq, D]."""
    T = q.shape[1] * shards

    def gather(x):  # every device's tokens, then back in sequence order
        return from_context_order(jax.lax.all_gather(x, axis_name, axis=1, tiled=True), shards, chunk=chunk)

    keys, values, key_segments = gather(k), gather(v), gather(segment_ids)
    key_prefix = gather(prefix_mask.astype(jnp.int8)).astype(bool)
    positions = jnp.asarray(context_order(T, shards, chunk))[jax.lax.axis_index(axis_name)]
    return attention(q, keys, values, key_segments, key_prefix, impl=impl, scale=scale, q_offset=positions)


def context_parallel_attention(q, k, v, segment_ids, prefix_mask, *, mesh=None, impl: str = "auto",
                               scale: float | None = None, chunk: int = DEFAULT_CHUNK):
    """kernels.attention for arrays in context order (to_context_order) whose sequence axis is split
    over the mesh's 'sequence' axis (rows over 'data'/'fsdp', heads over 'tensor' where the mesh
    has them).

    q [B, T, Hq, D]; k, v [B, T, Hkv, D]; segment_ids, prefix_mask [B, T]. Equal to
    kernels.attention of the same arrays in sequence order, reordered. mesh: default the
    mesh of the surrounding jit (jax.sharding.use_mesh / set_mesh).
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    shards = sequence_shards(mesh)
    T, Hq, Hkv = q.shape[1], q.shape[2], k.shape[2]
    chunk = layout_chunk(T, shards, chunk)
    rows = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names) or None
    query_heads, kv_heads = _head_axes(mesh, Hq, Hkv)
    token = PartitionSpec(rows, SEQUENCE_AXIS)
    query = PartitionSpec(rows, SEQUENCE_AXIS, query_heads, None)
    key = PartitionSpec(rows, SEQUENCE_AXIS, kv_heads, None)
    body = functools.partial(local_attention, axis_name=SEQUENCE_AXIS, shards=shards, chunk=chunk,
                             impl=resolve_impl(impl, kv_len=T), scale=scale)
    return jax.shard_map(body, mesh=mesh, in_specs=(query, key, key, token, token), out_specs=query,
                         check_vma=False)(q, k, v, segment_ids, prefix_mask)


def _head_axes(mesh, query_heads: int, kv_heads: int):
    """How the query and KV heads lie over 'tensor': both split, or (MQA) queries split and the one
    KV head on every device; (None, None) when the mesh has no tensor split."""
    size = dict(mesh.shape).get("tensor", 1)
    if size == 1:
        return None, None
    if query_heads % size or (kv_heads % size and kv_heads != 1):
        raise ValueError(f"context parallelism splits heads over MeshConfig.tensor = {size}, which must divide "
                         f"the {query_heads} query heads and the {kv_heads} KV heads (or there is one KV head); "
                         "use a tensor size dividing ModelConfig.num_kv_heads, or tensor = 1")
    return "tensor", (None if kv_heads % size else "tensor")


def work_per_device(segment_ids, prefix_mask, shards: int, chunk: int | None = DEFAULT_CHUNK,
                    block_q: int = 64, block_k: int = 64) -> np.ndarray:
    """Key blocks the forward visits for each device's queries, summed over the batch: [shards].

    segment_ids, prefix_mask: [B, T] in sequence order. chunk=None counts the contiguous split
    (device i holds tokens [i T/n, (i+1) T/n)), for comparison.
    """
    from glm_jax.kernels.blocks import visited_blocks

    T = segment_ids.shape[1]
    if chunk is None:
        positions = np.arange(T, dtype=np.int32).reshape(shards, -1)
    else:
        positions = context_order(T, shards, check_sequence_split(T, shards, block_q, chunk))
    return np.asarray([int(visited_blocks(segment_ids, prefix_mask, block_q, block_k, q_len=T // shards,
                                          q_offset=jnp.asarray(row)).sum()) for row in positions])

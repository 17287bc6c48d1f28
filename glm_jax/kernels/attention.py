"""Attention dispatch and the XLA reference implementation of GLM's mask.

`attention(q, k, v, segment_ids, prefix_mask, impl=...)` is the one entry point
the model calls. The XLA path is the reference every kernel is tested against:
scores in the compute dtype, softmax in float32, GQA by grouping query heads per
KV head (query head h uses KV head h // (Hq // Hkv)) so K/V are never repeated.
The kernels are the Pallas flash kernels (GPU, TPU) and, on CPU for long sequences,
the same algorithm in plain XLA (blockwise_attention.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from glm_jax.kernels import masks
from glm_jax.kernels.blockwise_attention import blockwise_attention

IMPLS = ("auto", "xla", "blockwise", "pallas", "pallas_interpret")


# On CPU, 'auto' runs the blockwise path from this many keys on. Below it the [T, T] arrays are
# small and the dense reference compiles faster (the blockwise loops added about 30% to the
# compile-bound model tests' time, whose sequences are shorter). At 512 keys blockwise already
# wins: the 59M train step (B 8, T 512, experiments/benchmarks/train_step.py) ran 1.45x faster
# with it on a 2-core CPU, where XLA:CPU fused the dense softmax backward with its [T, T]
# matmul into one slow library call (146 ms per layer); attention alone had measured 1.06x on
# another session's machine.
BLOCKWISE_MIN_KEYS = 512


def resolve_impl(impl: str, backend: str | None = None, kv_len: int | None = None) -> str:
    """'auto' -> the implementation to use on `backend` (default: jax's default backend) for kv_len keys.

    'auto' is the Pallas kernel on GPU (Triton) and TPU (Mosaic); on CPU, where the
    kernel only runs in interpret mode, it is the XLA blockwise path from
    BLOCKWISE_MIN_KEYS keys on and the dense XLA reference below. 'pallas' on CPU runs
    the interpret mode, and 'pallas_interpret' forces it anywhere.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is unknown; use one of {IMPLS}")
    if impl == "auto":
        backend = backend or jax.default_backend()
        if backend in ("gpu", "tpu"):
            return "pallas"
        return "blockwise" if kv_len is not None and kv_len >= BLOCKWISE_MIN_KEYS else "xla"
    return impl


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
              segment_ids: jnp.ndarray, prefix_mask: jnp.ndarray, *,
              impl: str = "auto", scale: float | None = None, q_offset: int | None = None,
              return_lse: bool = False, lambda_shape: masks.LambdaShape | None = None,
              context_windows: jnp.ndarray | None = None):
    """GLM attention.

    Args:
      q: [B, T, Hq, D] queries.
      k, v: [B, S, Hkv, D] keys and values, S >= T, Hq % Hkv == 0.
      segment_ids: [B, S] int, 1.. per packed example, 0 for padding (of the keys).
      prefix_mask: [B, S] bool, True on each segment's bidirectional prefix.
      impl: 'auto' | 'xla' | 'blockwise' | 'pallas' | 'pallas_interpret' (see resolve_impl).
      scale: softmax scale, default 1/sqrt(D).
      q_offset: query t is key position q_offset + t; default S - T (the last T
        positions, e.g. one chunk of a long prefill against all keys up to it).
        With T == S the rule is docs/design.md's; otherwise each query gets its row of
        the full S x S mask. May be traced, or a [T] int32 array of the queries'
        increasing key positions (a device's chunks under context parallelism,
        glm_jax/kernels/context_parallel.py).
      return_lse: also return each query's float32 log-sum-exp of its allowed scores,
        [B, T, Hq], differentiable (every implementation): what merges these keys with
        other keys, e.g. P-tuning v2's learned prefix (kernels/learned_prefix.py).
      lambda_shape: LM-Infinite's Λ-shaped mask on top of GLM's rule (masks.LambdaShape: the
        segment's first `sink` keys and the `window` keys behind each query).
      context_windows: [B, S] int, parallel context windows (masks.mask_options_dense): window
        tokens see their own window, task tokens (id 0) every window of their segment.
        With either option the kernels run the parts of masks.range_parts (each one range per
        query and per key, so their block skipping holds) and merge them by log-sum-exp.
    Returns:
      [B, T, Hq, D] in q's dtype (and the log-sum-exp with return_lse).
    """
    _check_shapes(q, k, v, segment_ids, prefix_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    impl = resolve_impl(impl, kv_len=k.shape[1])
    options = dict(lambda_shape=lambda_shape, context_windows=context_windows)
    if impl == "xla":
        return xla_attention(q, k, v, segment_ids, prefix_mask, scale=scale, q_offset=q_offset,
                             return_lse=return_lse, **options)
    kernel = functools.partial(_kernel(impl), q, k, v, segment_ids, prefix_mask, scale=scale, q_offset=q_offset)
    if lambda_shape is None and context_windows is None:
        return kernel(return_lse=return_lse)
    parts = [kernel(return_lse=True, ranges=part) for part in masks.range_parts(segment_ids, prefix_mask, **options)]
    out, lse = merge_parts(parts)
    return (out.astype(q.dtype), lse) if return_lse else out.astype(q.dtype)


def _kernel(impl: str):
    """The blockwise implementation `impl` names, for this backend (its keyword arguments: scale,
    q_offset, return_lse, ranges)."""
    if impl == "blockwise":
        return blockwise_attention
    backend = jax.default_backend()
    if backend == "tpu" and impl == "pallas":
        from glm_jax.kernels.flash_attention_tpu import flash_attention_tpu  # Mosaic only when asked for

        return flash_attention_tpu
    from glm_jax.kernels.flash_attention import flash_attention  # Pallas only when asked for

    if impl == "pallas_interpret" or backend != "gpu":
        return functools.partial(flash_attention, interpret=True)
    from jax.experimental.pallas import triton as pallas_triton

    return functools.partial(flash_attention, compiler_params=pallas_triton.CompilerParams(num_warps=4, num_stages=2))


def merge_parts(parts):
    """Attention over the union of disjoint key sets from each set's (out, lse): exact, float32.

    A query that sees nothing in a part has that part's output 0 and log-sum-exp ~MASK_VALUE,
    which weighs it out. Returns (out, lse)."""
    total = jax.nn.logsumexp(jnp.stack([lse for _, lse in parts]), axis=0)
    out = sum(jnp.exp(lse - total)[..., None] * out.astype(jnp.float32) for out, lse in parts)
    return out, total


def xla_attention(q, k, v, segment_ids, prefix_mask, *, scale, q_offset: int | None = None,
                  return_lse: bool = False, lambda_shape: masks.LambdaShape | None = None, context_windows=None):
    """Dense reference: O(T S) scores, float32 softmax, grouped (never repeated) K/V.

    segment_ids, prefix_mask: [B, S] of the keys; query t is key position q_offset + t
    (default S - T). lambda_shape, context_windows: the options of `attention`, applied to the
    dense mask (masks.mask_options_dense).
    """
    T = q.shape[1]
    q_offset = masks.check_query_window(T, k.shape[1], q_offset)
    allowed = masks.dense_mask(segment_ids, prefix_mask, q_len=T, q_offset=q_offset)
    if lambda_shape is not None or context_windows is not None:
        q_index = masks.query_positions(T, k.shape[1], q_offset)
        allowed = masks.mask_options_dense(allowed, segment_ids, q_index, lambda_shape, context_windows)
    return masked_attention(q, k, v, allowed, scale=scale, return_lse=return_lse)


def masked_attention(q, k, v, allowed, *, scale, return_lse: bool = False):
    """Attention of q [B, T, Hq, D] over k, v [B, S, Hkv, D] under a [B, T, S] bool mask.

    The dense reference under any mask (xla_attention passes GLM's rule);
    KV-cache decoding uses cached_attention, which reads the cache in its layout.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    group = Hq // Hkv
    # [B, T, Hkv, group, D]: the query heads of one KV head are contiguous.
    grouped_q = q.reshape(B, T, Hkv, group, D)
    scores = jnp.einsum("btgrd,bsgd->bgrts", grouped_q, k) * jnp.asarray(scale, q.dtype)
    scores = scores.astype(jnp.float32)
    scores = jnp.where(allowed[:, None, None, :, :], scores, masks.MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs, v).reshape(B, T, Hq, D)
    if not return_lse:
        return out
    lse = jax.nn.logsumexp(scores, axis=-1)  # [B, Hkv, group, T]
    return out, lse.transpose(0, 3, 1, 2).reshape(B, T, Hq)


def cached_attention(q, keys, values, allowed, *, scale: float | None = None):
    """Attention of T new queries [B, T, Hq, D] over a KV cache kept in parts.

    keys: tuple of [B, Hkv, D, S_i] buffers; values: the matching [B, Hkv, S_i, D]
    buffers (e.g. the context and the generated tokens); allowed: [B, T, sum S_i],
    the parts' slots in order. The decode path: T is 1 (or a few) and the cost is
    reading the cache. Each KV head is read once for its whole query group: the
    group's r * T queries are the rows of two matmuls batched over (B, Hkv),
    [r T, D] x [D, S] for the scores and [r T, S] x [S, D] for the values, so
    each reads the cache in its stored order with the long slot axis as the
    streamed dimension, and the scores come out [r T, S], the softmax's layout,
    with no transpose between the two. Measured at 8k slots, batch 8 (2-core
    CPU): MQA and GQA-4 21% and 22% faster per layer than keys [S, D] and values
    [D, S] with the queries as columns (MHA alike). Scores and softmax in float32.

    The softmax spans the parts without joining them: one maximum over them all, each
    part's exponentials summed and multiplied into its values, the sum divided
    out once at the end. Concatenating the scores and slicing the weights back
    apart copied every score twice per layer, a cost equal for MHA, GQA and MQA.
    """
    B, T, Hq, D = q.shape
    Hkv = keys[0].shape[1]
    r = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    # [B, Hkv, r * T, D]: the queries of one KV head (its group, every new token) together.
    grouped_q = q.reshape(B, T, Hkv, r, D).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, r * T, D)
    grouped_q = grouped_q.astype(keys[0].dtype)
    scores, start = [], 0
    for k in keys:
        slots = k.shape[-1]
        part = jnp.einsum("bgqd,bgds->bgqs", grouped_q, k, preferred_element_type=jnp.float32) * scale
        visible = jnp.broadcast_to(allowed[:, None, None, :, start:start + slots], (B, 1, r, T, slots))
        scores.append(jnp.where(visible.reshape(B, 1, r * T, slots), part, masks.MASK_VALUE))
        start += slots
    top = functools.reduce(jnp.maximum, [part.max(axis=-1, keepdims=True) for part in scores])
    weights = [jnp.exp(part - top) for part in scores]
    total = sum(w.sum(axis=-1, keepdims=True) for w in weights)
    out = sum(jnp.einsum("bgqs,bgsd->bgqd", w.astype(v.dtype), v, preferred_element_type=jnp.float32)
              for w, v in zip(weights, values)) / total
    # [B, Hkv, r * T, D] -> [B, T, Hq, D]
    return out.reshape(B, Hkv, r, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, Hq, D).astype(q.dtype)


def _check_shapes(q, k, v, segment_ids, prefix_mask):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"attention expects q [B,T,Hq,D] and k, v [B,S,Hkv,D] of equal "
                         f"shape; got q {q.shape}, k {k.shape}, v {v.shape}")
    B, T, Hq, D = q.shape
    S = k.shape[1]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if Hq % k.shape[2]:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {k.shape[2]}")
    if segment_ids.shape != (B, S) or prefix_mask.shape != (B, S):
        raise ValueError(f"segment_ids {segment_ids.shape} and prefix_mask {prefix_mask.shape} describe "
                         f"the keys and must both be [B, S] = {(B, S)}")

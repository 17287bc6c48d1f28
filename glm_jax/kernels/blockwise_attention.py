"""Blockwise attention for GLM masks in plain XLA: the flash algorithm without Pallas.

The CPU path of `attention(impl='auto')` and a fallback for any backend. It runs
the same algorithm as flash_attention.py (online softmax over key blocks, a
FlashAttention-2 backward that recomputes the probabilities from the saved
log-sum-exp) with jax.lax loops instead of a kernel grid: every loop step is one
batched matmul over (batch, KV head, group) of a query block against a key block.

Skipping: every query row's allowed keys are one range (kernels/masks.py), so a
query block visits only key blocks [first, last) of the union of its rows' ranges
over the batch, and the blocks every row sees whole run without a mask
(`visit_ranges`); the backward's loop over the query blocks that can see a key
block is bounded the same way. Nothing [T, S]-sized is ever formed: activation
memory is O(T) per head (the output and its log-sum-exp) instead of the dense
reference's O(T S) probabilities, which under scanned layers are kept for every
layer.

On a 2-core CPU (experiments/benchmarks/attention.py --blockwise, 8 heads of 64, one
prefix per row) its forward is 1.6x (T = 512) to 2.7-3.3x (T = 4096) faster than the dense
reference and forward + backward 1.06-1.55x (T = 512) to 1.6-3.6x (by session), while the
dense path's [T, T] arrays grow quadratically; `attention(impl='auto')` takes it on CPU from BLOCKWISE_MIN_KEYS keys.
GQA/MQA read each KV head once for its group's query heads (no repeat).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from glm_jax.kernels.blocks import padded_inputs, three_loops, visit_ranges
from glm_jax.kernels.masks import MASK_VALUE

# 64 x 64 blocks: on XLA:CPU faster than 128 and 256 at T = 512 and 2048 (forward + backward);
# 32 x 32 was within this machine's noise of 64 x 64 at T = 512.
DEFAULT_BLOCK = 64


def blockwise_attention(q, k, v, segment_ids, prefix_mask, *, scale: float, q_offset: int | None = None,
                        block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK, return_lse: bool = False,
                        ranges=None):
    """GLM attention, q [B, T, Hq, D] over k, v [B, S, Hkv, D]; the contract of kernels.attention
    (return_lse: also the float32 log-sum-exp of each query's scores, [B, T, Hq], differentiable;
    ranges: one part of masks.range_parts instead of GLM's rule, where a query may see nothing:
    its output is 0 and its log-sum-exp about MASK_VALUE)."""
    T, D = q.shape[1], q.shape[3]
    block_q, block_k = min(block_q, _round_up(T, 8)), min(block_k, _round_up(k.shape[1], 8))
    q, k, v, (ks, ke, qs, qe) = padded_inputs(q, k, v, segment_ids, prefix_mask, q_offset, block_q, block_k, D,
                                              ranges)
    B, padded_q, Hq, _ = q.shape
    Hkv = k.shape[2]
    # Heads before length, the query heads of one KV head together: [B, Hkv, r, T, D] and [B, Hkv, S, D].
    grouped_q = q.reshape(B, padded_q, Hkv, Hq // Hkv, D).transpose(0, 2, 3, 1, 4)
    k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))
    out, lse = _attention(float(scale), block_q, block_k, grouped_q, k, v, ks, ke, qs, qe)
    out = out.transpose(0, 3, 1, 2, 4).reshape(B, padded_q, Hq, D)[:, :T]
    if not return_lse:
        return out
    return out, lse.transpose(0, 3, 1, 2).reshape(B, padded_q, Hq)[:, :T]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _allowed(rows_start, rows_end, first_col, width: int):
    """[B, rows, width] bool: column first_col + c lies in the row's range."""
    cols = first_col + jnp.arange(width, dtype=jnp.int32)
    return (cols >= rows_start[..., None]) & (cols < rows_end[..., None])


def _blocks(x, axis: int, size: int):
    """Split `axis` into blocks and move the block index first: [n, ...] for lax.scan / lax.map."""
    shape = x.shape[:axis] + (x.shape[axis] // size, size) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _slice(x, start, size: int, axis: int):
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _scores(q, k, scale):
    """[B, g, r, bq, D] x [B, g, bk, D] -> float32 [B, g, r, bq, bk]."""
    return jnp.einsum("bgrtd,bgsd->bgrts", q, k, preferred_element_type=jnp.float32) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(scale, block_q, block_k, q, k, v, ks, ke, qs, qe):
    """(output, log-sum-exp); the log-sum-exp is an output so a learned prefix can be merged in."""
    return _forward(scale, block_q, block_k, q, k, v, ks, ke)


def _forward(scale, block_q, block_k, q, k, v, ks, ke):
    """Output [B, g, r, T, D] and log-sum-exp [B, g, r, T] (float32), query block by query block."""
    def query_block(inputs):
        q_block, row_start, row_end = inputs  # [B, g, r, bq, D], [B, bq], [B, bq]

        def visit(j, carry, masked: bool):
            out, row_max, total = carry
            k_block, v_block = _slice(k, j * block_k, block_k, 2), _slice(v, j * block_k, block_k, 2)
            s = _scores(q_block, k_block, scale)
            if masked:
                allowed = _allowed(row_start, row_end, j * block_k, block_k)[:, None, None]
                s = jnp.where(allowed, s, MASK_VALUE)
            new_max = jnp.maximum(row_max, s.max(axis=-1))
            p = jnp.exp(s - new_max[..., None])
            if masked:
                p = jnp.where(allowed, p, 0.0)
            correction = jnp.exp(row_max - new_max)
            total = correction * total + p.sum(axis=-1)
            out = correction[..., None] * out + jnp.einsum("bgrts,bgsd->bgrtd", p.astype(v.dtype), v_block,
                                                           preferred_element_type=jnp.float32)
            return out, new_max, total

        # *_like keeps the inputs' sharding (under explicit mesh axes the loop carries must match it).
        rows = q_block[..., 0]
        carry = (jnp.zeros_like(q_block, jnp.float32), jnp.full_like(rows, MASK_VALUE, jnp.float32),
                 jnp.zeros_like(rows, jnp.float32))
        out, row_max, total = three_loops(visit, visit_ranges(row_start.ravel(), row_end.ravel(), block_k), carry)
        # A row that sees nothing (a part of masks.range_parts) has total 0: output 0, log-sum-exp ~MASK_VALUE.
        total = jnp.maximum(total, 1e-30)
        return (out / total[..., None]).astype(q_block.dtype), row_max + jnp.log(total)

    out, lse = lax.map(query_block, (_blocks(q, 3, block_q), _blocks(ks, 1, block_q), _blocks(ke, 1, block_q)))
    # [nq, B, g, r, bq, ...] -> [B, g, r, T, ...]
    return _unblock(out, 3), _unblock(lse, 3)


def _unblock(x, axis: int):
    """Inverse of _blocks: [n, ..., size, ...] with `axis` the original (now block-sized) axis."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _attention_fwd(scale, block_q, block_k, q, k, v, ks, ke, qs, qe):
    out, lse = _forward(scale, block_q, block_k, q, k, v, ks, ke)
    return (out, lse), (q, k, v, ks, ke, qs, qe, out, lse)


def _attention_bwd(scale, block_q, block_k, residuals, cotangents):
    """FlashAttention-2 backward: key block by key block (dK, dV), dQ accumulated in place.

    d lse / d s = p, so a log-sum-exp cotangent only shifts delta: dS = p (dP - (delta - d_lse)).
    """
    q, k, v, ks, ke, qs, qe, out, lse = residuals
    d_out, d_lse = cotangents
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse  # [B, g, r, T]

    def key_block(d_q, inputs):
        j, k_block, v_block, col_start, col_end = inputs  # [B, g, bk, D] x 2, [B, bk] x 2

        def visit(i, carry, masked: bool):
            d_q, d_k, d_v = carry
            q_block, do_block = _slice(q, i * block_q, block_q, 3), _slice(d_out, i * block_q, block_q, 3)
            lse_block, delta_block = _slice(lse, i * block_q, block_q, 3), _slice(delta, i * block_q, block_q, 3)
            p = jnp.exp(_scores(q_block, k_block, scale) - lse_block[..., None])
            if masked:
                row_start, row_end = _slice(ks, i * block_q, block_q, 1), _slice(ke, i * block_q, block_q, 1)
                p = jnp.where(_allowed(row_start, row_end, j * block_k, block_k)[:, None, None], p, 0.0)
            d_v = d_v + jnp.einsum("bgrts,bgrtd->bgsd", p.astype(do_block.dtype), do_block,
                                   preferred_element_type=jnp.float32)
            d_p = jnp.einsum("bgrtd,bgsd->bgrts", do_block, v_block, preferred_element_type=jnp.float32)
            d_s = (p * (d_p - delta_block[..., None]) * scale).astype(q.dtype)
            d_k = d_k + jnp.einsum("bgrts,bgrtd->bgsd", d_s, q_block, preferred_element_type=jnp.float32)
            d_q_block = jnp.einsum("bgrts,bgsd->bgrtd", d_s, k_block, preferred_element_type=jnp.float32)
            d_q = lax.dynamic_update_slice_in_dim(d_q, _slice(d_q, i * block_q, block_q, 3) + d_q_block,
                                                  i * block_q, axis=3)
            return d_q, d_k, d_v

        zeros = jnp.zeros_like(k_block, jnp.float32)
        d_q, d_k, d_v = three_loops(visit, visit_ranges(col_start.ravel(), col_end.ravel(), block_q),
                               (d_q, zeros, zeros))
        return d_q, (d_k, d_v)

    blocks = k.shape[2] // block_k
    inputs = (jnp.arange(blocks), _blocks(k, 2, block_k), _blocks(v, 2, block_k),
              _blocks(qs, 1, block_k), _blocks(qe, 1, block_k))
    d_q, (d_k, d_v) = lax.scan(key_block, jnp.zeros_like(q, jnp.float32), inputs)
    return (d_q.astype(q.dtype), _unblock(d_k, 2).astype(k.dtype), _unblock(d_v, 2).astype(v.dtype),
            None, None, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)

"""Blockwise (flash) attention for GLM masks in Pallas: forward and FlashAttention-2 backward.

The mask of every query row is one key range [k_start, k_end) (kernels/masks.py),
so a query block visits only key blocks [min k_start // bk, ceil(max k_end / bk))
and hidden blocks are never touched; the dK/dV pass visits only the query blocks
that can see its keys ([min q_start // bq, ceil(max q_end / bq))). Inside that
range, the blocks [ceil(max k_start / bk), floor(min k_end / bk)) are visible to
every row and run without building or applying a mask (`visit_ranges`). Query head h
reads KV head h // (Hq // Hkv) through the BlockSpec index map, so K/V are never
repeated, and dK/dV sum over the group's query heads in float32 inside one program.

Reads top-down: the kernels, their pallas_call wrappers, the custom_vjp.
`glm_jax.kernels.attention.xla_attention` is the reference the tests compare with.
This generic (pointer-style) kernel runs in interpret mode on CPU and lowers through
Triton on GPU; flash_attention_tpu.py is the same algorithm for Mosaic (TPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from glm_jax.kernels.blocks import padded_inputs, three_loops, visit_ranges
from glm_jax.kernels.masks import MASK_VALUE


def _dot(a, b, contract_a: int, contract_b: int):
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def _allowed(rows_start, rows_end, first_col: int, width: int):
    cols = first_col + lax.broadcasted_iota(jnp.int32, (rows_start.shape[0], width), 1)
    return (cols >= rows_start[:, None]) & (cols < rows_end[:, None])


# ----------------------------------------------------------------------------- forward
def _query_block_specs(block_q: int, S: int, D: int, group: int) -> list:
    """Grid (b, h, i): q block i of head h, all of KV head h // group, row key ranges."""
    return [
        pl.BlockSpec((None, block_q, None, D), lambda b, h, i: (b, i, h, 0)),
        pl.BlockSpec((None, S, None, D), lambda b, h, i: (b, 0, h // group, 0)),
        pl.BlockSpec((None, S, None, D), lambda b, h, i: (b, 0, h // group, 0)),
        pl.BlockSpec((None, block_q), lambda b, h, i: (b, i)),
        pl.BlockSpec((None, block_q), lambda b, h, i: (b, i)),
    ]


def _forward_kernel(q_ref, k_ref, v_ref, ks_ref, ke_ref, o_ref, lse_ref, *visits_refs, scale: float, block_k: int):
    q = q_ref[...]
    ks, ke = ks_ref[...], ke_ref[...]
    block_q, head_dim = q.shape

    def visit(j, carry, masked: bool):
        o, m, l, *visits = carry
        start = j * block_k
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = _dot(q, k, 1, 1) * scale
        if masked:
            allowed = _allowed(ks, ke, start, block_k)
            s = jnp.where(allowed, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp(s - m_new[:, None])
        if masked:
            p = jnp.where(allowed, p, 0.0)
        correction = jnp.exp(m - m_new)
        l = correction * l + p.sum(axis=1)
        o = correction[:, None] * o + _dot(p.astype(v.dtype), v, 1, 0)
        if visits:  # count_forward_visits: (masked, unmasked) blocks this loop body really ran
            visits = [visits[0] + int(masked), visits[1] + int(not masked)]
        return o, m_new, l, *visits

    counters = [jnp.int32(0), jnp.int32(0)] if visits_refs else []  # carried only when counting
    init = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), MASK_VALUE, jnp.float32),
            jnp.zeros((block_q,), jnp.float32), *counters)
    o, m, l, *visits = three_loops(visit, visit_ranges(ks, ke, block_k), init)
    l = jnp.maximum(l, 1e-30)  # a row that sees nothing (a part of masks.range_parts): output 0
    o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)
    for ref, count in zip(visits_refs, visits):
        ref[...] = jnp.full(ref.shape, count, jnp.int32)


def _forward(q, k, v, ks, ke, *, scale, block_q, block_k, interpret, compiler_params, count_visits=False):
    """Output and logsumexp; with count_visits also the masked and unmasked key-block
    visits each query block's loops really ran ([B, Hq, T] each, repeated over the block's rows)."""
    B, T, Hq, D = q.shape
    group = Hq // k.shape[2]
    S = k.shape[1]
    kernel = functools.partial(_forward_kernel, scale=scale, block_k=block_k)
    row_stat = pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))
    row_counts = [row_stat, row_stat] if count_visits else []
    counts_shape = [jax.ShapeDtypeStruct((B, Hq, T), jnp.int32)] * len(row_counts)
    return pl.pallas_call(
        kernel,
        grid=(B, Hq, T // block_q),
        in_specs=_query_block_specs(block_q, S, D, group),
        out_specs=[pl.BlockSpec((None, block_q, None, D), lambda b, h, i: (b, i, h, 0)), row_stat, *row_counts],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, Hq, T), jnp.float32),
                   *counts_shape],
        interpret=interpret, compiler_params=compiler_params, name="glm_flash_forward",
    )(q, k, v, ks, ke)


# ---------------------------------------------------------------------------- backward
def _dq_kernel(q_ref, k_ref, v_ref, ks_ref, ke_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, block_k):
    q, do = q_ref[...], do_ref[...]
    ks, ke = ks_ref[...], ke_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def visit(j, dq, masked: bool):
        start = j * block_k
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        p = jnp.exp(_dot(q, k, 1, 1) * scale - lse[:, None])
        if masked:
            p = jnp.where(_allowed(ks, ke, start, block_k), p, 0.0)
        ds = p * (_dot(do, v, 1, 1) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, 1, 0)

    dq = three_loops(visit, visit_ranges(ks, ke, block_k), jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, ks_ref, ke_ref, qs_ref, qe_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, scale, block_q, group):
    k, v = k_ref[...], v_ref[...]
    block_k = k.shape[0]
    qs, qe = qs_ref[...], qe_ref[...]
    key_start = pl.program_id(2) * block_k

    def visit(i, carry, head, masked: bool):
        dk, dv = carry
        start = i * block_q
        q = q_ref[pl.ds(start, block_q), head, :]
        do = do_ref[pl.ds(start, block_q), head, :]
        lse = lse_ref[head, pl.ds(start, block_q)]
        delta = delta_ref[head, pl.ds(start, block_q)]
        p = jnp.exp(_dot(q, k, 1, 1) * scale - lse[:, None])  # [bq, bk]
        if masked:
            allowed = _allowed(ks_ref[pl.ds(start, block_q)], ke_ref[pl.ds(start, block_q)], key_start, block_k)
            p = jnp.where(allowed, p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, 0, 0)
        ds = p * (_dot(do, v, 1, 1) - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, 0, 0)
        return dk, dv

    ranges = visit_ranges(qs, qe, block_q)  # query blocks that see (all of) this key block
    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for head in range(group):  # the query heads sharing this KV head, summed in float32
        carry = three_loops(functools.partial(visit, head=head), ranges, carry)
    dk, dv = carry
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, ks, ke, qs, qe, o, lse, do, dlse, *, scale, block_q, block_k, interpret,
              compiler_params):
    B, T, Hq, D = q.shape
    Hkv, S = k.shape[2], k.shape[1]
    group = Hq // Hkv
    # d lse / d s = p: a log-sum-exp cotangent only shifts delta (dS = p (dP - delta)).
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32)) - dlse
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=block_k),
        grid=(B, Hq, T // block_q),
        in_specs=_query_block_specs(block_q, S, D, group) + [
            pl.BlockSpec((None, block_q, None, D), lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i)),
            pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i)),
        ],
        out_specs=pl.BlockSpec((None, block_q, None, D), lambda b, h, i: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret, compiler_params=compiler_params, name="glm_flash_dq",
    )(q, k, v, ks, ke, do, lse, delta)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_q=block_q, group=group),
        grid=(B, Hkv, S // block_k),
        in_specs=[
            pl.BlockSpec((None, T, group, D), lambda b, g, j: (b, 0, g, 0)),
            pl.BlockSpec((None, block_k, None, D), lambda b, g, j: (b, j, g, 0)),
            pl.BlockSpec((None, block_k, None, D), lambda b, g, j: (b, j, g, 0)),
            pl.BlockSpec((None, T), lambda b, g, j: (b, 0)),
            pl.BlockSpec((None, T), lambda b, g, j: (b, 0)),
            pl.BlockSpec((None, block_k), lambda b, g, j: (b, j)),
            pl.BlockSpec((None, block_k), lambda b, g, j: (b, j)),
            pl.BlockSpec((None, T, group, D), lambda b, g, j: (b, 0, g, 0)),
            pl.BlockSpec((None, group, T), lambda b, g, j: (b, g, 0)),
            pl.BlockSpec((None, group, T), lambda b, g, j: (b, g, 0)),
        ],
        out_specs=[pl.BlockSpec((None, block_k, None, D), lambda b, g, j: (b, j, g, 0)),
                   pl.BlockSpec((None, block_k, None, D), lambda b, g, j: (b, j, g, 0))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=interpret, compiler_params=compiler_params, name="glm_flash_dkv",
    )(q, k, v, ks, ke, qs, qe, do, lse, delta)
    return dq, dk, dv


# ------------------------------------------------------------------------- custom_vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _flash(q, k, v, ks, ke, qs, qe, scale, block_q, block_k, interpret, compiler_params):
    """(output, log-sum-exp [B, Hq, T]); the log-sum-exp is an output so a learned prefix can be merged in."""
    return tuple(_forward(q, k, v, ks, ke, scale=scale, block_q=block_q, block_k=block_k, interpret=interpret,
                          compiler_params=compiler_params))


def _flash_fwd(q, k, v, ks, ke, qs, qe, scale, block_q, block_k, interpret, compiler_params):
    o, lse = _forward(q, k, v, ks, ke, scale=scale, block_q=block_q, block_k=block_k, interpret=interpret,
                      compiler_params=compiler_params)
    return (o, lse), (q, k, v, ks, ke, qs, qe, o, lse)


def _flash_bwd(scale, block_q, block_k, interpret, compiler_params, residuals, cotangents):
    q, k, v, ks, ke, qs, qe, o, lse = residuals
    do, dlse = cotangents
    dq, dk, dv = _backward(q, k, v, ks, ke, qs, qe, o, lse, do, dlse, scale=scale, block_q=block_q, block_k=block_k,
                           interpret=interpret, compiler_params=compiler_params)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _power_of_two(D: int) -> int:
    return max(16, 1 << (D - 1).bit_length())  # Triton's block dims are powers of two


def flash_attention(q, k, v, segment_ids, prefix_mask, *, scale: float, q_offset: int | None = None,
                    block_q: int = 64, block_k: int = 64, interpret: bool = False, compiler_params=None,
                    return_lse: bool = False, ranges=None):
    """GLM attention with the Pallas kernels; same contract as xla_attention.

    q [B, T, Hq, D]; k, v [B, S, Hkv, D]; segment_ids, prefix_mask [B, S] describe
    the keys and query t is key position q_offset + t (default S - T: the last T
    positions, e.g. a chunk of a prefill against everything up to it). Any T and S:
    both are padded to the blocks and padded rows attend only to their own padded
    key. Head dims are padded to a power of two (zeros change no score). return_lse: also
    the float32 log-sum-exp of each query's scores, [B, T, Hq] (differentiable). ranges: one
    part of masks.range_parts instead of GLM's rule (a query that sees nothing gets output 0).
    """
    T, D = q.shape[1], q.shape[3]
    q, k, v, (ks, ke, qs, qe) = padded_inputs(q, k, v, segment_ids, prefix_mask, q_offset, block_q, block_k,
                                              _power_of_two(D), ranges)
    out, lse = _flash(q, k, v, ks, ke, qs, qe, scale, block_q, block_k, interpret, compiler_params)
    if not return_lse:
        return out[:, :T, :, :D]
    return out[:, :T, :, :D], lse.transpose(0, 2, 1)[:, :T]


def count_forward_visits(q, k, v, segment_ids, prefix_mask, *, q_offset: int | None = None, block_q: int = 64,
                         block_k: int = 64, ranges=None):
    """Runs the forward kernel (interpret mode) and returns the key blocks its loops really visited,
    (masked, unmasked), each [B, Hq, num query blocks]: the measured side of the block-skipping claim
    (under GLM's rule, or one part `ranges` of masks.range_parts)."""
    q, k, v, (ks, ke, _, _) = padded_inputs(q, k, v, segment_ids, prefix_mask, q_offset, block_q, block_k,
                                            _power_of_two(q.shape[3]), ranges)
    _, _, masked, unmasked = _forward(q, k, v, ks, ke, scale=1.0, block_q=block_q, block_k=block_k, interpret=True,
                                      compiler_params=None, count_visits=True)
    return masked[:, :, ::block_q], unmasked[:, :, ::block_q]

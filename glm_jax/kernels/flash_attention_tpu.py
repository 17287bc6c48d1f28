"""The GLM flash attention for TPU (Mosaic): the same algorithm as flash_attention.py, TPU-shaped.

Differences from the generic (Triton / interpret) kernel, all forced by Mosaic:
- the grid visits one (query block, key block) pair per step with the reduction
  axis last and "arbitrary"; running max, sum and output accumulate in VMEM scratch;
- block skipping uses scalar prefetch: per query block the range of key blocks
  that hold any allowed key, and the inner range visible to every row (and per key
  block the same two ranges of query blocks) sit in SMEM; the kernel body runs only
  inside the outer range, without any mask inside the inner one, and the index
  maps clamp to the outer range so a skipped step re-uses the previous block and
  costs no DMA;
- arrays are [B, heads, T, D] with D padded to a multiple of 128 lanes; per-row
  key ranges, running statistics, logsumexp and delta are lane-replicated
  [rows, 128] tiles, as Mosaic keeps (rows, 1) vectors;
- GQA: the dK/dV grid's reduction axis runs over (query head of the group, query
  block), so the group's gradients sum in float32 scratch and K/V are never repeated;
- integer division in kernels and index maps is lax.div / lax.rem (operands are
  non-negative): Python's // and % lower through a sign fix-up that asks the
  running TPU for its generation, which an ahead-of-time compile does not have.
Semantics are checked in interpret mode on CPU against the XLA reference, and the
kernels compile with the real TPU compiler for TPU topologies from a CPU machine
(tests/test_flash_attention_tpu.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from glm_jax.kernels.blocks import padded_inputs, visit_ranges
from glm_jax.kernels.masks import MASK_VALUE

LANES = 128
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _dot(a, b, dims):
    # Explicit precision: a global jax_default_matmul_precision='highest' would otherwise
    # reach bf16 matmuls, which Mosaic rejects ("Bad lhs type").
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _lanes(x, width: int):
    """A lane-replicated [rows, 128] tile widened to [rows, width] (width a multiple of 128)."""
    return x if width == LANES else jnp.tile(x, (1, width // LANES))


def _allowed(ks_ref, ke_ref, key_start, block_k: int):
    """[bq, bk] mask of a query block against keys [key_start, key_start + bk)."""
    ks, ke = _lanes(ks_ref[...], block_k), _lanes(ke_ref[...], block_k)
    cols = key_start + lax.broadcasted_iota(jnp.int32, ks.shape, 1)
    return (cols >= ks) & (cols < ke)


def _block_ranges(starts, ends, block: int, other_block: int):
    """Per block of `block` rows: (first, full_first, full_last, last) blocks of `other_block`
    columns, [B, T // block] int32 each (blocks.visit_ranges)."""
    B, T = starts.shape
    rows = (x.reshape(B, T // block, block) for x in (starts, ends))
    return tuple(x.astype(jnp.int32) for x in visit_ranges(*rows, other_block))


def _clamp(j, first, last):
    return jnp.minimum(jnp.maximum(j, first), jnp.maximum(last - 1, first))


# ----------------------------------------------------------------------------- forward
def _when_visited(ranges, b, row_block, col_block, visit):
    """Runs visit(masked=True) on the partly visible blocks and visit(masked=False) on the fully visible."""
    first, full_first, full_last, last = (r[b, row_block] for r in ranges)
    full = (col_block >= full_first) & (col_block < full_last)
    pl.when((col_block >= first) & (col_block < last) & jnp.logical_not(full))(functools.partial(visit, masked=True))
    pl.when(full)(functools.partial(visit, masked=False))


def _forward_kernel(first, full_first, full_last, last, q_ref, k_ref, v_ref, ks_ref, ke_ref, o_ref, lse_ref,
                    m_scratch, l_scratch, acc_scratch, *, scale: float, block_k: int):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    head_dim = acc_scratch.shape[-1]

    @pl.when(j == 0)
    def _init():
        m_scratch[...] = jnp.full(m_scratch.shape, MASK_VALUE, jnp.float32)
        l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
        acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

    def visit(masked: bool):
        s = _dot(q_ref[...], k_ref[...], _NT) * scale
        if masked:
            allowed = _allowed(ks_ref, ke_ref, j * block_k, block_k)
            s = jnp.where(allowed, s, MASK_VALUE)
        m_prev, l_prev = m_scratch[...], l_scratch[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - _lanes(m_next, block_k))
        if masked:
            p = jnp.where(allowed, p, 0.0)
        correction = jnp.exp(m_prev - m_next)
        l_scratch[...] = correction * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_scratch[...] = m_next
        pv = _dot(p.astype(v_ref.dtype), v_ref[...], _NN)
        acc_scratch[...] = acc_scratch[...] * _lanes(correction, head_dim) + pv

    _when_visited((first, full_first, full_last, last), b, i, j, visit)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = jnp.maximum(l_scratch[...], 1e-30)  # a row that sees nothing (a part of masks.range_parts): output 0
        o_ref[...] = (acc_scratch[...] / _lanes(l, head_dim)).astype(o_ref.dtype)
        lse_ref[...] = m_scratch[...] + jnp.log(l)


def _row_specs(block_q, block_k, D, group):
    """q block i of head h against key block j (clamped to the query block's range)."""
    def kv_map(b, h, i, j, first, full_first, full_last, last):
        return b, lax.div(h, group), _clamp(j, first[b, i], last[b, i]), 0

    return [pl.BlockSpec((None, None, block_q, D), lambda b, h, i, j, *ranges: (b, h, i, 0)),
            pl.BlockSpec((None, None, block_k, D), kv_map),
            pl.BlockSpec((None, None, block_k, D), kv_map),
            pl.BlockSpec((None, block_q, LANES), lambda b, h, i, j, *ranges: (b, i, 0)),
            pl.BlockSpec((None, block_q, LANES), lambda b, h, i, j, *ranges: (b, i, 0))]


def _row_stat_spec(block_q):
    return pl.BlockSpec((None, None, block_q, LANES), lambda b, h, i, j, *ranges: (b, h, i, 0))


def _params(interpret):
    if interpret:
        return None
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _forward(q, k, v, ks, ke, kv_ranges, *, scale, block_q, block_k, interpret):
    B, Hq, T, D = q.shape
    group, S = Hq // k.shape[1], k.shape[2]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(B, Hq, T // block_q, S // block_k),
        in_specs=_row_specs(block_q, block_k, D, group),
        out_specs=[pl.BlockSpec((None, None, block_q, D), lambda b, h, i, j, *ranges: (b, h, i, 0)),
                   _row_stat_spec(block_q)],
        scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32), pltpu.VMEM((block_q, LANES), jnp.float32),
                        pltpu.VMEM((block_q, D), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_forward_kernel, scale=scale, block_k=block_k), grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, Hq, T, LANES), jnp.float32)],
        compiler_params=_params(interpret), interpret=interpret, name="glm_flash_forward_tpu",
    )(*kv_ranges, q, k, v, ks, ke)


# ---------------------------------------------------------------------------- backward
def _dq_kernel(first, full_first, full_last, last, q_ref, k_ref, v_ref, ks_ref, ke_ref, do_ref, lse_ref,
               delta_ref, dq_ref, dq_scratch, *, scale: float, block_k: int):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

    def visit(masked: bool):
        k = k_ref[...]
        p = jnp.exp(_dot(q_ref[...], k, _NT) * scale - _lanes(lse_ref[...], block_k))
        if masked:
            p = jnp.where(_allowed(ks_ref, ke_ref, j * block_k, block_k), p, 0.0)
        dp = _dot(do_ref[...], v_ref[...], _NT)
        ds = p * (dp - _lanes(delta_ref[...], block_k))
        dq_scratch[...] += _dot(ds.astype(k.dtype), k, _NN)

    _when_visited((first, full_first, full_last, last), b, i, j, visit)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_scratch[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(first, full_first, full_last, last, q_ref, k_ref, v_ref, ks_ref, ke_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, dk_scratch, dv_scratch, *, scale: float, block_k: int, num_q_blocks: int):
    b, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    i = lax.rem(t, num_q_blocks)  # query block; t / num_q_blocks is the query head within the group

    @pl.when(t == 0)
    def _init():
        dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
        dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

    def visit(masked: bool):
        q, do = q_ref[...], do_ref[...]
        p = jnp.exp(_dot(q, k_ref[...], _NT) * scale - _lanes(lse_ref[...], block_k))  # [bq, bk]
        if masked:
            p = jnp.where(_allowed(ks_ref, ke_ref, j * block_k, block_k), p, 0.0)
        dv_scratch[...] += _dot(p.astype(do.dtype), do, _TN)
        dp = _dot(do, v_ref[...], _NT)
        ds = p * (dp - _lanes(delta_ref[...], block_k))
        dk_scratch[...] += _dot(ds.astype(q.dtype), q, _TN)

    _when_visited((first, full_first, full_last, last), b, j, i, visit)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_scratch[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def _backward(q, k, v, ks, ke, bounds, o, lse, do, dlse, *, scale, block_q, block_k, interpret):
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group, nq = Hq // Hkv, T // block_q
    kv_ranges, q_ranges = bounds
    # d lse / d s = p: a log-sum-exp cotangent only shifts delta (dS = p (dP - delta)).
    delta = jnp.einsum("bhtd,bhtd->bht", o.astype(jnp.float32), do.astype(jnp.float32)) - dlse
    delta = jnp.broadcast_to(delta[..., None], (B, Hq, T, LANES))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=block_k),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(B, Hq, nq, S // block_k),
            in_specs=_row_specs(block_q, block_k, D, group) + [
                pl.BlockSpec((None, None, block_q, D), lambda b, h, i, j, *ranges: (b, h, i, 0)),
                _row_stat_spec(block_q), _row_stat_spec(block_q)],
            out_specs=pl.BlockSpec((None, None, block_q, D), lambda b, h, i, j, *ranges: (b, h, i, 0)),
            scratch_shapes=[pltpu.VMEM((block_q, D), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), compiler_params=_params(interpret),
        interpret=interpret, name="glm_flash_dq_tpu",
    )(*kv_ranges, q, k, v, ks, ke, do, lse, delta)

    def q_map(b, g, j, t, first, full_first, full_last, last):  # head g*group + t / nq, block clamped
        return b, g * group + lax.div(t, nq), _clamp(lax.rem(t, nq), first[b, j], last[b, j]), 0

    def row_map(b, g, j, t, first, full_first, full_last, last):
        return b, _clamp(lax.rem(t, nq), first[b, j], last[b, j]), 0

    kv_block = pl.BlockSpec((None, None, block_k, D), lambda b, g, j, t, *ranges: (b, g, j, 0))
    stat = pl.BlockSpec((None, None, block_q, LANES), q_map)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_k=block_k, num_q_blocks=nq),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(B, Hkv, S // block_k, group * nq),
            in_specs=[pl.BlockSpec((None, None, block_q, D), q_map), kv_block, kv_block,
                      pl.BlockSpec((None, block_q, LANES), row_map), pl.BlockSpec((None, block_q, LANES), row_map),
                      pl.BlockSpec((None, None, block_q, D), q_map), stat, stat],
            out_specs=[kv_block, kv_block],
            scratch_shapes=[pltpu.VMEM((block_k, D), jnp.float32), pltpu.VMEM((block_k, D), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(interpret), interpret=interpret, name="glm_flash_dkv_tpu",
    )(*q_ranges, q, k, v, ks, ke, do, lse, delta)
    return dq, dk, dv


# ------------------------------------------------------------------------- custom_vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q, k, v, ks, ke, bounds, scale, block_q, block_k, interpret):
    """(output, log-sum-exp [B, Hq, T]); the log-sum-exp is an output so a learned prefix can be merged in."""
    o, lse = _forward(q, k, v, ks, ke, bounds[0], scale=scale, block_q=block_q, block_k=block_k,
                      interpret=interpret)
    return o, lse[..., 0]


def _flash_fwd(q, k, v, ks, ke, bounds, scale, block_q, block_k, interpret):
    o, lse = _forward(q, k, v, ks, ke, bounds[0], scale=scale, block_q=block_q, block_k=block_k,
                      interpret=interpret)
    return (o, lse[..., 0]), (q, k, v, ks, ke, bounds, o, lse)


def _flash_bwd(scale, block_q, block_k, interpret, residuals, cotangents):
    q, k, v, ks, ke, bounds, o, lse = residuals
    do, dlse = cotangents
    dq, dk, dv = _backward(q, k, v, ks, ke, bounds, o, lse, do, dlse, scale=scale, block_q=block_q, block_k=block_k,
                           interpret=interpret)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention_tpu(q, k, v, segment_ids, prefix_mask, *, scale: float, q_offset: int | None = None,
                        block_q: int = 128, block_k: int = 128, interpret: bool = False,
                        return_lse: bool = False, ranges=None):
    """GLM attention with the Mosaic kernels; same contract as flash_attention.flash_attention.

    q [B, T, Hq, D], k/v [B, S, Hkv, D], segment_ids/prefix_mask [B, S], query t at key
    position q_offset + t (default S - T). T and S are padded to the blocks (a padded
    query sees only its own padded key), D to a multiple of 128 lanes; blocks must be
    multiples of 128. return_lse: also the float32 log-sum-exp per query, [B, T, Hq]. ranges: one
    part of masks.range_parts instead of GLM's rule (a query that sees nothing gets output 0).
    """
    if block_q % LANES or block_k % LANES:
        raise ValueError(f"TPU blocks must be multiples of {LANES}; got block_q={block_q}, block_k={block_k}")
    T, D = q.shape[1], q.shape[3]
    q, k, v, (ks, ke, qs, qe) = padded_inputs(q, k, v, segment_ids, prefix_mask, q_offset, block_q, block_k,
                                              D + (-D % LANES), ranges)
    kv_ranges = _block_ranges(ks, ke, block_q, block_k)  # per query block, over key blocks
    q_ranges = _block_ranges(qs, qe, block_k, block_q)  # per key block, over query blocks
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    ks, ke = (jnp.broadcast_to(x[..., None], (*x.shape, LANES)) for x in (ks, ke))
    out, lse = _flash(q, k, v, ks, ke, (kv_ranges, q_ranges), scale, block_q, block_k, interpret)
    out = out.transpose(0, 2, 1, 3)[:, :T, :, :D]
    return (out, lse.transpose(0, 2, 1)[:, :T]) if return_lse else out

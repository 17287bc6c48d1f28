"""On a real GPU: the Triton flash kernel, the model on it, and KV-cache decoding.

Skipped unless jax's default backend is a GPU (the test run pins the CPU; on a GPU
machine run `JAX_PLATFORMS=cuda python -m pytest tests/test_gpu.py`). The interpret-mode
tests (test_flash_attention.py) prove the kernel's semantics on CPU; these prove that the
Triton lowering computes the same function on hardware.

Tolerances: Triton runs a float32 dot on the tensor cores in TF32 (10-bit mantissa), so
float32 outputs are held to a relative norm error of 2e-3 against the float32 XLA
reference computed at HIGHEST precision (TF32 rounding alone gives ~3e-4); bf16 is held to
twice the XLA reference's own bf16 error, as in test_flash_attention.py.

Seen on an H100 (jax 0.11.2, 2026-11-23): the float32 cases at head_dim 64 pass; a float32
backward at head_dim 128 (or 80, padded to 128) took over 50 s to compile (XLA's compile of
the Triton dK/dV program), so the wide head dims, GQA/MQA and the query windows are checked
in bf16 (the training dtype on GPUs, whose D=128 programs compile in seconds) instead.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.kernels.attention import xla_attention
from glm_jax.kernels.flash_attention import flash_attention
from test_flash_attention import make_mask, random_inputs

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX_PLATFORMS=cuda)")

FLOAT32_TOLERANCE = 2e-3


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), "non-finite values in the kernel's output"
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def triton_kernel(**options):
    from jax.experimental.pallas import triton as pallas_triton

    params = pallas_triton.CompilerParams(num_warps=4, num_stages=2)
    return functools.partial(flash_attention, interpret=False, compiler_params=params, **options)


def out_and_grads(attend, q, k, v, cotangent, dtype):
    out, vjp = jax.vjp(attend, *(x.astype(dtype) for x in (q, k, v)))
    return [np.asarray(x.astype(jnp.float32)) for x in (out, *vjp(cotangent.astype(dtype)))]


def case_inputs(rng, B, T, Hq, Hkv, D, kind, S=None):
    S = T if S is None else S
    seg, prefix = make_mask(kind, rng, B, S)
    return (seg, prefix), random_inputs(rng, B, T, S, Hq, Hkv, D)


# Every mask kind at head_dim 64 in float32: T not a block multiple, block_q != block_k.
FLOAT32_CASES = [
    dict(B=2, T=256, Hq=4, Hkv=4, D=64, kind="packed", block_q=64, block_k=64),
    dict(B=2, T=200, Hq=4, Hkv=4, D=64, kind="single_prefix", block_q=64, block_k=32),
    dict(B=2, T=128, Hq=4, Hkv=2, D=64, kind="causal", block_q=64, block_k=64),
]


@pytest.mark.parametrize("case", FLOAT32_CASES, ids=lambda c: f"{c['kind']}-T{c['T']}-Hkv{c['Hkv']}")
def test_triton_kernel_matches_the_reference_in_float32(case):
    case = dict(case)
    block_q, block_k = case.pop("block_q"), case.pop("block_k")
    (seg, prefix), (q, k, v, cotangent) = case_inputs(np.random.default_rng(0), **case)
    scale = case["D"] ** -0.5
    kernel = triton_kernel(block_q=block_q, block_k=block_k)
    flash = lambda q, k, v: kernel(q, k, v, seg, prefix, scale=scale)  # noqa: E731
    reference = lambda q, k, v: xla_attention(q, k, v, seg, prefix, scale=scale)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        want = out_and_grads(reference, q, k, v, cotangent, jnp.float32)
    got = out_and_grads(jax.jit(flash), q, k, v, cotangent, jnp.float32)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert relative_error(g, w) < FLOAT32_TOLERANCE, (name, relative_error(g, w))


# GQA / MQA, head dims 128 and 80 (padded), packed and prefix masks, query windows shorter than the keys.
BFLOAT16_CASES = [
    dict(B=2, T=384, Hq=8, Hkv=2, D=128, kind="packed"),
    dict(B=1, T=300, Hq=4, Hkv=1, D=80, kind="single_prefix"),
    dict(B=2, T=64, S=256, q_offset=192, Hq=4, Hkv=2, D=128, kind="packed"),
    dict(B=2, T=1, S=130, q_offset=129, Hq=4, Hkv=1, D=128, kind="single_prefix"),
]


@pytest.mark.parametrize("case", BFLOAT16_CASES, ids=lambda c: f"{c['kind']}-T{c['T']}-Hkv{c['Hkv']}-D{c['D']}")
def test_triton_kernel_bfloat16_error_is_within_the_references_own(case):
    case = dict(case)
    q_offset = case.pop("q_offset", None)
    (seg, prefix), (q, k, v, cotangent) = case_inputs(np.random.default_rng(3), **case)
    scale = case["D"] ** -0.5
    kernel = triton_kernel(block_q=64, block_k=64)
    flash = jax.jit(lambda q, k, v: kernel(q, k, v, seg, prefix, scale=scale, q_offset=q_offset))
    reference = lambda q, k, v: xla_attention(q, k, v, seg, prefix, scale=scale, q_offset=q_offset)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        exact = out_and_grads(reference, q, k, v, cotangent, jnp.float32)
    reference_bf16 = out_and_grads(reference, q, k, v, cotangent, jnp.bfloat16)
    flash_bf16 = out_and_grads(flash, q, k, v, cotangent, jnp.bfloat16)
    for name, want, ref, got in zip(("out", "dq", "dk", "dv"), exact, reference_bf16, flash_bf16):
        reference_error = np.max(np.abs(ref - want))
        assert np.all(np.isfinite(got)), name
        assert np.max(np.abs(got - want)) <= 2 * reference_error, (name, np.max(np.abs(got - want)), reference_error)


def test_model_uses_the_triton_kernel_and_matches_xla():
    from test_model import packed_batch, params_of, tiny
    from glm_jax.kernels.attention import resolve_impl
    from glm_jax.model import GLM
    from glm_jax.model.loss import masked_cross_entropy

    assert resolve_impl("auto") == "pallas"
    xla = tiny("chatglm2", num_layers=2, attention_impl="xla")
    triton = xla.replace(attention_impl="auto")
    tokens, pos, seg, prefix = packed_batch(xla, seed=21, length=200)
    targets = np.roll(tokens, -1, axis=1)
    mask = np.ones(tokens.shape, np.float32)
    params = params_of(xla)

    def loss_and_grads(config):
        loss_fn = lambda p: masked_cross_entropy(GLM(config).apply({"params": p}, tokens, pos, seg, prefix),  # noqa: E731
                                                 targets, mask)[0]
        return jax.jit(jax.value_and_grad(loss_fn))(params)

    with jax.default_matmul_precision("highest"):
        loss_x, grads_x = loss_and_grads(xla)
    loss_t, grads_t = loss_and_grads(triton)
    assert relative_error(loss_t, loss_x) < 1e-4
    errors = jax.tree_util.tree_map_with_path(lambda path, g, w: (jax.tree_util.keystr(path), relative_error(g, w)),
                                              grads_t, grads_x)
    for name, error in jax.tree_util.tree_leaves(errors, is_leaf=lambda x: isinstance(x, tuple)):
        assert error < 1e-2, name


@pytest.mark.parametrize("heads,position", [("mqa", "partial_interleaved"), ("gqa2", "rope_2d")])
def test_decode_on_gpu_equals_the_full_forward(heads, position):
    """The KV-cache decoder on the GPU (XLA at HIGHEST precision) against the full forward at 1e-5."""
    from test_generate import check_blank_decode_matches_full_forward, tiny_config

    with jax.default_matmul_precision("highest"):
        check_blank_decode_matches_full_forward(tiny_config(heads, position, attention_impl="xla"))

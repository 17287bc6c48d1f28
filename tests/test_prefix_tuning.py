"""P-tuning v2: the log-sum-exp every attention implementation returns, the learned prefix
merged into GLM attention (against attention over the concatenated keys), prefix-only
training, cached decoding with a prefix, and P-tuning runs end to end."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from glm_jax import experiment as experiment_lib
from glm_jax.evaluation import loss_sums
from glm_jax.kernels import masks
from glm_jax.kernels.attention import attention, masked_attention
from glm_jax.kernels.flash_attention_tpu import flash_attention_tpu
from glm_jax.kernels.learned_prefix import attention_with_learned_prefix, merge_attention, prefix_attention
from glm_jax.model import GLM, example_inputs
from glm_jax.model.adapters import count_adapter_params, init_adapters, join_adapters, split_adapters
from glm_jax.model.prefix_tuning import PrefixTuning
from glm_jax.run_dir import RunDir, load_run
from glm_jax.train.state import create_state
from glm_jax.train.step import make_train_step
from test_generate import check_blank_decode_matches_full_forward, check_causal_decode_matches_full_forward
from test_generate import make_generator, tiny_config
from train_fixtures import adapter_run, causal_batch, subprocess_env

B, T, HQ, HKV, D, P = 2, 40, 4, 2, 16, 5
SEGMENTS = np.array([[1] * 15 + [2] * 20 + [0] * 5, [1] * 40])
PREFIX_MASK = np.zeros((B, T), bool)
PREFIX_MASK[0, :6] = PREFIX_MASK[0, 15:20] = PREFIX_MASK[1, :10] = True  # GLM's bidirectional parts
IMPLS = {"xla": functools.partial(attention, impl="xla"),
         "blockwise": functools.partial(attention, impl="blockwise"),
         "pallas_interpret": functools.partial(attention, impl="pallas_interpret"),
         "tpu_interpret": functools.partial(flash_attention_tpu, interpret=True, scale=D ** -0.5)}


def random_inputs(seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 7)
    q = jax.random.normal(keys[0], (B, T, HQ, D))
    k, v = (jax.random.normal(key, (B, T, HKV, D)) for key in keys[1:3])
    prefix_key, prefix_value = (2.0 * jax.random.normal(key, (P, HKV, D)) for key in keys[3:5])
    return (q, k, v, prefix_key, prefix_value), jax.random.normal(keys[5], (B, T, HQ, D)), \
        jax.random.normal(keys[6], (B, T, HQ))


def numpy_lse(q, k):
    """Each query's log-sum-exp over the keys GLM's rule lets it see, in float64."""
    allowed = np.asarray(masks.dense_mask(jnp.asarray(SEGMENTS), jnp.asarray(PREFIX_MASK), q_len=T, q_offset=0))
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    scores = np.einsum("bthd,bshd->bhts", q, np.repeat(k, HQ // HKV, axis=2)) * D ** -0.5
    scores = np.where(allowed[:, None], scores, -np.inf)
    peak = scores.max(-1, keepdims=True)
    return (np.log(np.exp(scores - peak).sum(-1)) + peak[..., 0]).transpose(0, 2, 1)  # [B, T, Hq]


@pytest.mark.parametrize("impl", IMPLS)
def test_every_implementation_returns_the_log_sum_exp_with_its_gradient(impl):
    (q, k, v, *_), w_out, w_lse = random_inputs()
    run = IMPLS[impl]

    def objective(fn, q, k, v):  # depends on out and on lse, so the lse cotangent is exercised
        out, lse = fn(q, k, v, SEGMENTS, PREFIX_MASK, return_lse=True)
        return jnp.sum(out * w_out) + jnp.sum(lse * w_lse)

    out, lse = run(q, k, v, SEGMENTS, PREFIX_MASK, return_lse=True)
    assert lse.shape == (B, T, HQ) and lse.dtype == jnp.float32
    np.testing.assert_allclose(lse, numpy_lse(q, k), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, attention(q, k, v, SEGMENTS, PREFIX_MASK, impl="xla"), atol=1e-5)
    grads = jax.grad(functools.partial(objective, run), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(functools.partial(objective, IMPLS["xla"]), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def concatenated_reference(q, k, v, prefix_key, prefix_value):
    """The P-tuning rule written out: the P slots are extra keys before the sequence, seen by every query."""
    allowed = masks.dense_mask(jnp.asarray(SEGMENTS), jnp.asarray(PREFIX_MASK), q_len=T, q_offset=0)
    allowed = jnp.concatenate([jnp.ones((B, T, P), bool), allowed], axis=-1)
    keys = jnp.concatenate([jnp.broadcast_to(prefix_key, (B, P, HKV, D)), k], axis=1)
    values = jnp.concatenate([jnp.broadcast_to(prefix_value, (B, P, HKV, D)), v], axis=1)
    return masked_attention(q, keys, values, allowed, scale=D ** -0.5)


@pytest.mark.parametrize("impl", ["xla", "blockwise", "pallas_interpret"])
def test_a_learned_prefix_merges_exactly_with_every_implementation(impl):
    inputs, w_out, _ = random_inputs(1)

    def objective(fn, *args):
        return jnp.sum(fn(*args) * w_out)

    merged = functools.partial(lambda impl, q, k, v, pk, pv: attention_with_learned_prefix(
        q, k, v, SEGMENTS, PREFIX_MASK, pk, pv, impl=impl), impl)
    np.testing.assert_allclose(merged(*inputs), concatenated_reference(*inputs), rtol=1e-5, atol=1e-5)
    grads = jax.grad(functools.partial(objective, merged), argnums=range(5))(*inputs)
    expected = jax.grad(functools.partial(objective, concatenated_reference), argnums=range(5))(*inputs)
    for got, want in zip(grads, expected):  # q, k, v and both prefix tables
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _merged_loss(flash, D):
    """A loss through a flash kernel's (out, lse) merged with a learned prefix, as the model runs it."""
    def loss(q, k, v, seg, prefix, prefix_key, prefix_value):
        sequence = flash(q, k, v, seg, prefix, scale=D ** -0.5, return_lse=True)
        learned = prefix_attention(q, prefix_key, prefix_value, scale=D ** -0.5)
        return jnp.sum(merge_attention(sequence, learned))
    return loss


def _avals(B, T, Hq, Hkv, D, P, **sharding):
    def aval(shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, **sharding)
    return (aval((B, T, Hq, D)), aval((B, T, Hkv, D)), aval((B, T, Hkv, D)), aval((B, T), jnp.int32),
            aval((B, T), jnp.bool_), aval((P, Hkv, D)), aval((P, Hkv, D)))


def test_the_learned_prefix_path_lowers_for_cuda_and_compiles_for_tpu():
    """The kernels with their log-sum-exp output and its cotangent, on the real GPU lowering (Triton)
    and the real TPU compiler (Mosaic, libtpu), forward and backward."""
    from jax.experimental.pallas import triton as pallas_triton
    from glm_jax.kernels.flash_attention import flash_attention

    B, T, Hq, Hkv, D, P = 1, 256, 8, 2, 64, 16
    triton = functools.partial(flash_attention, compiler_params=pallas_triton.CompilerParams(num_warps=4,
                                                                                            num_stages=2))
    grad = jax.jit(jax.value_and_grad(_merged_loss(triton, D), argnums=(0, 1, 2, 5, 6)))
    module = jax.export.export(grad, platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*_avals(B, T, Hq, Hkv, D, P)).mlir_module()
    assert module.count("__gpu$xla.gpu.triton") == 3  # forward, dQ, dK/dV
    pytest.importorskip("libtpu")
    from jax.sharding import SingleDeviceSharding
    from glm_jax.parallel.tpu_topology import topology_devices

    device = SingleDeviceSharding(topology_devices("v5e:2x2")[0])
    grad = jax.jit(jax.value_and_grad(_merged_loss(flash_attention_tpu, D), argnums=(0, 1, 2, 5, 6)))
    compiled = grad.lower(*_avals(B, T, Hq, Hkv, D, P, sharding=device)).compile()
    assert compiled.as_text().count("tpu_custom_call") == 3


# ------------------------------------------------------------------ the model
def scaled_prefix(params, factor: float = 40.0):
    """Prefixes as if trained: at init (std 0.02) they barely move a score, which would hide a wiring error."""
    base, adapters = split_adapters(params)
    return join_adapters(base, jax.tree_util.tree_map(lambda x: factor * x, adapters))


@pytest.mark.parametrize("mode", ["causal", pytest.param("blank", marks=pytest.mark.slow)])
def test_cached_decoding_with_a_learned_prefix_equals_the_full_forward(mode):
    config = tiny_config("gqa2", "rope", scan=(mode == "blank"), pre_seq_len=3)
    generator = make_generator(config)
    generator.params = scaled_prefix(generator.params)
    assert generator.params["layers_0"]["attention"]["prefix_key"].shape == (3, 2, 8)
    check = check_blank_decode_matches_full_forward if mode == "blank" else check_causal_decode_matches_full_forward
    check(config, generator)
    inputs = example_inputs(1, 8)
    with_prefix = GLM(generator.config).apply({"params": generator.params}, *inputs)
    base = GLM(generator.config.replace(pre_seq_len=0)).apply({"params": split_adapters(generator.params)[0]}, *inputs)
    assert np.abs(np.asarray(with_prefix) - np.asarray(base)).max() > 1e-2  # the prefix is really attended


def test_only_the_prefix_trains_and_its_count_is_the_closed_form():
    config = tiny_config("gqa2", "rope")
    prefix = PrefixTuning(length=4)
    adapters = nn.unbox(init_adapters(config, prefix, jax.random.key(0)))
    flat = {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]}
    L, G, Dh = config.num_layers, config.num_kv_heads, config.head_dim
    assert sorted(flat) == ["layers/attention/prefix_key", "layers/attention/prefix_value"]
    assert count_adapter_params(adapters) == L * 2 * 4 * G * Dh == config.replace(pre_seq_len=4).num_params() - \
        config.num_params()

    frozen = nn.unbox(GLM(config).init(jax.random.key(1), *example_inputs())["params"])
    frozen_before = jax.tree_util.tree_map(np.array, frozen)
    tx = optax.adam(1e-2)
    state = create_state(config, tx, jax.random.key(0), prefix)
    step = jax.jit(make_train_step(config, tx, optax.constant_schedule(1e-2), rules=(), adapter=prefix))
    batch = causal_batch(config)
    for _ in range(2):
        state, metrics = step(state, batch, frozen)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                   state.params, nn.unbox(init_adapters(config, prefix, jax.random.key(0))))
    assert all(m > 0 for m in jax.tree_util.tree_leaves(moved))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, frozen, frozen_before))

    # Differentiated as one tree, base weights get gradients too: the step excludes them, not the model.
    full = join_adapters(frozen, state.params)
    grads = jax.jit(jax.grad(lambda p: loss_sums(prefix.model(config), p, batch)[0]))(full)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree_util.tree_leaves(grads))


# ------------------------------------------------------------ P-tuning runs
@pytest.fixture(scope="module")
def prefix_runs(tmp_path_factory):
    """(base run, P-tuning run trained 3 steps on it, its bindings): 4 slots per layer."""
    return adapter_run(tmp_path_factory, "prefix", ["train.adapter = 'prefix'", "PrefixTuning.length = 4"])


def test_a_p_tuning_run_saves_only_prefixes_and_loads_with_its_base(prefix_runs):
    base_dir, prefix_dir, _ = prefix_runs
    run = RunDir(prefix_dir)
    checkpoints = run.checkpointer(read_only=True)
    saved = checkpoints.manager.item_metadata(3)["params"]
    checkpoints.close()
    assert sorted(saved["layers"]["attention"]) == ["prefix_key", "prefix_value"] and list(saved) == ["layers"]
    loaded, base = load_run(prefix_dir), load_run(base_dir)
    assert loaded.model.pre_seq_len == 4 and loaded.experiment.model.pre_seq_len == 0  # adapted vs frozen base
    plain, prefixes = split_adapters(loaded.params)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, plain, base.params))
    assert prefixes["layers"]["attention"]["prefix_key"].shape == (2, 4, 2, 8)
    assert json.loads(run.adapter_base_path.read_text())["run"] == str(base_dir)


def test_a_p_tuning_run_generates_evaluates_and_refuses_merge_and_export(prefix_runs, tmp_path):
    from glm_jax.evaluation import evaluate_run

    _, prefix_dir, _ = prefix_runs
    metrics = evaluate_run(load_run(prefix_dir), num_batches=1)
    assert np.isfinite(metrics["loss"]) and metrics["tokens"] > 0
    generated = subprocess.run([sys.executable, "-m", "glm_jax", "generate", "--run_dir", str(prefix_dir),
                                "--prompt", "def f(x):", "--mode", "causal", "--max_new_tokens", "4"],
                               cwd=tmp_path, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr
    for command, message in ((["merge-lora", "--from", str(prefix_dir), "--out", "merged"], "cannot be merged"),
                             (["export-hf", "--from", str(prefix_dir), "--out", "hf"], "export its base run")):
        result = subprocess.run([sys.executable, "-m", "glm_jax", "convert", *command], cwd=tmp_path,
                                env=subprocess_env(1), capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_p_tuning_settings_that_cannot_train_are_refused(prefix_runs):
    _, _, bindings = prefix_runs
    with pytest.raises(ValueError, match="only its adapter run trains: set train.adapter = .prefix."):
        experiment_lib.from_gin([], bindings + ["train.adapter = 'none'", "train.init_from = None",
                                                "ModelConfig.pre_seq_len = 4"])
    with pytest.raises(ValueError, match="PrefixTuning.length 0 must be a whole number >= 1"):
        experiment_lib.from_gin([], bindings + ["PrefixTuning.length = 0"])


def test_a_chatglm_checkpoint_with_a_prefix_encoder_is_refused_not_imported_without_it():
    from glm_jax.convert.hf_layouts import ChatGLM, LayoutError

    config = {"model_type": "chatglm", "multi_query_group_num": 2, "padded_vocab_size": 64, "hidden_size": 32,
              "ffn_hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "multi_query_attention": True}
    assert ChatGLM().model_config({**config, "pre_seq_len": None}).num_kv_heads == 2
    with pytest.raises(LayoutError, match="pre_seq_len = 128: this checkpoint carries a ChatGLM P-tuning v2"):
        ChatGLM().model_config({**config, "pre_seq_len": 128})

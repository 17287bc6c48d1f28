"""Prompt tuning and bottleneck adapters (the survey's parameter-efficient methods beside LoRA and
P-tuning v2): each against an independent float64 numpy GLM, the identity at step 0 where the
method defines one, exactly its own parameters training, cached decoding == the full forward,
and runs end to end (adapters alone in the checkpoint, loaded onto the base, merge refused)."""

from __future__ import annotations

import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import reference_model
from glm_jax import experiment as experiment_lib
from glm_jax.model import GLM
from glm_jax.model.adapters import count_adapter_params, init_adapters, join_adapters, split_adapters
from glm_jax.model.bottleneck_adapters import BottleneckAdapters
from glm_jax.model.config import ModelConfig
from glm_jax.model.prompt_tuning import PromptTuning
from glm_jax.run_dir import RunDir, load_run
from glm_jax.train.state import create_state
from glm_jax.train.step import make_train_step
from test_generate import check_blank_decode_matches_full_forward, check_causal_decode_matches_full_forward
from test_generate import make_generator, tiny_config
from train_fixtures import adapter_run, causal_batch, subprocess_env

V, P = 61, 3
# Two families: GLM-4 style (GQA, RMSNorm, SwiGLU, interleaved partial RoPE) and GLM-130B style (DeepNorm, GeGLU).
FAMILIES = {"glm4": dict(num_kv_heads=2, norm="rmsnorm", mlp_activation="swiglu", position="rope",
                         rotary_fraction=0.5, rope_style="interleaved", tie_embeddings=False),
            "glm_130b": dict(residual="deepnorm", mlp_activation="geglu", position="rope")}


def config_of(family: str, **overrides) -> ModelConfig:
    return ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=48, max_position=64,
                       scan_layers=False, **FAMILIES[family], **overrides)


def trained_looking(params, seed: int = 1, scale: float = 0.3):
    """Adapter parameters as if trained: at init (zero up-projections, std-0.02 prompts) they would
    hide a wiring error."""
    base, adapters = split_adapters(params)
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [leaf + scale * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]
    return join_adapters(base, jax.tree_util.tree_unflatten(tree, moved))


def causal_rows(lengths: list[int], length: int, seed: int = 0):
    """One row of causal segments of the given lengths (then padding): tokens, positions, segments, prefix."""
    rng = np.random.default_rng(seed)
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(length - sum(lengths))])
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(length - sum(lengths))])
    tokens = rng.integers(0, V, length)
    return (tokens[None].astype(np.int32), np.stack([positions, np.zeros(length)])[None].astype(np.int32),
            segments[None].astype(np.int32), np.zeros((1, length), bool))


# ------------------------------------------------------------------ the model
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bottleneck_adapters_equal_an_independent_numpy_model_and_start_as_the_base(family):
    config = config_of(family)
    adapters = BottleneckAdapters(dim=5)
    model = adapters.model(config)
    fresh = nn.unbox(model.init(jax.random.key(0), *causal_rows([5], 8))["params"])
    inputs = causal_rows([6, 5], 14, seed=2)
    base = split_adapters(fresh)[0]
    # Zero up-projections: the adapted model computes its base exactly.
    np.testing.assert_array_equal(model.apply({"params": fresh}, *inputs), GLM(config).apply({"params": base}, *inputs))

    params = trained_looking(fresh)
    assert sorted(params["layers_0"]["mlp_adapter"]) == ["adapter_down", "adapter_down_bias", "adapter_up",
                                                        "adapter_up_bias"]
    got = model.apply({"params": params}, *inputs)
    want = reference_model.forward(adapters.model_config(config), jax.tree_util.tree_map(np.asarray, params), *inputs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(GLM(config).apply({"params": base}, *inputs))).max() > 1e-2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_soft_prompt_equals_prepending_it_to_every_segment(family):
    """Prompt tuning == the plain model on [prompt, segment] for every packed segment, where the prompt's
    P rows are extra embedding rows, bidirectional (a Part A of their own) and at position 0 (the
    identity rotation: the soft prompt carries no position), in the independent numpy GLM."""
    config = config_of(family)
    prompt = PromptTuning(length=P)
    model = prompt.model(config)
    params = trained_looking(nn.unbox(model.init(jax.random.key(0), *causal_rows([5], 8))["params"]))
    assert params["soft_prompt"].shape == (P, 32)
    lengths = [6, 5]
    got = np.asarray(model.apply({"params": params}, *causal_rows(lengths, 14, seed=3)))

    # The reference row: each segment behind its own copy of the prompt, as tokens V .. V + P - 1.
    tokens = causal_rows(lengths, 14, seed=3)[0][0]
    pieces, start = [], 0
    for n in lengths:
        pieces.append((np.arange(V, V + P), tokens[start:start + n]))
        start += n
    ref_tokens = np.concatenate([np.concatenate(p) for p in pieces])[None]
    ref_positions = np.concatenate([np.concatenate([np.zeros(P), np.arange(n)]) for n in lengths])
    ref_segments = np.concatenate([np.full(P + n, i + 1) for i, n in enumerate(lengths)])[None]
    ref_prefix = np.concatenate([np.arange(P + n) < P for n in lengths])[None]
    table = dict(params, embedding=np.concatenate([np.asarray(params["embedding"]), np.asarray(params["soft_prompt"])]))
    if not config.tie_embeddings:  # the extra rows are inputs only; their head columns are ignored
        table["lm_head"] = {"kernel": np.pad(np.asarray(params["lm_head"]["kernel"]), ((0, 0), (0, P)))}
    want = reference_model.forward(config.replace(vocab_size=V + P), jax.tree_util.tree_map(np.asarray, table),
                                   ref_tokens, np.stack([ref_positions, np.zeros_like(ref_positions)])[None],
                                   ref_segments, ref_prefix)[..., :V]
    rows = np.concatenate([P * (i + 1) + np.arange(sum(lengths[:i]), sum(lengths[:i + 1]))
                           for i in range(len(lengths))])
    np.testing.assert_allclose(got[0, :sum(lengths)], want[0, rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("adapter", [PromptTuning(length=P), BottleneckAdapters(dim=4)], ids=["prompt", "bottleneck"])
@pytest.mark.parametrize("mode", ["causal", pytest.param("blank", marks=pytest.mark.slow)])
def test_cached_decoding_with_the_method_equals_the_full_forward(adapter, mode):
    config = adapter.model_config(tiny_config("gqa2", "rope", scan=(mode == "blank")))
    generator = make_generator(config)
    generator.params = trained_looking(generator.params)
    check = check_blank_decode_matches_full_forward if mode == "blank" else check_causal_decode_matches_full_forward
    check(config, generator)


@pytest.mark.parametrize("adapter, names, count", [
    (PromptTuning(length=P), ["soft_prompt"], lambda c: P * c.hidden_size),
    (BottleneckAdapters(dim=4), [f"layers/{part}_adapter/adapter_{w}" for part in ("attention", "mlp")
                                 for w in ("down", "down_bias", "up", "up_bias")],
     lambda c: c.num_layers * 2 * (2 * c.hidden_size * 4 + 4 + c.hidden_size))], ids=["prompt", "bottleneck"])
def test_only_the_methods_parameters_train_and_their_count_is_the_closed_form(adapter, names, count):
    config = tiny_config("gqa2", "rope")
    adapters = nn.unbox(init_adapters(config, adapter, jax.random.key(0)))
    flat = {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]}
    assert sorted(flat) == sorted(names)
    assert count_adapter_params(adapters) == count(config) == adapter.model_config(config).num_params() - \
        config.num_params()

    frozen = nn.unbox(GLM(config).init(jax.random.key(1), *causal_rows([5], 8))["params"])
    frozen_before = jax.tree_util.tree_map(np.array, frozen)
    tx = optax.adam(1e-2)
    state = create_state(config, tx, jax.random.key(0), adapter)
    step = jax.jit(make_train_step(config, tx, optax.constant_schedule(1e-2), rules=(), adapter=adapter))
    batch = causal_batch(config)
    for _ in range(2):  # two steps: a zero up-projection moves first, its down-projection after
        state, metrics = step(state, batch, frozen)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                   state.params, nn.unbox(init_adapters(config, adapter, jax.random.key(0))))
    assert all(m > 0 for m in jax.tree_util.tree_leaves(moved)), moved
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, frozen, frozen_before))


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="PromptTuning.length 0 must be a whole number >= 1"):
        PromptTuning(length=0)
    with pytest.raises(ValueError, match="BottleneckAdapters.dim -2 must be a whole number >= 1"):
        BottleneckAdapters(dim=-2)
    with pytest.raises(ValueError, match="ModelConfig.adapter_dim is 1.5"):
        ModelConfig(adapter_dim=1.5)


# ------------------------------------------------------------------ runs
@pytest.fixture(scope="module", params=["prompt", "bottleneck"])
def method_run(request, tmp_path_factory):
    """(method, base run, adapter run trained 3 steps on it, its bindings)."""
    settings = {"prompt": ["train.adapter = 'prompt'", "PromptTuning.length = 4"],
                "bottleneck": ["train.adapter = 'bottleneck'", "BottleneckAdapters.dim = 4"]}[request.param]
    return (request.param, *adapter_run(tmp_path_factory, request.param, settings))


def test_a_method_run_saves_only_its_parameters_loads_with_its_base_and_refuses_merge(method_run, tmp_path):
    method, base_dir, run_dir, bindings = method_run
    checkpoints = RunDir(run_dir).checkpointer(read_only=True)
    saved = checkpoints.manager.item_metadata(3)["params"]
    checkpoints.close()
    if method == "prompt":
        assert list(saved) == ["soft_prompt"]
    else:
        assert list(saved) == ["layers"] and sorted(saved["layers"]) == ["attention_adapter", "mlp_adapter"]
    loaded, base = load_run(run_dir), load_run(base_dir)
    assert (loaded.model.prompt_len, loaded.model.adapter_dim) == ((4, 0) if method == "prompt" else (0, 4))
    plain = split_adapters(loaded.params)[0]
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, plain, base.params))

    generated = subprocess.run([sys.executable, "-m", "glm_jax", "generate", "--run_dir", str(run_dir),
                                "--prompt", "def f(x):", "--mode", "causal", "--max_new_tokens", "4"],
                               cwd=tmp_path, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr
    reason = {"prompt": "a soft prompt is extra input tokens", "bottleneck": "bottleneck adapters are nonlinear"}
    for command, message in ((["merge-lora", "--from", str(run_dir), "--out", "merged"], reason[method]),
                             (["export-hf", "--from", str(run_dir), "--out", "hf"], "export its base run")):
        refused = subprocess.run([sys.executable, "-m", "glm_jax", "convert", *command], cwd=tmp_path,
                                 env=subprocess_env(1), capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr, \
            refused.stderr
    field = {"prompt": "prompt_len", "bottleneck": "adapter_dim"}[method]
    with pytest.raises(ValueError, match=f"only its adapter run trains: set train.adapter = '{method}'"):
        experiment_lib.from_gin([], bindings + ["train.adapter = 'none'", "train.init_from = None",
                                                f"ModelConfig.{field} = 4"])

"""MHA -> GQA/MQA conversion: pooling math, identity and lossless cases, disk round trip, CLI, errors."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from glm_jax.convert.uptrain import ConversionError, convert_params, convert_run, pool_heads
from glm_jax.model import GLM, ModelConfig, example_inputs, init_params
from glm_jax.run_dir import RunDir, load_run
from train_fixtures import REPO, shared_run, subprocess_env, summary

H = 4


def mha_config(scan=True, **overrides):
    return ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=H, mlp_dim=64, position="rope",
                       rotary_fraction=0.5, rope_style="interleaved", scan_layers=scan, **overrides)


def random_inputs(rng):
    tokens, positions, segment_ids, prefix_mask = map(np.asarray, example_inputs(2, 7))
    tokens = rng.integers(0, 64, tokens.shape).astype(np.int32)
    prefix_mask = np.arange(7)[None].repeat(2, 0) < np.array([[3], [0]])
    return tokens, positions, segment_ids, prefix_mask


def logits(config, params, inputs):
    return np.asarray(GLM(config).apply({"params": params}, *inputs))


def kv_leaves(params):
    """{path: array} of every key / value projection parameter."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat
            if "'attention'" in jax.tree_util.keystr(p) and ("'key'" in jax.tree_util.keystr(p)
                                                            or "'value'" in jax.tree_util.keystr(p))}


def test_mean_pooling_equals_numpy_on_raw_arrays(rng):
    kernel = rng.normal(size=(3, 16, 8, 5)).astype(np.float32)  # [layers, embed, heads, head_dim]
    want = np.stack([np.stack([kernel[:, :, g * 4 + j, :] for j in range(4)]).mean(axis=0) for g in range(2)], axis=2)
    np.testing.assert_allclose(pool_heads(kernel, 2, "mean"), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(pool_heads(kernel, 2, "first"), kernel[:, :, [0, 4], :])
    bias = rng.normal(size=(8, 5)).astype(np.float32)
    np.testing.assert_allclose(pool_heads(bias, 1, "mean"), bias.mean(axis=0, keepdims=True), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scan", [True, False])
def test_identity_conversion_keeps_logits(scan, rng):
    config = mha_config(scan)
    params = nn.unbox(init_params(config, jax.random.key(0)))
    converted, target = convert_params(params, config, H, "mean")
    inputs = random_inputs(rng)
    np.testing.assert_allclose(logits(target, converted, inputs), logits(config, params, inputs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scan,groups", [(True, 2), (False, 1)])
def test_heads_identical_within_groups_convert_losslessly(scan, groups, rng):
    config = mha_config(scan)
    params = nn.unbox(init_params(config, jax.random.key(1)))
    per_group = H // groups

    def tie(path, leaf):  # every head copies the first head of its group
        name = jax.tree_util.keystr(path)
        if "'attention'" in name and ("'key'" in name or "'value'" in name):
            leaf = np.asarray(leaf)
            return np.repeat(leaf[..., ::per_group, :], per_group, axis=-2)
        return leaf

    tied = jax.tree_util.tree_map_with_path(tie, params)
    inputs = random_inputs(rng)
    for method in ("mean", "first"):
        converted, target = convert_params(tied, config, groups, method)
        assert target.num_kv_heads == groups
        np.testing.assert_allclose(logits(target, converted, inputs), logits(config, tied, inputs), rtol=1e-5, atol=1e-6)


def test_first_and_random_values_and_untouched_projections():
    config = mha_config(scan=True)
    params = nn.unbox(init_params(config, jax.random.key(2)))
    first, target = convert_params(params, config, 2, "first")
    random, _ = convert_params(params, config, 2, "random", seed=7)
    fresh = nn.unbox(init_params(target, jax.random.key(7)))
    source, got_first, got_random, want_random = map(kv_leaves, (params, first, random, fresh))
    for name, array in source.items():
        assert got_first[name].shape == got_random[name].shape == array.shape[:-2] + (2,) + array.shape[-1:]
        np.testing.assert_array_equal(got_first[name], array[..., [0, 2], :])
        np.testing.assert_array_equal(got_random[name], want_random[name])
    untouched = lambda p: {k: v for k, v in jax.tree_util.tree_flatten_with_path(p)[0]  # noqa: E731
                           if jax.tree_util.keystr(k) not in source}
    for converted in (first, random):
        for (path, a), (_, b) in zip(untouched(params).items(), untouched(converted).items()):
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_conversion_errors():
    config = mha_config()
    params = nn.unbox(init_params(config, jax.random.key(0)))
    with pytest.raises(ConversionError, match="must divide the 4 query heads"):
        convert_params(params, config, 3)
    with pytest.raises(ConversionError, match="fewer than the 4 asked for"):
        convert_params(params, config.replace(num_kv_heads=2), 4)
    with pytest.raises(ConversionError, match="unknown"):
        convert_params(params, config, 2, "median")
    grouped = ModelConfig(vocab_size=64, hidden_size=48, num_layers=1, num_heads=6, num_kv_heads=3, mlp_dim=32)
    with pytest.raises(ConversionError, match="already grouped with 3 KV heads"):
        convert_params(nn.unbox(init_params(grouped, jax.random.key(0))), grouped, 2)


def test_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="train one with glm_jax.train"):
        RunDir.resolve(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    return shared_run(tmp_path_factory, "convert", 4, ["ModelConfig.num_kv_heads = 4",
                                                       "train.checkpoint_every = 4"]) / "run"


def test_disk_round_trip_then_uptraining(source_run, tmp_path, rng):
    out = tmp_path / "gqa2"
    provenance = convert_run(source_run / "checkpoints" / "4", 2, "mean", out, alpha=0.5)
    assert provenance["source_step"] == 4 and provenance["method"] == "mean" and provenance["uptrain_steps"] == 2
    assert json.loads((out / "provenance.json").read_text())["num_kv_heads"] == 2
    assert (out / "tokenizer.model").read_bytes() == (source_run / "tokenizer.model").read_bytes()

    source, converted = load_run(source_run), load_run(out)
    assert converted.step == 0 and converted.experiment.model.num_kv_heads == 2
    in_memory, target = convert_params(source.params, source.experiment.model, 2, "mean")
    inputs = random_inputs(rng)
    inputs = (inputs[0] % 400,) + inputs[1:]
    np.testing.assert_allclose(logits(converted.experiment.model, converted.params, inputs),
                               logits(target, in_memory, inputs), rtol=1e-6, atol=1e-6)

    # The converted run uptrains from step 0 for alpha x 4 = 2 steps.
    from glm_jax.train.loop import train

    result = train(RunDir(out).read_experiment())
    assert len(result["losses"]) == 2 and load_run(out).step == 2
    assert summary(out)["losses"] == result["losses"]


def test_calibrated_conversion_of_a_run_uses_its_own_data(source_run, tmp_path, rng):
    """--grouping similarity --method aligned: calibrated on the source's training data (seed + 2), recorded in
    provenance.json, and the written run is the in-memory conversion with the same calibration."""
    from glm_jax.convert.calibration import calibration_batches, kv_activations

    out = tmp_path / "aligned"
    provenance = convert_run(source_run, 2, "aligned", out, grouping="similarity", calibration_batches=2)
    assert provenance["grouping"] == "similarity" and provenance["method"] == "aligned"
    source, converted = load_run(source_run), load_run(out)
    batches = calibration_batches(source.experiment.data, source.experiment.objective, source.tokenizer, 2)
    real_tokens = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert provenance["calibration_tokens"] == min(real_tokens, 4096) > 0
    calibration = kv_activations(source.params, source.experiment.model, batches)
    in_memory, target = convert_params(source.params, source.experiment.model, 2, "aligned", grouping="similarity",
                                       calibration=calibration)
    inputs = random_inputs(rng)
    inputs = (inputs[0] % 400,) + inputs[1:]
    np.testing.assert_allclose(logits(converted.experiment.model, converted.params, inputs),
                               logits(target, in_memory, inputs), rtol=1e-6, atol=1e-6)
    assert "contiguous groups" not in (out / "config.gin").read_text()


def test_convert_cli(source_run, tmp_path):
    command = [sys.executable, "-m", "glm_jax", "convert", "uptrain", f"--from={source_run}", "--num_kv_heads=1",
               "--method=random", f"--out={tmp_path / 'mqa'}"]
    recipe = ["--gin.uptrain_recipe.learning_rate_from='final'", "--gin.uptrain_recipe.schedule='constant'"]
    result = subprocess.run(command + recipe, capture_output=True, text=True, env=subprocess_env(1), cwd=REPO,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    provenance = json.loads(result.stdout)
    assert provenance["num_kv_heads"] == 1 and provenance["recipe"]["schedule"] == "constant"
    optimizer = RunDir(tmp_path / "mqa").read_experiment().optimizer
    source = RunDir(source_run).read_experiment().optimizer
    assert optimizer.learning_rate == pytest.approx(source.learning_rate * source.min_lr_ratio)
    assert optimizer.min_lr_ratio == 1.0 and provenance["learning_rate"] == optimizer.learning_rate
    assert "ModelConfig.num_kv_heads = 1" in (tmp_path / "mqa" / "config.gin").read_text()
    again = subprocess.run(command[:-1] + [f"--out={tmp_path / 'bad'}", "--num_kv_heads=3"], capture_output=True,
                           text=True, env=subprocess_env(1), cwd=REPO, timeout=300)
    assert again.returncode == 2 and "must divide the 4 query heads" in again.stderr


def test_uptrain_recipe_knobs_set_the_schedule_and_bad_ones_are_explained():
    from glm_jax.convert.uptrain import read_recipe
    from glm_jax.optim import OptimizerConfig, learning_rate_schedule

    source = OptimizerConfig(learning_rate=1e-3, min_lr_ratio=0.1)
    shipped = read_recipe()  # the source's final learning rate (1e-3 x 0.1), held constant
    assert shipped.learning_rate(source) == pytest.approx(1e-4)
    assert "OptimizerConfig.min_lr_ratio = 1.0" in shipped.optimizer_bindings(source)
    recipe = read_recipe(bindings=["uptrain_recipe.learning_rate_from = 'final'",
                                   "uptrain_recipe.learning_rate_scale = 0.5", "uptrain_recipe.schedule = 'constant'",
                                   "uptrain_recipe.warmup_fraction = 0.2"])
    assert recipe.learning_rate(source) == pytest.approx(5e-5)
    bindings = dict(b.split(" = ") for b in recipe.optimizer_bindings(source))
    uptrain = OptimizerConfig(learning_rate=float(bindings["OptimizerConfig.learning_rate"]),
                              warmup_fraction=float(bindings["OptimizerConfig.warmup_fraction"]),
                              min_lr_ratio=float(bindings["OptimizerConfig.min_lr_ratio"]))
    schedule = learning_rate_schedule(uptrain, 10)
    assert float(schedule(0)) == 0.0 and float(schedule(1)) == pytest.approx(2.5e-5)  # two warmup steps
    assert [float(schedule(i)) for i in range(2, 10)] == pytest.approx([5e-5] * 8)  # then constant
    cosine = read_recipe(bindings=["uptrain_recipe.schedule = 'cosine'"])
    assert "OptimizerConfig.min_lr_ratio = 1.0" not in cosine.optimizer_bindings(source)
    for binding, message in (("learning_rate_from = 'last'", "'peak'.*or 'final'"),
                             ("schedule = 'linear'", "'cosine' or 'constant'"),
                             ("learning_rate_scale = 0.0", "must be positive"),
                             ("warmup_fraction = 1.0", r"must be in \[0, 1\)")):
        with pytest.raises(ConversionError, match=message):
            read_recipe(bindings=[f"uptrain_recipe.{binding}"])

"""LoRA through qwix: where adapters go, how many parameters they add (closed form), that a fresh
adapter changes nothing, that merged weights compute exactly what base + adapters compute."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

pytest.importorskip("qwix")
# qwix 0.1.x still calls flax's renamed nnx.VariableState alias (a DeprecationWarning per call).
pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")

from glm_jax import experiment as experiment_lib  # noqa: E402
from glm_jax.model import GLM, ModelConfig, init_params  # noqa: E402
from glm_jax.model.adapters import count_adapter_params, join_adapters, split_adapters  # noqa: E402
from glm_jax.model.adapters import init_adapted_params  # noqa: E402
from glm_jax.model.lora import LoraConfig, lora_model, merge_adapters  # noqa: E402
from glm_jax.run_dir import RunDir, load_run  # noqa: E402
from glm_jax.train.state import create_state  # noqa: E402
from glm_jax.train.step import make_train_step  # noqa: E402
from train_fixtures import adapter_run, causal_batch, subprocess_env, train_in_process  # noqa: E402

E, H, G, D, F, L = 32, 4, 2, 8, 64, 2


def config(**overrides) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 64, "hidden_size": E, "num_layers": L, "num_heads": H, "num_kv_heads": G,
                          "mlp_dim": F, "position": "rope", **overrides})


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 64, (2, 12)).astype(np.int32)
    positions = np.broadcast_to(np.stack([np.arange(12), np.zeros(12, int)]), (2, 2, 12)).astype(np.int32)
    return tokens, positions, np.ones((2, 12), np.int32), np.zeros((2, 12), bool)


def with_random_b(params, seed: int = 1):
    """Adapters as if trained: B is zero at init, which would hide any merge error."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    keys = iter(jax.random.split(jax.random.key(seed), len(leaves)))

    def fill(path, leaf):
        key = next(keys)
        name = str(path[-1].key)
        return 0.05 * jax.random.normal(key, leaf.shape, leaf.dtype) if name.endswith("_lora_b") else leaf
    return jax.tree_util.tree_map_with_path(fill, params)


def test_adapters_sit_beside_their_kernels_with_the_closed_form_count():
    lora = LoraConfig(rank=2, alpha=4.0)
    params = init_adapted_params(config(), lora, jax.random.key(0))
    attention = params["layers"]["attention"]
    assert attention["query"]["kernel_lora_a"].shape == (L, E, 2)
    assert attention["query"]["kernel_lora_b"].shape == (L, 2, H * D)
    assert attention["value"]["kernel_lora_b"].shape == (L, 2, G * D)
    assert "kernel_lora_a" not in attention["key"] and "kernel_lora_a" not in attention["out"]
    r = lora.rank
    assert count_adapter_params(params) == L * ((E * r + r * H * D) + (E * r + r * G * D))
    base, adapters = split_adapters(params)
    plain = nn.unbox(init_params(config(), jax.random.key(0)))
    assert jax.tree_util.tree_structure(base) == jax.tree_util.tree_structure(plain)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, join_adapters(base, adapters), params))


def test_fresh_adapters_leave_the_function_unchanged():
    lora = LoraConfig(rank=4)
    params = init_adapted_params(config(), lora, jax.random.key(0))
    base, _ = split_adapters(params)
    got = lora_model(config(), lora).apply({"params": params}, *inputs())
    want = GLM(config()).apply({"params": base}, *inputs())
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("targets, overrides", [
    (("attention/query", "attention/value"), {}),
    (("attention/out", "mlp/wi", "mlp/wo", "attention/key"), {"mlp_activation": "swiglu"}),
    (("attention/(query|value)",), {"scan_layers": False}),
])
def test_merged_weights_compute_base_plus_adapters(targets, overrides):
    lora = LoraConfig(rank=3, alpha=5.0, targets=targets)
    cfg = config(**overrides)
    params = with_random_b(init_adapted_params(cfg, lora, jax.random.key(0)))
    unmerged = lora_model(cfg, lora).apply({"params": params}, *inputs())
    merged = GLM(cfg).apply({"params": merge_adapters(params, lora)}, *inputs())
    base = GLM(cfg).apply({"params": split_adapters(params)[0]}, *inputs())
    assert np.abs(np.asarray(unmerged) - np.asarray(base)).max() > 1e-3  # the adapters do something
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_lora_dropout_draws_a_mask_per_key_inside_the_adapter_path_only(scan_layers):
    """LoraConfig.dropout runs in the scanned layer stack (it once lacked the stack's dropout stream)
    and in plain layers; it drops the adapters' input only: with B = 0 the model is its base exactly."""
    lora = LoraConfig(rank=3, alpha=5.0, dropout=0.5)
    cfg = config(scan_layers=scan_layers)
    fresh = init_adapted_params(cfg, lora, jax.random.key(0))
    trained = with_random_b(fresh)
    model = lora_model(cfg, lora)

    def forward(params, key=None, adapter=model):
        return np.asarray(adapter.apply({"params": params}, *inputs(),
                                        rngs=None if key is None else {"dropout": jax.random.key(key)}))

    base = GLM(cfg).apply({"params": split_adapters(fresh)[0]}, *inputs())
    np.testing.assert_allclose(forward(fresh, 0), base, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(forward(trained, 0), forward(trained, 0))
    assert np.abs(forward(trained, 0) - forward(trained, 1)).max() > 1e-3  # another key, another mask
    evaluation = forward(trained, adapter=lora_model(cfg, lora.for_evaluation()))
    assert np.abs(forward(trained, 0) - evaluation).max() > 1e-3


def test_a_lora_train_step_with_dropout_moves_every_adapter():
    lora, cfg = LoraConfig(rank=2, dropout=0.1), config()
    tx = optax.adam(1e-2)
    state = create_state(cfg, tx, jax.random.key(0), lora)
    frozen = split_adapters(init_adapted_params(cfg, lora, jax.random.key(0)))[0]
    step = jax.jit(make_train_step(cfg, tx, optax.constant_schedule(1e-2), rules=(), adapter=lora, seed=3))
    before = jax.tree_util.tree_map(np.array, state.params)
    for _ in range(2):
        state, metrics = step(state, causal_batch(cfg), frozen)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, before)
    assert all(m > 0 for m in jax.tree_util.tree_leaves(moved)), moved


def test_a_target_that_matches_no_projection_is_named():
    with pytest.raises(ValueError, match=r"LoRA targets \['attention/qkv'\] match no projection"):
        init_adapted_params(config(), LoraConfig(targets=("attention/query", "attention/qkv")), jax.random.key(0))


@pytest.mark.parametrize("changes, words", [({"rank": 0}, "rank 0"), ({"alpha": 0.0}, "alpha 0.0"),
                                            ({"targets": ()}, "targets is empty"), ({"dropout": 1.0}, "dropout 1.0")])
def test_bad_lora_settings_are_clear_errors(changes, words):
    with pytest.raises(ValueError, match=words):
        LoraConfig(**changes)


# ------------------------------------------------------------------ LoRA runs
@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """(base run, LoRA run trained 3 steps on it, its bindings): rank 2 on query and value."""
    return adapter_run(tmp_path_factory, "lora", ["train.adapter = 'lora'", "LoraConfig.rank = 2"])


def _flat(tree) -> dict:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_a_lora_run_trains_and_saves_only_adapters_and_its_base_stays_bit_identical(lora_runs):
    base_dir, lora_dir, _ = lora_runs
    run = RunDir(lora_dir)
    experiment = run.read_experiment()
    checkpoints = run.checkpointer(read_only=True)
    saved = _flat(checkpoints.manager.item_metadata(3)["params"])
    checkpoints.close()
    assert saved and all(name.endswith(("_lora_a", "_lora_b")) for name in saved)  # adapters alone
    adapters, step = run.restore_adapters(experiment)
    r, tiny = 2, experiment.model
    e, h, g, d, layers = tiny.hidden_size, tiny.num_heads, tiny.num_kv_heads, tiny.head_dim, tiny.num_layers
    assert step == 3 and count_adapter_params(adapters) == layers * ((e * r + r * h * d) + (e * r + r * g * d))
    assert all(np.abs(np.asarray(leaf)).max() > 0 for name, leaf in _flat(adapters).items() if name.endswith("_b"))

    base = _flat(load_run(base_dir).params)
    merged = _flat(load_run(lora_dir).params)  # a LoRA run loads as base + adapters, merged
    assert merged.keys() == base.keys()
    adapted = {"layers/attention/query/kernel", "layers/attention/value/kernel"}
    for name in base:
        same = np.array_equal(np.asarray(merged[name]), np.asarray(base[name]))
        assert same != (name in adapted), name  # frozen weights bit for bit; adapted kernels moved

    inputs_ = inputs()
    tokens = inputs_[0] % tiny.vocab_size
    unmerged = lora_model(tiny, experiment.adapters).apply(
        {"params": join_adapters(load_run(base_dir).params, adapters)}, tokens, *inputs_[1:])
    np.testing.assert_allclose(GLM(tiny).apply({"params": load_run(lora_dir).params}, tokens, *inputs_[1:]),
                               unmerged, rtol=1e-5, atol=1e-5)


def test_a_lora_run_resumes_and_merges_into_a_plain_run(lora_runs, tmp_path):
    _, lora_dir, bindings = lora_runs
    copy = tmp_path / "lora"
    shutil.copytree(lora_dir, copy)
    before, _ = RunDir(copy).restore_adapters(RunDir(copy).read_experiment())
    summary = train_in_process(bindings + [f"RUN_DIR = '{copy}'", "STEPS = 5"])  # resumes at step 3
    after, step = RunDir(copy).restore_adapters(RunDir(copy).read_experiment())
    assert step == 5 and np.isfinite(summary["final_train_loss"])
    assert not jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, before, after))
    result = subprocess.run([sys.executable, "-m", "glm_jax", "convert", "merge-lora", "--from", "lora", "--out",
                             "merged"], cwd=tmp_path, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    merged, lora = load_run(tmp_path / "merged"), load_run(copy)
    assert merged.experiment.train.adapter == "none" and merged.experiment.train.init_from is None
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, merged.params, lora.params))
    assert RunDir(tmp_path / "merged").provenance()["adapter_base"]["step"] == 2
    again = subprocess.run([sys.executable, "-m", "glm_jax", "convert", "merge-lora", "--from", "merged", "--out",
                            "twice"], cwd=tmp_path, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "is not a LoRA run" in again.stderr


def test_adapters_whose_base_changed_are_refused_naming_both(lora_runs, tmp_path):
    base_dir, lora_dir, _ = lora_runs
    copy = tmp_path / "lora"
    shutil.copytree(lora_dir, copy)
    record = json.loads((copy / "adapter_base.json").read_text())
    (copy / "adapter_base.json").write_text(json.dumps({**record, "params_checksum": "0123456789abcdef"}))
    with pytest.raises(ValueError, match=f"adapters of {copy} were trained on {base_dir} step 2"):
        load_run(copy)
    (copy / "adapter_base.json").write_text(json.dumps({**record, "run": str(tmp_path / "moved")}))
    with pytest.raises(FileNotFoundError, match=f"belong to the base run {tmp_path / 'moved'} step 2, which is gone"):
        load_run(copy)


def test_lora_settings_that_cannot_train_are_refused(lora_runs, tmp_path):
    _, _, bindings = lora_runs
    with pytest.raises(ValueError, match="set train.init_from"):
        experiment_lib.from_gin([], bindings + ["train.init_from = None"])
    with pytest.raises(ValueError, match=r"LoRA targets \['attention/qkv'\] match no projection"):
        train_in_process(bindings + ["LoraConfig.targets = ('attention/qkv',)", f"RUN_DIR = '{tmp_path}/never'"])
    assert not (tmp_path / "never").exists()


def test_the_preflight_compiles_the_lora_step_with_adapter_state_only(lora_runs):
    from glm_jax.train.preflight import compile_train_step

    _, _, bindings = lora_runs
    lora = experiment_lib.from_gin([], bindings)
    full = lora.replace(train=dataclasses.replace(lora.train, adapter="none"))
    sizes = {name: compile_train_step(jax.devices(), e).memory_analysis().argument_size_in_bytes
             for name, e in (("lora", lora), ("full", full))}
    params = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(
        nn.unbox(jax.eval_shape(lambda: init_params(lora.model, jax.random.key(0))))))
    # per device: full = params + 2 Adam moments; LoRA = the frozen params + adapters and their moments
    assert params / len(jax.devices()) < sizes["lora"] < 0.5 * sizes["full"]

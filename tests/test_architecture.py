"""The architecture's seams: the layering contract, the experiment object, the batch schema,
equal micro-batch shares on a mesh, and the package working from an installed wheel."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from data_fixtures import write_text_corpus
from glm_jax import experiment as experiment_lib
from glm_jax.data import batch as batch_schema
from glm_jax.parallel.batch import abstract_batch, batch_shardings, split_micro_batches
from glm_jax.parallel.mesh import MeshConfig, make_mesh
from train_fixtures import REPO, TINY_BINDINGS, subprocess_env

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(package_parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
                          capture_output=True, text=True, env=env, cwd=package_parent)


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is part of the test extra")
def test_layering_contract_holds_and_catches_a_violation(tmp_path):
    kept = _lint(REPO)
    assert kept.returncode == 0, kept.stdout[-3000:]
    assert "2 kept, 0 broken" in kept.stdout
    # The same contract on a copy where inference reaches into training: it must break.
    shutil.copytree(REPO / "glm_jax", tmp_path / "glm_jax", ignore=shutil.ignore_patterns("__pycache__"))
    cache = tmp_path / "glm_jax" / "infer" / "cache.py"
    cache.write_text(cache.read_text() + "\nfrom glm_jax.train.state import TrainState  # noqa\n")
    broken = _lint(tmp_path)
    assert broken.returncode != 0 and "glm_jax.infer.cache -> glm_jax.train.state" in broken.stdout


def test_experiment_from_gin_is_explicit_and_leaves_gin_clean():
    import gin

    main = experiment_lib.from_gin([REPO / "experiments/configs/glm_tiny_stdlib.gin"], ["STEPS = 7"])
    assert main.train.steps == 7 and main.train.run_dir == "runs/glm_tiny_stdlib"
    assert main.model.hidden_size == 256 and main.data.seq_len == 256 and main.optimizer.learning_rate == 1e-3
    assert main.objective.token == 1.0 and main.mesh.fsdp == -1
    assert "ModelConfig.hidden_size = 256" in main.gin_text and "train.steps = %STEPS" in main.gin_text
    assert gin.config_str() == ""  # nothing leaks into gin's global state
    # The operative text rebuilds the same experiment (what a run directory's config.gin does).
    assert experiment_lib.from_gin_text(main.gin_text).replace(gin_text="") == main.replace(gin_text="")
    with pytest.raises(ValueError, match="train.sharding 'zero'"):
        experiment_lib.from_gin(["base.gin"], ["RUN_DIR = 'r'", "STEPS = 1", "train.sharding = 'zero'"])


def test_batch_schema_matches_what_the_pipeline_yields():
    from data_fixtures import small_tokenizer
    from glm_jax.data import objectives, packing

    tokenizer = small_tokenizer()
    rng = np.random.default_rng(0)
    examples = [objectives.blank_infill(np.arange(20, 60), rng, tokenizer.specials, "token") for _ in range(3)]
    rows = packing.pack(examples, 128, tokenizer.specials.pad)
    batch = batch_schema.stack_rows(rows)
    # The batch contract of docs/design.md, written out independently of the schema.
    contract = {"tokens": ((128,), np.int32), "targets": ((128,), np.int32), "loss_mask": ((128,), np.float32),
                "positions": ((2, 128), np.int32), "segment_ids": ((128,), np.int32),
                "prefix_mask": ((128,), np.bool_)}
    assert set(batch) == set(batch_schema.NAMES) == set(contract)
    for name, (row_shape, dtype) in contract.items():
        assert batch[name].shape == (len(rows), *row_shape) and batch[name].dtype == dtype, name
        assert batch_schema.batch_shapes(len(rows), 128)[name] == ((len(rows), *row_shape), dtype), name
    assert batch_schema.MODEL_INPUTS == ("tokens", "positions", "segment_ids", "prefix_mask")
    mesh = make_mesh(MeshConfig(2, 4, 1))
    abstract = abstract_batch(mesh, 8, 128)
    assert abstract["positions"].shape == (8, 2, 128)
    # Rows over data x fsdp; the length axis over 'sequence' (one device here: nothing split).
    assert abstract["positions"].sharding.spec == PartitionSpec(("data", "fsdp"), None, "sequence")
    assert batch_shardings(mesh)["tokens"].spec == PartitionSpec(("data", "fsdp"), "sequence")


def test_micro_batches_give_every_device_an_equal_local_share():
    mesh = make_mesh(MeshConfig(2, 4, 1))  # 8 devices hold the rows
    rows, micro, length = 32, 4, 16
    tokens = np.arange(rows * length, dtype=np.int32).reshape(rows, length)
    sharded = jax.device_put(tokens, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    with jax.set_mesh(mesh):
        split = jax.jit(lambda x: split_micro_batches({"tokens": x}, micro)["tokens"])
        out = split(sharded)
        hlo = split.lower(sharded).compile().as_text()
    np.testing.assert_array_equal(np.asarray(out), tokens.reshape(rows // micro, micro, length).swapaxes(0, 1))
    # Every device holds 1 row of each of the 4 micro-batches, and those are rows it already had.
    per_device = rows // mesh.size
    for shard in out.addressable_shards:
        assert shard.data.shape == (micro, rows // micro // mesh.size, length)
        device_rows = set(np.asarray(shard.data)[:, :, 0].ravel() // length)
        own = {r for s in sharded.addressable_shards if s.device == shard.device
               for r in range(s.index[0].start, s.index[0].start + per_device)}
        assert device_rows == own
    assert not any(op in hlo for op in ("all-to-all", "collective-permute", "all-gather"))


@pytest.fixture
def installed_wheel(tmp_path):
    """A fresh virtual environment outside the source tree with the glm_jax wheel installed.

    The dependencies come from the test environment (a .pth file), glm_jax itself only from the wheel.
    """
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                                *map(str, wheels.glob("glm_jax-*.whl"))], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


def test_installed_wheel_loads_every_preset_and_trains_two_steps(installed_wheel, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**subprocess_env(2), "PYTHONPATH": ""}
    python = str(installed_wheel / "bin" / "python")
    check = ("import glm_jax, glm_jax.experiment as e; print(glm_jax.__file__); "
             "names = e.preset_names(); [e.load_preset(n) for n in names]; print(' '.join(names))")
    loaded = subprocess.run([python, "-c", check], capture_output=True, text=True, env=env, cwd=work)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    where, names = loaded.stdout.splitlines()
    assert str(installed_wheel) in where and str(REPO) not in where
    assert set(names.split()) >= {"glm_tiny", "glm_large", "glm_10b", "glm_130b", "chatglm_6b", "chatglm2_6b",
                                  "glm4_9b"}
    # A user's experiment file includes the shipped configs by their short names.
    write_text_corpus(work, count=150)
    (work / "mine.gin").write_text("\n".join(TINY_BINDINGS + [
        "include 'objectives/glm_large.gin'", "include 'meshes/fsdp.gin'",
        "DataConfig.source = 'text:part*.txt'", "DataConfig.cache_dir = 'cache'", "DataConfig.num_shards = None",
        "RUN_DIR = 'runs/mine'", "STEPS = 2"]) + "\n")
    trained = subprocess.run([str(installed_wheel / "bin" / "glm_jax"), "train", "--gin_file=mine.gin"],
                             capture_output=True, text=True, env=env, cwd=work, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "done: train loss" in trained.stdout
    assert (work / "runs" / "mine" / "checkpoints" / "2").is_dir()


def test_command_line_lists_its_commands_and_rejects_unknown_ones(capsys):
    from glm_jax import cli

    assert cli.main([]) == 2 and "train" in capsys.readouterr().out
    assert cli.main(["fly"]) == 2 and "unknown command 'fly'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--gin_file=base.gin", "--gin.STEPS"])
    assert exit_info.value.code == 2 and "--gin.NAME=VALUE" in capsys.readouterr().err

"""Helpers for training tests: a tiny experiment on a generated corpus, run in or out of process."""

import fcntl
import json
import math
import os
import sys
from pathlib import Path

from data_fixtures import write_text_corpus
from xla_flags import FAST_COMPILE
from glm_jax import experiment as experiment_lib

REPO = Path(__file__).resolve().parents[1]

TINY_BINDINGS = [
    "include 'base.gin'",
    "ModelConfig.vocab_size = 512", "ModelConfig.hidden_size = 32", "ModelConfig.num_layers = 2",
    "ModelConfig.num_heads = 4", "ModelConfig.num_kv_heads = 2", "ModelConfig.mlp_dim = 64",
    "ModelConfig.max_position = 128",
    "DataConfig.seq_len = 64", "DataConfig.batch_size = 8", "DataConfig.vocab_size = 400",
    "DataConfig.group_size = 8", "DataConfig.eval_fraction = 0.1", "DataConfig.num_shards = 2",
    "OptimizerConfig.learning_rate = 3e-3", "OptimizerConfig.warmup_steps = 2",
    "train.eval_batches = 1", "train.eval_every = 1000",
]


def experiment(tmp_path: Path, run_name: str, steps: int, extra=()) -> list[str]:
    corpus_dir = tmp_path / "corpus"
    if not corpus_dir.exists():
        corpus_dir.mkdir()
        write_text_corpus(corpus_dir, count=150)
    return TINY_BINDINGS + [
        f"DataConfig.source = 'text:{corpus_dir}/*.txt'", f"DataConfig.cache_dir = '{tmp_path / 'cache'}'",
        f"RUN_DIR = '{tmp_path / run_name}'", f"STEPS = {steps}", *extra]


def shared_run(tmp_path_factory, name: str, steps: int, extra=()) -> Path:
    """A directory holding a trained tiny run `run` (and its corpus), trained once per test session.

    pytest-xdist workers share it (the first trains it under a lock; the others wait), so a
    module fixture costs one training however its tests are spread. Tests must not modify it.
    """
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's, shared by workers
    directory = root / f"shared_{name}"
    with open(root / f"shared_{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / "run" / "summary.json").is_file():
            directory.mkdir(exist_ok=True)
            train_in_process(experiment(directory, "run", steps, extra))
    return directory


def adapter_run(tmp_path_factory, name: str, settings: list[str], steps: int = 3):
    """(base run, adapter run trained `steps` steps on it, its bindings): `settings` pick the method
    (train.adapter and its knobs) on the shared tiny base run, at learning rate 1e-2."""
    shared = shared_run(tmp_path_factory, "text_tiny", steps=2)
    work = tmp_path_factory.mktemp(name)
    bindings = experiment(shared, "unused", steps, [f"RUN_DIR = '{work / name}'", f"train.init_from = '{shared / 'run'}'",
                                                    "OptimizerConfig.learning_rate = 1e-2", *settings])
    summary = train_in_process(bindings)
    assert math.isfinite(summary["final_train_loss"])
    return shared / "run", work / name, bindings


def train_in_process(bindings: list[str]) -> dict:
    from glm_jax.train.loop import train

    return train(experiment_lib.from_gin([], bindings))


def train_command(bindings: list[str]) -> list[str]:
    return [sys.executable, "-m", "glm_jax", "train", "--gin_file=base.gin",
            *[f"--gin_param={b}" for b in bindings if not b.startswith("include")]]


def subprocess_env(devices: int, fast_compile: bool = True) -> dict:
    """The test run's environment for a command-line run on `devices` simulated devices; fast_compile=False
    leaves out the test-only compile flags (xla_flags.py) for runs whose learned quality is measured."""
    env = dict(os.environ)
    dropped = ("--xla_force_host_platform_device_count",) + (() if fast_compile else tuple(FAST_COMPILE))
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(dropped)]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def causal_batch(config, batch: int = 2, length: int = 12) -> dict:
    """A training batch of random tokens, one causal segment per row, every target scored."""
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (batch, length)).astype(np.int32)
    positions = np.broadcast_to(np.stack([np.arange(length), np.zeros(length, int)]), (batch, 2, length))
    return {"tokens": tokens, "positions": positions.astype(np.int32), "segment_ids": np.ones_like(tokens),
            "prefix_mask": np.zeros_like(tokens, bool), "targets": np.roll(tokens, -1, axis=1),
            "loss_mask": np.ones_like(tokens, np.float32)}

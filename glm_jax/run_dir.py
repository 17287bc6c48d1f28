"""A run directory: the one owner of its layout, written and read by training, conversion,
generation and evaluation alike.

    RUN/config.gin        the operative gin config (glm_jax.experiment reads it back)
    RUN/tokenizer.model   the SentencePiece model with the GLM specials (trained here), or
    RUN/tokenizer.json    an imported checkpoint's Hugging Face tokenizer (+ tokenizer_config.json), or
    RUN/tokenizer.model   + tokenizer_config.json naming ChatGLMTokenizer: an imported ChatGLM2/3 tokenizer
    RUN/summary.json      the last training session's summary
    RUN/provenance.json   where a converted or imported run came from
    RUN/adapter_base.json an adapter run's frozen base (train.adapter): its run directory, step and
                          the checksum of its parameters (the checkpoints hold only the adapters)
    RUN/tensorboard/      training events
    RUN/checkpoints/STEP/ params, opt_state, meta, config (glm_jax.checkpoint)
    RUN/checkpoints_damaged/STEP/  steps that failed to restore, moved aside by training

Paths are made absolute on entry, so relative run directories work everywhere
(Orbax accepts only absolute paths).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import flax.linen as nn
import jax

from glm_jax import experiment as experiment_lib
from glm_jax.checkpoint import Checkpointer, DamagedCheckpoint
from glm_jax.data.tokenizer import Tokenizer, load_tokenizer_file
from glm_jax.model import ModelConfig, abstract_params
from glm_jax.model.adapters import init_adapters, join_adapters


@dataclasses.dataclass
class Run:
    """A run read back: its experiment, tokenizer and the parameters of one checkpoint."""

    directory: Path
    experiment: experiment_lib.Experiment
    tokenizer: Tokenizer
    params: object
    step: int

    @property
    def model(self) -> ModelConfig:
        """The architecture `params` are for (a P-tuning run's has its learned prefix)."""
        return self.experiment.adapted_model


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().absolute()

    config_path = property(lambda self: self.path / "config.gin")
    hf_tokenizer_path = property(lambda self: self.path / "tokenizer.json")
    summary_path = property(lambda self: self.path / "summary.json")
    provenance_path = property(lambda self: self.path / "provenance.json")
    adapter_base_path = property(lambda self: self.path / "adapter_base.json")
    tensorboard_path = property(lambda self: self.path / "tensorboard")
    checkpoints_path = property(lambda self: self.path / "checkpoints")
    damaged_checkpoints_path = property(lambda self: self.path / "checkpoints_damaged")

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def resolve(cls, path: str | Path) -> tuple["RunDir", int | None]:
        """A run directory, its checkpoints/ folder or one step folder (RUN/checkpoints/STEP) -> (run, step or None)."""
        path = Path(path).expanduser().absolute()
        if (path / "config.gin").is_file():
            return cls(path), None
        if path.name == "checkpoints" and (path.parent / "config.gin").is_file():
            return cls(path.parent), None
        if path.name.isdigit() and (path.parent.parent / "config.gin").is_file():
            return cls(path.parent.parent), int(path.name)
        raise FileNotFoundError(f"{path} is not a run directory (with config.gin and checkpoints/) or a checkpoint "
                                "step inside one (RUN/checkpoints/STEP); train one with glm_jax.train first")

    @classmethod
    def holding_config(cls, gin_file: str | Path) -> "RunDir | None":
        """The run directory whose own config.gin `gin_file` is (it has checkpoints/ beside it), else None."""
        path = Path(gin_file).expanduser().absolute()
        if path.name == "config.gin" and (path.parent / "checkpoints").is_dir():
            return cls(path.parent)
        return None

    # ------------------------------------------------------------ what a run is
    def write_config(self, gin_text: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(gin_text)

    def read_experiment(self) -> experiment_lib.Experiment:
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.config_path} does not exist: pass a run directory written by glm_jax "
                                    "training or conversion (it holds config.gin, tokenizer.model and checkpoints/)")
        return experiment_lib.from_gin([self.config_path])

    @property
    def tokenizer_path(self) -> Path:
        """tokenizer.json (an imported tokenizer) if the run has one, else tokenizer.model."""
        return self.hf_tokenizer_path if self.hf_tokenizer_path.is_file() else self.path / "tokenizer.model"

    def write_tokenizer(self, tokenizer: Tokenizer) -> None:
        tokenizer.save_into(self.path)

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer_file(self.tokenizer_path)

    def write_summary(self, summary: dict) -> None:
        self.summary_path.write_text(json.dumps(summary, indent=2))

    def summary(self) -> dict | None:
        return json.loads(self.summary_path.read_text()) if self.summary_path.is_file() else None

    def write_provenance(self, provenance: dict) -> None:
        self.provenance_path.write_text(json.dumps(provenance, indent=2))

    def provenance(self) -> dict | None:
        return json.loads(self.provenance_path.read_text()) if self.provenance_path.is_file() else None

    # ------------------------------------------------------------ checkpoints
    def checkpointer(self, keep: int | None = 3, async_save: bool = True, read_only: bool = False) -> Checkpointer:
        if read_only and not self.checkpoints_path.is_dir():
            raise FileNotFoundError(f"no checkpoint directory at {self.checkpoints_path}; train the run first")
        return Checkpointer(self.checkpoints_path, keep=keep, async_save=async_save, read_only=read_only)

    def restore_params(self, model: ModelConfig, step: int | None = None, shardings=None) -> tuple[object, int]:
        """(parameters, step) of the latest (or given) checkpoint, no optimizer state.

        A damaged step raises DamagedCheckpoint that names it and the earlier steps to use instead.
        """
        checkpoints = self.checkpointer(read_only=True)
        try:
            return checkpoints.restore_params(step, nn.unbox(abstract_params(model)), shardings)
        except DamagedCheckpoint as damaged:
            earlier = [s for s in checkpoints.all_steps() if s < damaged.step]
            hint = (f"use an earlier step: {earlier} (e.g. --step {earlier[-1]}, or "
                    f"{self.checkpoints_path / str(earlier[-1])})" if earlier else "no earlier checkpoint exists")
            raise DamagedCheckpoint(damaged.directory, damaged.step, f"{damaged.reason}; {hint}") from damaged
        finally:
            checkpoints.close()

    def read_meta(self, step: int) -> dict:
        """A checkpoint's meta item (its step and every process's data position)."""
        checkpoints = self.checkpointer(read_only=True)
        try:
            return checkpoints.read_meta(step)
        finally:
            checkpoints.close()

    def load(self, step: int | None = None, shardings=None) -> Run:
        """The latest (or given) checkpoint's parameters (no optimizer state), experiment and tokenizer.

        A LoRA run's parameters come back merged (base + adapters: a plain GLM's parameters), other
        adapter runs' as base + adapters, for their Run.model (which has ModelConfig.pre_seq_len,
        prompt_len or adapter_dim).
        """
        experiment = self.read_experiment()
        if experiment.adapters is not None:
            adapters, step = self.restore_adapters(experiment, step)
            params = join_adapters(self.adapter_base(experiment.model), adapters)
            if experiment.adapters.mergeable:
                params = experiment.adapters.merge(params)
            if shardings is not None:
                params = jax.device_put(params, shardings)
            return Run(self.path, experiment, self.tokenizer(), params, step)
        params, step = self.restore_params(experiment.model, step, shardings)
        return Run(self.path, experiment, self.tokenizer(), params, step)

    def write_derived(self, source: "RunDir", run: Run, params, overrides: list[str]) -> str:
        """Makes this new directory a run derived from `run` (read from `source`): the source's tokenizer,
        its config.gin with `overrides` appended (a comment line first, then gin bindings), and `params` as
        checkpoint run.step without optimizer state, at the source's data position. Returns the gin text."""
        if self.checkpoints_path.exists():
            raise FileExistsError(f"{self.path} already holds checkpoints; choose a new --out directory")
        self.write_tokenizer(run.tokenizer)
        overrides = [*overrides, f"RUN_DIR = '{self.path}'", "train.adapter = 'none'", "train.init_from = None",
                     f"DataConfig.tokenizer_path = '{self.tokenizer_path}'"]
        gin_text = source.config_path.read_text().rstrip("\n") + "\n\n" + "\n".join(overrides) + "\n"
        self.write_config(gin_text)
        checkpoints = self.checkpointer(keep=None, async_save=False)
        try:
            checkpoints.save(run.step, params, None, source.read_meta(run.step)["data"], gin_text)
        finally:
            checkpoints.close()
        return gin_text

    # ------------------------------------------------ adapter runs (train.adapter)
    def restore_adapters(self, experiment: experiment_lib.Experiment, step: int | None = None, shardings=None):
        """(adapter parameters, step) of an adapter run's latest (or given) checkpoint."""
        abstract = nn.unbox(jax.eval_shape(lambda: init_adapters(experiment.model, experiment.adapters,
                                                                 jax.random.key(0))))
        checkpoints = self.checkpointer(read_only=True)
        try:
            return checkpoints.restore_params(step, abstract, shardings)
        finally:
            checkpoints.close()

    def write_adapter_base(self, base: "RunDir", step: int) -> None:
        """Records which parameters an adapter run adapts (checked whenever they are loaded again)."""
        record = {"run": str(base.path), "step": int(step), "params_checksum": base.params_checksum(step)}
        self.adapter_base_path.write_text(json.dumps(record, indent=2))

    def adapter_base(self, model: ModelConfig, shardings=None):
        """The frozen base parameters an adapter run was trained on; ValueError naming both runs if they changed."""
        if not self.adapter_base_path.is_file():
            raise FileNotFoundError(f"{self.path} is an adapter run (train.adapter) without {self.adapter_base_path.name}, "
                                    "which names the base run its adapters belong to; train it again")
        record = json.loads(self.adapter_base_path.read_text())
        base = RunDir(record["run"])
        if not base.config_path.is_file():
            raise FileNotFoundError(f"the adapters of {self.path} belong to the base run {base.path} step "
                                    f"{record['step']}, which is gone; put it back there (or edit "
                                    f"{self.adapter_base_path} to where it moved)")
        found = base.params_checksum(record["step"])
        if found != record["params_checksum"]:
            raise ValueError(f"the adapters of {self.path} were trained on {base.path} step {record['step']} (params "
                             f"checksum {record['params_checksum']}), but that checkpoint now holds other parameters "
                             f"(checksum {found}); use the base run they were trained on")
        return base.restore_params(model, record["step"], shardings)[0]

    def params_checksum(self, step: int) -> str:
        """A digest of the per-array checksums a checkpoint recorded when it was saved (nothing is read)."""
        recorded = self.read_meta(step).get("checksums", {}).get("params")
        if recorded is None:
            raise ValueError(f"{self.path} step {step} predates recorded checksums, so adapters cannot be tied to "
                             "it; save it again (e.g. train it one more step) before training adapters on it")
        return hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()[:16]


def load_run(path: str | Path, step: int | None = None, shardings=None) -> Run:
    """RunDir(path).load(step): what generation, evaluation and conversion start from."""
    return RunDir(path).load(step, shardings)

"""The experiment: gin files + bindings -> one frozen object. The only module that reads gin.

Every program (training, the preflight, conversion, the ablation study) takes an
`Experiment`; gin is parsed at the command-line edge (glm_jax.cli) or when a run
directory's config.gin is read back (glm_jax.run_dir), and nowhere else. The config
dataclasses themselves (ModelConfig, DataConfig, Objective, OptimizerConfig,
MeshConfig) know nothing of gin: this module registers them under the names every
gin file and run directory uses (`ModelConfig.hidden_size = 256`, `train.steps = 200`).

Includes resolve against the configs shipped in the package (glm_jax/configs:
'base.gin', 'models/glm_tiny.gin', ...), the working directory and the directory of
every gin file given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import re
import types
import typing
from pathlib import Path

import gin

from glm_jax import configs
from glm_jax.data.objectives import Objective
from glm_jax.data.pipeline import DataConfig
from glm_jax.model.chunked_loss import DEFAULT_LOSS_CHUNK
from glm_jax.model.config import ModelConfig
from glm_jax.model.adapters import Adapter
from glm_jax.model.lora import LoraConfig
from glm_jax.model.bottleneck_adapters import BottleneckAdapters
from glm_jax.model.prefix_tuning import PrefixTuning
from glm_jax.model.prompt_tuning import PromptTuning
from glm_jax.optim import OptimizerConfig
from glm_jax.parallel.mesh import MeshConfig
from glm_jax.parallel.rules import RULES


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The run itself: where it lives, how long it trains, how often it saves and evaluates.

    Bound as `train.NAME` (base.gin: train.run_dir = %RUN_DIR, train.steps = %STEPS).
    sharding names a rules table of glm_jax/parallel/rules.py. log_every: the train step's
    metrics stay on the device and are fetched (logged, checked for NaN) every log_every
    steps and before every save and eval, so steps are not serialised with the host.
    loss_chunk_length: the output head and loss run this many positions (of every row)
    at a time, so no [B, T, vocab] logits exist (glm_jax.model.chunked_loss); None
    materialises them. init_from: a run directory (or RUN/checkpoints/STEP) whose parameters
    start a new run (fine-tuning): its latest (or that) checkpoint's parameters, a fresh
    optimizer, and its tokenizer unless DataConfig.tokenizer_path names one. Ignored once
    the run has a checkpoint of its own (resuming continues that).
    """

    run_dir: str
    steps: int
    sharding: str = "fsdp"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    seed: int = 0
    z_loss: float = 0.0
    loss_chunk_length: int | None = DEFAULT_LOSS_CHUNK
    init_from: str | None = None
    adapter: str = "none"

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"train.steps (STEPS) is {self.steps!r}; it must be a whole number >= 0")
        for name in ("checkpoint_every", "keep_checkpoints", "eval_every", "eval_batches", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{name} is {value!r}; it must be a whole number >= 1")
        chunk = self.loss_chunk_length
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
            raise ValueError(f"train.loss_chunk_length is {chunk!r}; it must be a whole number >= 1 (positions "
                             "per chunk of the head + loss) or None (whole logits)")
        if self.sharding not in RULES:
            raise ValueError(f"train.sharding {self.sharding!r} is unknown; choose one of {sorted(RULES)}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"train.adapter {self.adapter!r} is unknown; choose one of {list(ADAPTERS)}")
        if self.adapter != "none" and not self.init_from:
            raise ValueError(f"train.adapter = {self.adapter!r} trains adapters on a frozen model: set "
                             "train.init_from = 'RUN' to the run (trained or imported) they adapt")


ADAPTERS = ("none", "lora", "prefix", "prompt", "bottleneck")  # prefix: P-tuning v2; prompt: prompt tuning


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything a run is built from. gin_text is the operative gin config it was read from
    (written into run directories and checkpoints so a run can be rebuilt exactly)."""

    model: ModelConfig
    data: DataConfig
    objective: Objective
    optimizer: OptimizerConfig
    mesh: MeshConfig
    train: TrainSettings
    lora: LoraConfig = LoraConfig()
    prefix: PrefixTuning = PrefixTuning()
    prompt: PromptTuning = PromptTuning()
    bottleneck: BottleneckAdapters = BottleneckAdapters()
    gin_text: str = ""

    def __post_init__(self):
        check_consistent(self.model, self.data)
        # The frozen base never has these; the adapter adds them (adapted_model).
        for field, what, adapter, knob in (("pre_seq_len", "a learned prefix", "prefix", "PrefixTuning.length"),
                                          ("prompt_len", "a soft prompt", "prompt", "PromptTuning.length"),
                                          ("adapter_dim", "bottleneck adapters", "bottleneck", "BottleneckAdapters.dim")):
            if getattr(self.model, field):
                raise ValueError(f"ModelConfig.{field} = {getattr(self.model, field)} gives the model {what}, which "
                                 f"only its adapter run trains: set train.adapter = '{adapter}' and {knob} instead "
                                 f"(and leave ModelConfig.{field} at 0)")

    def replace(self, **changes) -> "Experiment":
        return dataclasses.replace(self, **changes)

    @property
    def adapters(self) -> Adapter | None:
        """The method whose adapters alone train (train.adapter = 'lora' | 'prefix' | 'prompt' | 'bottleneck'),
        else None."""
        return {"lora": self.lora, "prefix": self.prefix, "prompt": self.prompt,
                "bottleneck": self.bottleneck}.get(self.train.adapter)

    @property
    def adapted_model(self) -> ModelConfig:
        """The architecture generation and evaluation build: the model with its adapters' changes
        (P-tuning's learned prefix); the frozen base is `model`."""
        return self.model if self.adapters is None else self.adapters.model_config(self.model)


def check_consistent(model: ModelConfig, data: DataConfig) -> None:
    """Settings that are each valid but wrong together: a ValueError naming both, before anything runs."""
    if model.position == "learned_2d" and data.seq_len > model.max_position:
        raise ValueError(f"DataConfig.seq_len = {data.seq_len} exceeds ModelConfig.max_position = "
                         f"{model.max_position}, the rows of this model's learned position tables: position ids "
                         "would index past them. Lower DataConfig.seq_len or raise ModelConfig.max_position")
    if data.tokenizer_path is None and data.vocab_size > model.vocab_size:
        raise ValueError(f"DataConfig.vocab_size = {data.vocab_size} (the tokenizer trained for this run) exceeds "
                         f"ModelConfig.vocab_size = {model.vocab_size} (the embedding rows): token ids would "
                         "index past the table. Make ModelConfig.vocab_size >= DataConfig.vocab_size")


# Experiment field -> (gin name, the frozen dataclass it builds). Names are the ones run directories use.
_EXPERIMENT_PARTS = {"model": ("ModelConfig", ModelConfig), "data": ("DataConfig", DataConfig),
                     "objective": ("Objective", Objective), "optimizer": ("OptimizerConfig", OptimizerConfig),
                     "mesh": ("MeshConfig", MeshConfig), "train": ("train", TrainSettings),
                     "lora": ("LoraConfig", LoraConfig), "prefix": ("PrefixTuning", PrefixTuning),
                     "prompt": ("PromptTuning", PromptTuning), "bottleneck": ("BottleneckAdapters", BottleneckAdapters)}
_REGISTRY: dict[str, tuple[type, object]] = {}


def register(name: str, cls: type) -> None:
    """Makes a frozen dataclass bindable as `name.field = value` (e.g. a recipe or a study's settings)."""
    if name in _REGISTRY:
        if _REGISTRY[name][0] is not cls:
            raise ValueError(f"gin name {name!r} is already registered for {_REGISTRY[name][0].__name__}")
        return
    _REGISTRY[name] = (cls, gin.external_configurable(cls, name=name, module="glm_jax"))


for _name, _cls in _EXPERIMENT_PARTS.values():
    register(_name, _cls)


class _QuietProbe(logging.Filter):
    # gin's package-resource reader logs "Path not found" for every search path it
    # probes before the one that has the file; the include still succeeds.
    def filter(self, record):
        return not record.getMessage().startswith("Path not found")


logging.getLogger().addFilter(_QuietProbe())
_SEARCH_PATHS: list[str] = []


def _add_search_path(directory: Path) -> None:
    """Lets includes name files in `directory` (gin resolves includes against search paths only)."""
    if str(directory) not in _SEARCH_PATHS:
        _SEARCH_PATHS.append(str(directory))
        gin.add_config_file_search_path(str(directory))


_add_search_path(configs.config_dir())


# ------------------------------------------------------------------ reading gin
def _parse(files: list[str | Path], bindings: list[str]) -> None:
    """Parses files then bindings into gin's (cleared) global config; errors name the file or binding."""
    shipped = configs.config_dir()
    for file in files:
        file = Path(file).expanduser()
        path = file if file.exists() else shipped / file
        if not path.exists():
            raise FileNotFoundError(f"gin config {file} does not exist (looked in the working directory and "
                                    f"in the shipped configs {shipped})")
        _add_search_path(path.absolute().parent)  # its includes may name its neighbours
        try:
            gin.parse_config_file(str(path))
        except (ValueError, KeyError, SyntaxError, NameError) as error:
            raise ValueError(f"in gin config {path}: {error}") from error
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except (ValueError, KeyError, SyntaxError, NameError) as error:
            first_line = str(error).splitlines()[0].rstrip(".")
            raise ValueError(f"in gin binding {binding!r}: {first_line}{_suggest(error)}") from error
    gin.finalize()


def _suggest(error: Exception) -> str:
    """'; did you mean ...' for gin's unknown-configurable and unknown-parameter errors."""
    message = str(error)
    unknown_parameter = re.search(r"Configurable '(\w+)' doesn't have a parameter named '(\w+)'", message)
    if unknown_parameter and unknown_parameter.group(1) in _REGISTRY:
        name, field = unknown_parameter.groups()
        return _closest(field, _field_names(_REGISTRY[name][0]), prefix=f"{name}.")
    unknown_configurable = re.search(r"No configurable matching '([\w.]+)'", message)
    if unknown_configurable:
        return _closest(unknown_configurable.group(1), sorted(_REGISTRY))
    return ""


def _closest(name: str, known: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    return f"; known: {', '.join(prefix + k for k in known)}"


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


_MACRO_BINDING = re.compile(r"^\s*([A-Za-z_]\w*)\s*=")
_OPERATIVE_MACRO = re.compile(r"^([A-Za-z_]\w*) = ", re.MULTILINE)


def _check_overrides_are_used(bindings, operative_text: str) -> None:
    """A macro override (NAME = VALUE) that nothing in the config reads is a typo: say so and suggest."""
    macros_section = operative_text.split("# Parameters for", 1)[0]
    used = _OPERATIVE_MACRO.findall(macros_section)
    for binding in bindings:
        match = _MACRO_BINDING.match(binding)
        if match and match.group(1) not in used:
            raise ValueError(f"gin override {binding.strip()!r} sets macro {match.group(1)} but nothing in the "
                             f"config reads it{_closest(match.group(1), used)}")


# ------------------------------------------------------------------ types
def _type_matches(value, annotation) -> bool:
    """Whether a bound value fits a dataclass field's annotation (int for float is fine; bool is not int)."""
    origin = typing.get_origin(annotation)
    if annotation is typing.Any:
        return True
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple or annotation is tuple:
        return isinstance(value, (tuple, list))
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation this check does not model


def _check_types(name: str, cls: type, bound: dict) -> None:
    """Raises ValueError naming the binding, its value and the expected type for any mismatch."""
    hints = typing.get_type_hints(cls)
    for field, value in bound.items():
        if field in hints and not _type_matches(value, hints[field]):
            raise ValueError(f"gin binding {name}.{field} = {value!r} ({type(value).__name__}) must be "
                             f"{_describe(hints[field])}; fix the config or the --gin override")


def _describe(annotation) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


@contextlib.contextmanager
def _gin_scope(files, bindings):
    """gin's global state holds these files and bindings inside the block, and nothing outside it."""
    gin.clear_config()
    try:
        _parse(list(files), list(bindings))
        yield
    finally:
        gin.clear_config()


def _build(name: str):
    """An instance of the plain dataclass registered as `name`, its fields from the parsed bindings."""
    cls, configurable = _REGISTRY[name]
    # Types first: a value of the wrong type would otherwise fail inside validation or much later.
    _check_types(name, cls, gin.get_bindings(name))
    built = configurable()
    # gin builds a subclass of its own; hand out the plain class so instances compare and pickle-free
    # serialise like directly constructed ones.
    return cls(**{f.name: getattr(built, f.name) for f in dataclasses.fields(cls) if f.init})


def read(files, bindings, *names: str) -> tuple:
    """The registered dataclasses `names`, built from gin files and bindings (nothing leaks into gin)."""
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ValueError(f"{unknown} are not registered gin names; known: {sorted(_REGISTRY)}")
    with _gin_scope(files, bindings):
        return tuple(_build(name) for name in names)


def from_gin(files=(), bindings=()) -> Experiment:
    """The experiment of gin files (paths, or names of shipped configs) and 'NAME = VALUE' overrides."""
    experiment = _experiment(files, bindings)
    _check_overrides_are_used(bindings, experiment.gin_text)
    return experiment


def from_gin_text(text: str) -> Experiment:
    """The experiment of an operative config (a run directory's config.gin)."""
    return _experiment([], [text])


def _experiment(files, bindings) -> Experiment:
    with _gin_scope(files, bindings):
        parts = {field: _build(name) for field, (name, _) in _EXPERIMENT_PARTS.items()}
        return Experiment(**parts, gin_text=gin.operative_config_str())


# ------------------------------------------------------------------ presets
def preset_names() -> list[str]:
    return configs.model_preset_names()


def load_preset(name: str, **overrides) -> ModelConfig:
    """ModelConfig of preset `name` (e.g. 'chatglm2_6b', glm_jax/configs/models/), with field overrides."""
    if name not in preset_names():
        raise ValueError(f"model preset {name!r} not found in {configs.config_dir() / 'models'}; "
                         f"known presets: {preset_names()}")
    (config,) = read([f"models/{name}.gin"], [], "ModelConfig")
    return config.replace(**overrides) if overrides else config

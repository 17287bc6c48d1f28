"""MHA -> GQA / MQA conversion of a checkpoint, ready to uptrain (Ainslie et al. 2023).

The H key (and value) heads of every layer are split into G contiguous groups
(query head h uses KV head h // (H / G), the convention of the whole framework)
and each group becomes one head:
  mean   - the mean of the group's kernels and biases (the paper's choice),
  first  - the group's first head,
  random - a fresh draw from the model's own initialiser (biases zero).
Query and output projections are untouched. A source that is already grouped
(G0 KV heads) can be pooled further to any G dividing G0.

`convert_run` writes a new run directory that `glm_jax.train` resumes from step 0:
  checkpoints/0   params converted, a fresh optimizer state (moments are not
                  carried over), the source's data position (uptraining reads on
                  where the source stopped);
  config.gin      the source's operative config + the uptraining recipe
                  (experiments/configs/uptrain_gqa.gin): train.steps = alpha x the
                  source's steps, train.run_dir = out, num_kv_heads = G;
  tokenizer.model the source's; provenance.json  source, step, method, alpha, date.
"""

from __future__ import annotations

import datetime
import json
import math
import shutil
from pathlib import Path

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from glm_jax import gin_utils
from glm_jax.model import ModelConfig, init_params
from glm_jax.train.optim import OptimizerConfig, make_optimizer
from glm_jax.train.run import load_run, read_run_config
from glm_jax.train.state import TrainState

METHODS = ("mean", "first", "random")
KV_PROJECTIONS = ("key", "value")
DEFAULT_RECIPE = gin_utils.CONFIG_DIR / "uptrain_gqa.gin"


class ConversionError(ValueError):
    """The requested conversion is impossible for this source."""


def check_target(config: ModelConfig, num_kv_heads: int) -> None:
    """Raises ConversionError (saying what to do) unless config can become GQA-num_kv_heads."""
    H, G0 = config.num_heads, config.num_kv_heads
    if num_kv_heads < 1 or H % num_kv_heads:
        raise ConversionError(f"--num_kv_heads {num_kv_heads} must divide the {H} query heads; choose one of "
                              f"{[g for g in range(1, H + 1) if H % g == 0]}")
    if num_kv_heads > G0:
        raise ConversionError(f"the source has {G0} KV heads, fewer than the {num_kv_heads} asked for; "
                              "conversion only pools heads, so choose num_kv_heads <= "
                              f"{G0} (or convert from an MHA checkpoint)")
    if G0 % num_kv_heads:
        raise ConversionError(f"the source is already grouped with {G0} KV heads, which do not split into "
                              f"{num_kv_heads} equal groups; choose a divisor of {G0}: "
                              f"{[g for g in range(1, G0 + 1) if G0 % g == 0]}")


def pool_heads(array: np.ndarray, num_kv_heads: int, method: str) -> np.ndarray:
    """[..., G0, D] -> [..., G, D] by contiguous groups of G0 / G heads (mean or first)."""
    *lead, G0, D = array.shape
    grouped = array.reshape(*lead, num_kv_heads, G0 // num_kv_heads, D)
    if method == "mean":
        return grouped.mean(axis=-2, dtype=np.float64).astype(array.dtype)
    if method == "first":
        return np.ascontiguousarray(grouped[..., 0, :])
    raise ConversionError(f"method {method!r} is unknown; use one of {METHODS}")


def convert_params(params: dict, config: ModelConfig, num_kv_heads: int, method: str = "mean",
                   seed: int = 0) -> tuple[dict, ModelConfig]:
    """(converted params, converted config). Works on scanned and unscanned layer layouts.

    Every KV projection stores heads on axis -2 (kernel [.., embed, G, D], bias
    [.., G, D]), so pooling is the same for both layouts.
    """
    if method not in METHODS:
        raise ConversionError(f"method {method!r} is unknown; use one of {METHODS}")
    check_target(config, num_kv_heads)
    target = config.replace(num_kv_heads=num_kv_heads)
    fresh = nn.unbox(init_params(target, jax.random.key(seed))) if method == "random" else None

    def convert(path, leaf):
        keys = [getattr(p, "key", None) for p in path]
        if "attention" not in keys or not set(KV_PROJECTIONS) & set(keys):
            return leaf
        if method == "random":
            return _lookup(fresh, keys).astype(leaf.dtype)
        return jnp.asarray(pool_heads(np.asarray(leaf), num_kv_heads, method))

    return jax.tree_util.tree_map_with_path(convert, params), target


def _lookup(tree: dict, keys: list):
    for key in keys:
        tree = tree[key]
    return tree


# ------------------------------------------------------------------- run directories
def resolve_source(path: str | Path) -> tuple[Path, int | None]:
    """A run directory, its checkpoints/ folder or one checkpoint step folder -> (run dir, step or None)."""
    path = Path(path)
    if (path / "config.gin").is_file():
        return path, None
    if path.name == "checkpoints" and (path.parent / "config.gin").is_file():
        return path.parent, None
    if path.name.isdigit() and (path.parent.parent / "config.gin").is_file():
        return path.parent.parent, int(path.name)
    raise FileNotFoundError(f"{path} is not a run directory (with config.gin and checkpoints/) or a checkpoint "
                            "step inside one (RUN/checkpoints/STEP); train one with glm_jax.train first")


@gin.configurable
def uptrain_recipe(alpha: float = 0.05, learning_rate_scale: float = 1.0, warmup_fraction: float = 0.1) -> dict:
    """The uptraining recipe (bound in experiments/configs/uptrain_gqa.gin)."""
    if not 0 < alpha <= 1:
        raise ConversionError(f"uptrain_recipe.alpha {alpha} must be in (0, 1]")
    return {"alpha": alpha, "learning_rate_scale": learning_rate_scale, "warmup_fraction": warmup_fraction}


def convert_run(source: str | Path, num_kv_heads: int, method: str, out: str | Path, *, seed: int = 0,
                alpha: float | None = None, recipe_file: str | Path = DEFAULT_RECIPE) -> dict:
    """Writes the converted, ready-to-uptrain run directory `out`; returns its provenance record."""
    run_dir, step = resolve_source(source)
    out = Path(out).absolute()
    if (out / "checkpoints").exists():
        raise FileExistsError(f"{out} already holds checkpoints; choose a new --out directory")
    source_config = read_run_config(run_dir)
    check_target(source_config.model, num_kv_heads)
    run = load_run(run_dir, step)
    params, target = convert_params(run.params, run.config.model, num_kv_heads, method, seed)

    source_steps, source_lr = _source_schedule(run.config.gin_text)
    recipe = _read_recipe(recipe_file, alpha)
    steps = max(1, math.ceil(recipe["alpha"] * source_steps))
    learning_rate = source_lr * recipe["learning_rate_scale"]
    provenance = {"source_run": str(run_dir.absolute()), "source_step": int(run.step), "method": method,
                  "num_kv_heads": num_kv_heads, "source_num_kv_heads": run.config.model.num_kv_heads,
                  "alpha": recipe["alpha"], "uptrain_steps": steps, "learning_rate": learning_rate,
                  "warmup_fraction": recipe["warmup_fraction"], "seed": seed,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    overrides = [f"# glm_jax.convert uptrain: {method} pooling to {num_kv_heads} KV heads "
                 f"(provenance.json), then the recipe of {Path(recipe_file).name}",
                 f"train.run_dir = '{out}'", f"train.steps = {steps}", f"ModelConfig.num_kv_heads = {num_kv_heads}",
                 f"OptimizerConfig.learning_rate = {learning_rate!r}",
                 f"OptimizerConfig.warmup_fraction = {recipe['warmup_fraction']!r}",
                 "OptimizerConfig.warmup_steps = None"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.gin").write_text(run.config.gin_text.rstrip("\n") + "\n\n" + "\n".join(overrides) + "\n")
    shutil.copyfile(run_dir / "tokenizer.model", out / "tokenizer.model")
    _write_step0(out, params, target, run_dir, run.step, (out / "config.gin").read_text())
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2))
    return provenance


def _source_schedule(gin_text: str) -> tuple[int, float]:
    """(train steps, peak learning rate) of an operative config."""
    import glm_jax.train.loop  # noqa: F401

    gin_utils.parse([], [gin_text])
    try:
        steps = gin.query_parameter("train.steps")
        if str(steps).startswith("%"):  # a macro such as %STEPS
            steps = gin.query_parameter(f"{str(steps)[1:]}/macro.value")
        return int(steps), OptimizerConfig().learning_rate
    finally:
        gin.clear_config()


def _read_recipe(recipe_file: str | Path, alpha: float | None) -> dict:
    gin_utils.parse([recipe_file], [] if alpha is None else [f"uptrain_recipe.alpha = {alpha!r}"])
    try:
        return uptrain_recipe()
    finally:
        gin.clear_config()


def _write_step0(out: Path, params, config: ModelConfig, source_run: Path, source_step: int, gin_text: str):
    """A complete step-0 checkpoint: converted params, fresh optimizer state, the source's data position."""
    from glm_jax.train.checkpoint import Checkpointer

    tx, _ = make_optimizer(OptimizerConfig(), 1)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    source_meta = _source_meta(source_run, source_step)
    checkpoints = Checkpointer(out / "checkpoints", keep=None, async_save=False)
    checkpoints.save(0, state, source_meta["data"], gin_text)
    checkpoints.close()


def _source_meta(run_dir: Path, step: int) -> dict:
    manager = ocp.CheckpointManager(run_dir / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True),
                                    item_handlers={"meta": ocp.JsonCheckpointHandler()})
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    manager.close()
    return meta

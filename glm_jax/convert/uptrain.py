"""MHA -> GQA / MQA conversion of a checkpoint, ready to uptrain (Ainslie et al. 2023).

The H key (and value) heads of every layer are split into G groups (query head h uses
KV head h // (H / G), the convention of the whole framework) and each group becomes one head.
grouping (glm_jax/convert/head_grouping.py):
  contiguous - heads [g n, (g + 1) n) (the paper's choice),
  similarity - balanced groups of heads with similar activations on a calibration batch of the
               run's own data (glm_jax/convert/calibration.py), the query and output heads
               permuted with them;
method (the merge; glm_jax/convert/head_merging.py for the last three):
  mean     - the mean of the group's kernels and biases (the paper's choice),
  first    - the group's first head,
  random   - a fresh draw from the model's own initialiser (biases zero),
  weighted - a mean weighted by each head's activation norm,
  aligned  - Procrustes-aligned heads averaged, the rotations folded into queries / outputs,
  svd      - the best rank-D shared head of the group, its per-head maps folded likewise.
mean, first and random leave the query and output projections untouched. A source that is
already grouped (G0 KV heads) can be pooled further to any G dividing G0.

`convert_run` writes a new run directory that training resumes from step 0:
  checkpoints/0   params converted, no optimizer state (training starts a fresh
                  one: moments are not carried over), the source's data position
                  (uptraining reads on where the source stopped);
  config.gin      the source's operative config + the uptraining recipe
                  (glm_jax/configs/uptrain_gqa.gin): STEPS = alpha x the source's
                  steps, RUN_DIR = out, num_kv_heads = G (extend it with --gin.STEPS);
  tokenizer.model the source's; provenance.json  source, step, method, alpha, date.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glm_jax import experiment as experiment_lib
from glm_jax.convert.calibration import calibration_batches as calibration_batches_of
from glm_jax.convert.calibration import kv_activations
from glm_jax.convert.head_grouping import GROUPINGS, kv_order
from glm_jax.convert.head_merging import merge_layer
from glm_jax.convert.head_tensors import LayerHeads, read_layers, rope_structure, write_layers
from glm_jax.model import ModelConfig, init_params
from glm_jax.optim import OptimizerConfig
from glm_jax.run_dir import RunDir

METHODS = ("mean", "first", "random", "weighted", "aligned", "svd")
CALIBRATED = ("weighted", "aligned")  # merges that read activations (similarity grouping does too)
KV_PROJECTIONS = ("key", "value")
DEFAULT_RECIPE = "uptrain_gqa.gin"  # shipped in glm_jax/configs


class ConversionError(ValueError):
    """The requested conversion is impossible for this source."""


def check_target(config: ModelConfig, num_kv_heads: int) -> None:
    """Raises ConversionError (saying what to do) unless config can become GQA-num_kv_heads."""
    H, G0 = config.num_heads, config.num_kv_heads
    if config.quant_bits:
        raise ConversionError(f"the source is INT{config.quant_bits}-quantized, and a converted model is uptrained, "
                              "which integer weights cannot; convert the float run it was quantized from")
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
                   seed: int = 0, grouping: str = "contiguous", calibration=None) -> tuple[dict, ModelConfig]:
    """(converted params, converted config). Works on scanned and unscanned layer layouts.

    Every KV projection stores heads on axis -2 (kernel [.., embed, G, D], bias
    [.., G, D]), so pooling is the same for both layouts. calibration: (keys, values) per-layer
    activations (glm_jax.convert.calibration.kv_activations) for similarity grouping and the
    weighted and aligned merges; without it those compare the heads' kernels.
    """
    if method not in METHODS:
        raise ConversionError(f"method {method!r} is unknown; use one of {METHODS}")
    if grouping not in GROUPINGS:
        raise ConversionError(f"grouping {grouping!r} is unknown; use one of {GROUPINGS}")
    if method == "random" and grouping != "contiguous":
        raise ConversionError("method 'random' draws new KV heads, so how heads are grouped changes nothing; "
                              "use grouping 'contiguous'")
    check_target(config, num_kv_heads)
    target = config.replace(num_kv_heads=num_kv_heads)
    if method in ("weighted", "aligned", "svd") or grouping != "contiguous":
        return _convert_heads(params, config, num_kv_heads, method, grouping, calibration), target
    fresh = nn.unbox(init_params(target, jax.random.key(seed))) if method == "random" else None

    def convert(path, leaf):
        keys = [getattr(p, "key", None) for p in path]
        if "attention" not in keys or not set(KV_PROJECTIONS) & set(keys):
            return leaf
        if method == "random":
            return _lookup(fresh, keys).astype(leaf.dtype)
        return jnp.asarray(pool_heads(np.asarray(leaf), num_kv_heads, method))

    return jax.tree_util.tree_map_with_path(convert, params), target


def _convert_heads(params: dict, config: ModelConfig, num_kv_heads: int, merge: str, grouping: str,
                   calibration) -> dict:
    """Grouping then merging, layer by layer, on float64 copies of the attention projections."""
    attention = _stacked_attention(params, config.num_layers)
    rope = rope_structure(config)
    layers = []
    for i, layer in enumerate(read_layers(attention)):
        keys, values = (calibration[0][i], calibration[1][i]) if calibration is not None else (None, None)
        features = _head_features(layer, keys, values)
        order = kv_order(layer.k.shape[1], num_kv_heads, grouping, features)
        layer = layer.permuted(order)
        if keys is not None:
            keys, values = keys[:, order], values[:, order]
        layers.append(merge_layer(layer, num_kv_heads, merge, rope, keys, values))
    converted = jax.tree_util.tree_map(jnp.asarray, write_layers(attention, layers))
    return _put_attention(params, converted, config.num_layers)


def _head_features(layer: LayerHeads, keys, values) -> np.ndarray:
    """[G0, F] per KV head: its key and value activations (calibration) or kernels, side by side."""
    if keys is None:
        keys, values = layer.k, layer.v  # [E+1, G0, D]
    return np.concatenate([np.moveaxis(keys, 1, 0).reshape(keys.shape[1], -1),
                           np.moveaxis(values, 1, 0).reshape(values.shape[1], -1)], axis=1)


def _stacked_attention(params: dict, num_layers: int) -> dict:
    """The attention tree with a leading [L] axis, from either layer layout."""
    if "layers" in params:
        return params["layers"]["attention"]
    per_layer = [params[f"layers_{i}"]["attention"] for i in range(num_layers)]
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_layer)


def _put_attention(params: dict, attention: dict, num_layers: int) -> dict:
    if "layers" in params:
        return {**params, "layers": {**params["layers"], "attention": attention}}
    out = dict(params)
    for i in range(num_layers):
        out[f"layers_{i}"] = {**params[f"layers_{i}"],
                              "attention": jax.tree_util.tree_map(lambda x, i=i: x[i], attention)}
    return out


def _lookup(tree: dict, keys: list):
    for key in keys:
        tree = tree[key]
    return tree


# ------------------------------------------------------------------- run directories
@dataclasses.dataclass(frozen=True)
class UptrainRecipe:
    """How a converted model is uptrained (bound as uptrain_recipe.* in glm_jax/configs/uptrain_gqa.gin).

    alpha: uptraining steps as a fraction of the source's steps.
    learning_rate_from: what learning_rate_scale multiplies: the source's 'peak' learning rate, or
      its 'final' one (peak x min_lr_ratio, where its schedule ended).
    schedule: 'cosine' (warmup, then decay to the source's min_lr_ratio of the uptraining peak) or
      'constant' (warmup, then the peak to the end).
    warmup_fraction: of the uptraining steps.
    """

    alpha: float = 0.05
    learning_rate_scale: float = 1.0
    learning_rate_from: str = "final"  # the shipped recipe's choice (experiments/results/uptrain_recipe.md)
    schedule: str = "constant"
    warmup_fraction: float = 0.1

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise ConversionError(f"uptrain_recipe.alpha {self.alpha} must be in (0, 1]")
        if not self.learning_rate_scale > 0:
            raise ConversionError(f"uptrain_recipe.learning_rate_scale {self.learning_rate_scale} must be positive")
        if self.learning_rate_from not in ("peak", "final"):
            raise ConversionError(f"uptrain_recipe.learning_rate_from {self.learning_rate_from!r} must be 'peak' "
                                  "(the source's peak learning rate) or 'final' (where its schedule ended)")
        if self.schedule not in ("cosine", "constant"):
            raise ConversionError(f"uptrain_recipe.schedule {self.schedule!r} must be 'cosine' or 'constant'")
        if not 0 <= self.warmup_fraction < 1:
            raise ConversionError(f"uptrain_recipe.warmup_fraction {self.warmup_fraction} must be in [0, 1)")

    def learning_rate(self, source: OptimizerConfig) -> float:
        """The uptraining peak learning rate for a source trained with `source`."""
        base = source.learning_rate * (source.min_lr_ratio if self.learning_rate_from == "final" else 1.0)
        return base * self.learning_rate_scale

    def optimizer_bindings(self, source: OptimizerConfig) -> list[str]:
        bindings = [f"OptimizerConfig.learning_rate = {self.learning_rate(source)!r}",
                    f"OptimizerConfig.warmup_fraction = {self.warmup_fraction!r}",
                    "OptimizerConfig.warmup_steps = None"]
        return bindings + (["OptimizerConfig.min_lr_ratio = 1.0"] if self.schedule == "constant" else [])


experiment_lib.register("uptrain_recipe", UptrainRecipe)


def read_recipe(recipe_file: str | Path = DEFAULT_RECIPE, alpha: float | None = None,
                bindings: list[str] = ()) -> UptrainRecipe:
    """The recipe of a gin file, with alpha and any 'uptrain_recipe.NAME = VALUE' bindings on top."""
    bindings = [*bindings, *([] if alpha is None else [f"uptrain_recipe.alpha = {alpha!r}"])]
    (recipe,) = experiment_lib.read([recipe_file], bindings, "uptrain_recipe")
    return recipe


def convert_run(source: str | Path, num_kv_heads: int, method: str, out: str | Path, *, seed: int = 0,
                alpha: float | None = None, recipe_file: str | Path = DEFAULT_RECIPE,
                recipe_bindings: list[str] = (), grouping: str = "contiguous", calibration_batches: int = 4) -> dict:
    """Writes the converted, ready-to-uptrain run directory `out`; returns its provenance record.

    The new run holds a step-0 checkpoint of the converted parameters without optimizer
    state (training starts a fresh one) and the source's data position, the source's
    config.gin plus the recipe's bindings, the tokenizer and provenance.json.
    """
    source_run, step = RunDir.resolve(source)
    target_run = RunDir(out)
    if target_run.checkpoints_path.exists():
        raise FileExistsError(f"{target_run.path} already holds checkpoints; choose a new --out directory")
    source = source_run.read_experiment()
    check_target(source.model, num_kv_heads)
    source_params, step = source_run.restore_params(source.model, step)
    calibration = None
    if grouping != "contiguous" or method in CALIBRATED:
        batches = calibration_batches_of(source.data, source.objective, source_run.tokenizer(), calibration_batches)
        calibration = kv_activations(source_params, source.model, batches)
    params, _ = convert_params(source_params, source.model, num_kv_heads, method, seed, grouping, calibration)

    recipe = read_recipe(recipe_file, alpha, recipe_bindings)
    steps = max(1, math.ceil(recipe.alpha * source.train.steps))
    provenance = {"source_run": str(source_run.path), "source_step": int(step), "method": method,
                  "grouping": grouping, "calibration_tokens": 0 if calibration is None else len(calibration[0][0]),
                  "num_kv_heads": num_kv_heads, "source_num_kv_heads": source.model.num_kv_heads,
                  "alpha": recipe.alpha, "uptrain_steps": steps, "learning_rate": recipe.learning_rate(source.optimizer),
                  "recipe": dataclasses.asdict(recipe), "seed": seed,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    overrides = [f"# glm_jax convert uptrain: {grouping} groups, {method} merge to {num_kv_heads} KV heads "
                 f"(provenance.json), then the recipe of {Path(recipe_file).name}",
                 f"RUN_DIR = '{target_run.path}'", f"STEPS = {steps}",
                 f"ModelConfig.num_kv_heads = {num_kv_heads}", *recipe.optimizer_bindings(source.optimizer)]
    target_run.write_tokenizer(source_run.tokenizer())
    if source.data.tokenizer_path:  # an imported run's own tokenizer: use the copy in the new run
        overrides.append(f"DataConfig.tokenizer_path = '{target_run.tokenizer_path}'")
    gin_text = source_run.config_path.read_text().rstrip("\n") + "\n\n" + "\n".join(overrides) + "\n"
    target_run.write_config(gin_text)
    checkpoints = target_run.checkpointer(keep=None, async_save=False)
    checkpoints.save(0, params, None, source_run.read_meta(step)["data"], gin_text)
    checkpoints.close()
    target_run.write_provenance(provenance)
    return provenance

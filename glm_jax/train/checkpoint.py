"""Orbax checkpoints: params, optimizer state, data iterator state and the operative config.

A checkpoint step directory holds four items: `params` and `opt_state` (sharded
arrays, restored straight into the target shardings, so restoring onto another
mesh is free), `meta` (JSON: step and every process's data-iterator state) and
`config` (JSON: the operative gin config). Saves are asynchronous and atomic:
Orbax writes into a temporary directory and renames it when complete, so a crash
during a save leaves the previous checkpoint as the latest complete one.
Parameters-only restore (evaluation, conversion) reads just the `params` item.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from glm_jax.train.state import TrainState

ITEMS = ("params", "opt_state", "meta", "config")


def _manager(directory: Path, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


class CheckpointShapeError(ValueError):
    """A checkpoint's parameter shapes do not match the model config."""


class Checkpointer:
    """Saves and restores the training items of one run directory."""

    def __init__(self, directory: str | Path, keep: int | None = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True, create=True)
        self.manager = _manager(self.directory, options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_states: list, gin_config: str) -> None:
        """Starts an asynchronous save of everything needed to resume at `step`."""
        meta = {"step": int(step), "data": data_states}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave(meta), config=ocp.args.JsonSave({"gin": gin_config})), force=True)

    def restore(self, step: int, abstract: TrainState, shardings: TrainState) -> tuple[TrainState, dict]:
        """(TrainState placed on `shardings`, meta) of a saved step."""
        check_param_shapes(self.manager, step, abstract.params)
        targets = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(targets.params), opt_state=ocp.args.StandardRestore(targets.opt_state),
            meta=ocp.args.JsonRestore()))
        meta = restored["meta"]
        step_array = jax.device_put(np.asarray(meta["step"], np.int32), shardings.step)
        return TrainState(step=step_array, params=restored["params"], opt_state=restored["opt_state"]), meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_dir(path: str | Path) -> Path:
    """Accepts a run directory (with checkpoints/) or a checkpoints directory."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.is_dir():
        return path
    raise FileNotFoundError(f"no checkpoint directory at {path}; pass a run directory written by "
                            "glm_jax.train (it contains checkpoints/) or its checkpoints/ folder")


def check_param_shapes(manager: ocp.CheckpointManager, step: int, abstract_params) -> None:
    """Raises CheckpointShapeError naming the first parameter whose shape differs."""
    saved = manager.item_metadata(step)["params"]
    saved_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    want_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    missing, extra = sorted(set(want_flat) - set(saved_flat)), sorted(set(saved_flat) - set(want_flat))
    if missing or extra:
        raise CheckpointShapeError(
            f"checkpoint step {step} in {manager.directory} has different parameters than the model config: "
            f"missing {missing[:5]}, unexpected {extra[:5]}; restore with the config the run was trained with "
            "(its config.gin)")
    for name, want in want_flat.items():
        if tuple(saved_flat[name].shape) != tuple(want.shape):
            raise CheckpointShapeError(
                f"parameter {name} has shape {tuple(saved_flat[name].shape)} in checkpoint step {step} of "
                f"{manager.directory} but the model config gives {tuple(want.shape)}; restore with the config "
                "the run was trained with (its config.gin), or convert the checkpoint")


def restore_params(path: str | Path, abstract_params, step: int | None = None, shardings=None):
    """Parameters only (no optimizer state) of the latest (or given) step of a run directory.

    abstract_params: ShapeDtypeStructs of the expected parameters (e.g. from
    glm_jax.model.abstract_params, unboxed); shardings: target shardings (default:
    every array whole on the first local device).
    Returns (params, step).
    """
    manager = _manager(checkpoint_dir(path), ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                                         save_interval_steps=0))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir(path)}; train first or check the path")
    check_param_shapes(manager, step, abstract_params)
    if shardings is None:  # whole arrays on one device, whatever mesh the run was saved from
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, abstract_params)
    abstract_params = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings)
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
    manager.close()
    return restored["params"], step

"""Orbax checkpoints: params, optimizer state, data iterator state and the operative config.

A checkpoint step directory holds up to four items: `params` and `opt_state`
(sharded arrays, restored straight into the target shardings, so restoring onto
another mesh is free), `meta` (JSON: step and every process's data-iterator state)
and `config` (JSON: the operative gin config). A checkpoint without `opt_state` is a
model that did not come from this run's optimizer (a converted or imported one):
training starts a fresh optimizer state from it. Saves are asynchronous and atomic:
Orbax writes into a temporary directory and renames it when complete, so a crash
during a save leaves the previous checkpoint as the latest complete one.
Parameters-only restore (evaluation, conversion) reads just the `params` item.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


def _manager(directory: Path, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


class CheckpointShapeError(ValueError):
    """A checkpoint's parameter shapes do not match the model config."""


class Checkpointer:
    """Saves and restores the items of one checkpoints/ directory."""

    def __init__(self, directory: str | Path, keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                   cleanup_tmp_directories=True, create=True)
        self.manager = _manager(self.directory, options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, data_states: list, gin_config: str) -> None:
        """Starts an asynchronous save of everything needed to resume at `step`.

        opt_state None saves a model without optimizer state (conversion, import).
        """
        items = {"params": ocp.args.StandardSave(params),
                 "meta": ocp.args.JsonSave({"step": int(step), "data": data_states}),
                 "config": ocp.args.JsonSave({"gin": gin_config})}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def has_opt_state(self, step: int) -> bool:
        return (self.directory / str(step) / "opt_state").is_dir()

    def restore(self, step: int, params_target, opt_state_target) -> tuple:
        """(params, opt_state or None, meta) of a saved step; targets are ShapeDtypeStructs with shardings.

        opt_state is None when the checkpoint has none (a converted or imported model).
        """
        check_param_shapes(self.manager, step, params_target)
        items = {"params": ocp.args.StandardRestore(params_target), "meta": ocp.args.JsonRestore()}
        if self.has_opt_state(step):
            items["opt_state"] = ocp.args.StandardRestore(opt_state_target)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["params"], restored.get("opt_state"), restored["meta"]

    def restore_params(self, step: int | None, abstract_params, shardings=None):
        """(params, step) of the latest (or given) step; shardings default to whole arrays on one device."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}; train first or check the path")
        check_param_shapes(self.manager, step, abstract_params)
        if shardings is None:  # whole arrays on one device, whatever mesh the run was saved from
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree_util.tree_map(lambda _: device, abstract_params)
        targets = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings)
        restored = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(targets)))
        return restored["params"], step

    def read_meta(self, step: int) -> dict:
        """The step's JSON meta item: {'step', 'data': every process's data-iterator state}."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

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
    checkpoints = Checkpointer(checkpoint_dir(path), read_only=True)
    try:
        return checkpoints.restore_params(step, abstract_params, shardings)
    finally:
        checkpoints.close()

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

What is read is validated: a step whose commit marker or item metadata is missing,
or whose arrays fail to read (a truncated file), or whose arrays read but differ from
the checksums recorded in `meta` when they were saved (bits changed on disk: see
`array_checksums`), raises `DamagedCheckpoint` naming the step and the file or array; `move_aside` puts such a step beside the checkpoints (never
deleting it). A failed save raises `CheckpointSaveError` naming the step, the cause
and the newest complete checkpoint, which stays loadable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from queue import Queue

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.experimental.v1 import partial as partial_save

from glm_jax.model.scan_layout import scan_params, unscan_targets

COMMIT_MARKER = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE  # Orbax writes it last, before the atomic rename
ARRAY_ITEMS = ("params", "opt_state")  # item -> metadata file: _METADATA (arrays) or metadata (JSON)


class _QuietReadOnly(logging.Filter):
    # Orbax warns on every read-only manager that its directory is read only; that is the point.
    def filter(self, record):
        return "Given directory is read only" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietReadOnly())


class DamagedCheckpoint(RuntimeError):
    """A checkpoint step is incomplete or unreadable."""

    def __init__(self, directory: Path, step: int, reason: str):
        self.directory, self.step, self.reason = directory, step, reason
        super().__init__(f"checkpoint step {step} in {directory} is damaged: {reason}")


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (full disk, read-only or vanished directory)."""


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost error of a chain (TensorStore names the array and the file there)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _manager(directory: Path, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


# ------------------------------------------------------------------ checksums
def array_checksums(tree) -> dict[str, int]:
    """{tree path: checksum} of every array: a position-weighted sum of its bits modulo 2^32.

    Computed where the arrays live: jax arrays in one jitted pass (sharded arrays stay sharded; XLA
    keeps a uint32 temporary the size of the largest array shard), host arrays (an import's
    groups) a million elements at a time. Either way no copy to the other side. Any single flipped bit changes it (each element's
    bits are multiplied by an odd weight, invertible modulo 2^32), and so does moving values
    between positions. Recorded in `meta` at save and compared on restore.
    """
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    on_device = [i for i, (_, leaf) in enumerate(leaves) if isinstance(leaf, jax.Array)]
    sums = dict(zip(on_device, jax.device_get(_bit_sums([leaves[i][1] for i in on_device]))))
    return {jax.tree_util.keystr(path): int(sums[i] if i in sums else _host_bit_sum(np.asarray(leaf)))
            for i, (path, leaf) in enumerate(leaves)}


_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32}


@jax.jit
def _bit_sums(arrays):
    def bit_sum(x):
        x = jnp.asarray(x)
        bits = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(
            x, _UNSIGNED[x.dtype.itemsize])
        weights = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape) * jnp.uint32(2) + jnp.uint32(1)
        return jnp.sum(bits.astype(jnp.uint32) * weights, dtype=jnp.uint32)  # wraps modulo 2^32

    return [bit_sum(x) for x in arrays]


def _host_bit_sum(x: np.ndarray, chunk_elements: int = 1 << 20) -> int:
    """_bit_sums' checksum of a host array (an import's converted groups), a few rows at a time: the
    same uint32 arithmetic as on device, without a device copy or a full-size temporary."""
    rows = x.reshape(1, -1) if x.ndim < 2 else x
    row_size = rows[0].size
    step = max(1, chunk_elements // max(1, row_size))  # each uint32 temporary holds ~chunk_elements
    total = 0
    for start in range(0, rows.shape[0], step):
        part = np.ascontiguousarray(rows[start:start + step]).reshape(-1)
        bits = part.astype(np.uint8) if part.dtype == np.bool_ else part.view(_UNSIGNED[part.dtype.itemsize])
        index = np.arange(start * row_size, start * row_size + part.size, dtype=np.uint32)
        weights = index * np.uint32(2) + np.uint32(1)
        total = (total + int(np.sum(bits.astype(np.uint32) * weights, dtype=np.uint32))) % 2**32
    return total


def _check_against(recorded: dict | None, tree, directory: Path, step: int, item: str) -> None:
    """DamagedCheckpoint naming the first array whose bits differ from what was saved (nothing recorded: no check)."""
    if not recorded:
        return
    for path, total in array_checksums(tree).items():
        if path in recorded and recorded[path] != total:
            raise DamagedCheckpoint(directory, step, f"array {item}{path} reads back different from what was saved "
                                                     "(its checksum does not match: the file's bits changed)")


def check_writable(directory: Path) -> None:
    """Creates `directory` if needed and writes and removes a file in it; CheckpointSaveError if it cannot.

    A read-only or full checkpoint directory is found at start-up this way; otherwise the
    run would train to its first save and fail (or wait on Orbax's timeouts) there.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=directory, prefix=".glm_jax-write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise CheckpointSaveError(
            f"cannot write checkpoints to {directory} ({error.strerror or error}); make it writable (or free "
            "space on its disk) or choose another RUN_DIR. Nothing was trained") from error


class _AbandonedWrites(logging.Filter):
    """Drops asyncio's 'exception was never retrieved' reports: after a failed save, each of Orbax's
    pending array writes reports the same storage error once more when collected (hundreds of lines),
    and CheckpointSaveError has already said what failed and what was kept."""

    def filter(self, record):
        return "exception was never retrieved" not in record.getMessage()


def _quiet_abandoned_writes() -> None:
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedWrites) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedWrites())


class CheckpointShapeError(ValueError):
    """A checkpoint's parameter shapes do not match the model config."""


class Checkpointer:
    """Saves and restores the items of one checkpoints/ directory."""

    def __init__(self, directory: str | Path, keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).expanduser().absolute()
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        else:
            check_writable(self.directory)  # now, not after hours of training
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                   cleanup_tmp_directories=True, create=True)
        self.manager = _manager(self.directory, options)
        self._pending: int | None = None  # the step of an asynchronous save not yet known to be complete

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def reload(self) -> None:
        """Re-reads the step list (after another process changed the directory)."""
        self.manager.reload()

    # ------------------------------------------------------------------ saving
    def save(self, step: int, params, opt_state, data_states: list, gin_config: str) -> None:
        """Starts an asynchronous save of everything needed to resume at `step`.

        opt_state None saves a model without optimizer state (conversion, import).
        Raises CheckpointSaveError if this save (or the previous asynchronous one) fails.
        """
        checksums = {"params": array_checksums(params)}
        if opt_state is not None:
            checksums["opt_state"] = array_checksums(opt_state)
        items = {"params": ocp.args.StandardSave(params),
                 "meta": ocp.args.JsonSave({"step": int(step), "data": data_states, "checksums": checksums}),
                 "config": ocp.args.JsonSave({"gin": gin_config})}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self._guard_save(step, lambda: self.manager.save(step, args=ocp.args.Composite(**items), force=True))
        self._pending = step

    def _guard_save(self, step: int, action) -> None:
        try:
            action()
        except Exception as error:  # the storage's error, whatever layer raised it
            with contextlib.suppress(Exception):  # an earlier save still in flight decides the newest complete step
                self.manager.wait_until_finished()
            self.manager.reload()
            # The error is the previous asynchronous save's if that one never completed, else this step's.
            previous_failed = self._pending is not None and self._pending not in self.manager.all_steps()
            failed = self._pending if previous_failed or step is None else step
            self._pending = None
            latest = self.manager.latest_step()
            _quiet_abandoned_writes()
            kept = (f"the newest complete checkpoint is step {latest}, which is unchanged and restores as before"
                    if latest is not None else "there is no complete checkpoint yet")
            raise CheckpointSaveError(
                f"saving checkpoint step {failed} to {self.directory} failed ({_root_cause(error)}); {kept}. "
                "Free disk space or make the run directory writable, then run again to resume from it") from error

    def wait(self) -> None:
        self._guard_save(None, self.manager.wait_until_finished)
        self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    # ------------------------------------------------------------------ reading
    def has_opt_state(self, step: int) -> bool:
        return (self.directory / str(step) / "opt_state").is_dir()

    def verify(self, step: int, items: tuple[str, ...]) -> None:
        """Raises DamagedCheckpoint unless the step's commit marker and each item's metadata are present."""
        step_dir = self.directory / str(step)
        required = [step_dir / COMMIT_MARKER]
        required += [step_dir / item / ("_METADATA" if item in ARRAY_ITEMS else "metadata") for item in items]
        for path in required:
            if not path.is_file():
                raise DamagedCheckpoint(self.directory, step, f"{path} is missing (an interrupted or damaged save)")

    def _read(self, step: int, items: tuple[str, ...], read):
        """read() after verify(); any storage error becomes DamagedCheckpoint naming the step and file."""
        self.verify(step, items)
        try:
            return read()
        except CheckpointShapeError:
            raise
        except Exception as error:
            raise DamagedCheckpoint(self.directory, step, _root_cause(error)) from error

    def restore(self, step: int, params_target, opt_state_target) -> tuple:
        """(params, opt_state or None, meta) of a saved step; targets are ShapeDtypeStructs with shardings.

        opt_state is None when the checkpoint has none (a converted or imported model).
        """
        if self._saved_unscanned(step, params_target):  # an import: params only, one layer per entry
            meta = self.read_meta(step)
            return self._restore_params_item(step, params_target, unscanned=True, meta=meta), None, meta
        items = {"params": ocp.args.StandardRestore(params_target), "meta": ocp.args.JsonRestore()}
        if self.has_opt_state(step):
            items["opt_state"] = ocp.args.StandardRestore(opt_state_target)

        def read():
            check_param_shapes(self.manager, step, params_target)
            return self.manager.restore(step, args=ocp.args.Composite(**items))

        restored = self._read(step, tuple(items), read)
        recorded = restored["meta"].get("checksums", {})
        for item in ("params", "opt_state"):
            if restored.get(item) is not None:
                _check_against(recorded.get(item), restored[item], self.directory, step, item)
        return restored["params"], restored.get("opt_state"), restored["meta"]

    def restore_params(self, step: int | None, abstract_params, shardings=None):
        """(params, step) of the latest (or given) step; shardings default to whole arrays on one device."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}; train first or check the path")
        steps = self.all_steps()
        if step not in steps:
            raise FileNotFoundError(f"there is no checkpoint step {step} in {self.directory}; it has steps {steps}")
        if shardings is None:  # whole arrays on one device, whatever mesh the run was saved from
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree_util.tree_map(lambda _: device, abstract_params)
        targets = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings)
        return self._restore_params_item(step, targets), step

    def _saved_unscanned(self, step: int, targets) -> bool:
        """Is the step saved with one entry per layer ('layers_0', ...) while targets stack them ('layers')?"""
        if not isinstance(targets, dict) or "layers" not in targets:
            return False
        self.verify(step, ("params",))
        saved = self.manager.item_metadata(step)["params"]
        return "layers" not in saved and "layers_0" in saved

    def _restore_params_item(self, step: int, targets, unscanned: bool | None = None, meta: dict | None = None):
        """The params item restored into `targets`, whichever layer layout it was saved in."""
        unscanned = self._saved_unscanned(step, targets) if unscanned is None else unscanned
        read_targets = unscan_targets(targets) if unscanned else targets

        def read():
            check_param_shapes(self.manager, step, read_targets)
            return self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(read_targets)))

        params = self._read(step, ("params",), read)["params"]
        meta = self.read_meta(step) if meta is None else meta
        _check_against(meta.get("checksums", {}).get("params"), params, self.directory, step, "params")
        if not unscanned:
            return params
        shardings = jax.tree_util.tree_map(lambda t: t.sharding, targets["layers"])
        num_layers = jax.tree_util.tree_leaves(targets["layers"])[0].shape[0]
        return scan_params(params, num_layers, shardings)

    def read_meta(self, step: int) -> dict:
        """The step's JSON meta item: {'step', 'data': every process's data-iterator state,
        'checksums': {item: {array path: checksum}} (steps saved before checksums have none)}."""
        return self._read(step, ("meta",), lambda: self.manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())))["meta"]

    def move_aside(self, step: int, destination: Path) -> Path:
        """Moves a (damaged) step directory into `destination` (never deletes it); returns its new path."""
        destination.mkdir(parents=True, exist_ok=True)
        target = destination / str(step)
        suffix = 1
        while target.exists():
            target, suffix = destination / f"{step}.{suffix}", suffix + 1
        shutil.move(str(self.directory / str(step)), str(target))
        self.reload()
        return target


def write_streamed(directory: str | Path, step: int, param_groups, data_states: list, gin_config: str) -> Path:
    """Writes checkpoint `step` of a checkpoints/ directory one group of parameters at a time.

    param_groups yields disjoint parameter subtrees (an import: everything outside the layers,
    then one layer at a time); each is written by an Orbax partial save while a background
    thread produces the next, so memory holds two groups (one alone when it exceeds 1 GiB),
    never the model. The step is assembled beside `directory` and renamed into place when
    complete: an interrupted write leaves no step behind. Restores like any other step (an
    unscanned params item is stacked on restore).
    """
    directory = Path(directory).expanduser().absolute()
    final = directory / str(step)
    if final.exists():
        raise FileExistsError(f"checkpoint step {step} already exists in {directory}")
    build = directory.parent / f"{directory.name}_{step}_streaming"
    shutil.rmtree(build, ignore_errors=True)
    for partial in (p for p in build.parent.glob(build.name + "*") if p != build):
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of an interrupted partial save
    checksums = {}
    for group in _produced_ahead(param_groups):
        checksums.update(array_checksums(group))
        partial_save.save(build, group)
        del group
    partial_save.finalize(build)
    (build / "state").rename(build / "params")  # partial saves name their item 'state'
    meta = {"step": int(step), "data": data_states, "checksums": {"params": checksums}}
    for name, item in (("meta", meta), ("config", {"gin": gin_config})):
        (build / name).mkdir()
        ocp.JsonCheckpointHandler().save(build / name, args=ocp.args.JsonSave(item))
    directory.mkdir(parents=True, exist_ok=True)
    build.rename(final)
    return final


def _produced_ahead(trees, max_bytes: int = 2**30):
    """Iterates `trees` while a background thread produces the next one.

    An import converts a layer (reads, transposes: numpy releases the GIL) while Orbax writes the
    previous one, so the two overlap. The producer starts the next tree only while the one being
    written is the only one alive and holds less than max_bytes: memory holds two trees at most,
    and a large tensor (GLM-4-9B's 1.2 GB embedding) is never joined by a second. An error in the
    producer is raised here, in the consumer's thread; a consumer that stops early (a failed
    write) releases the producer.
    """
    ready: Queue = Queue()
    alive = {"count": 0, "bytes": 0, "stopped": False}
    room = threading.Condition()
    done = object()

    def produce():
        try:
            for tree in trees:
                size = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree))
                with room:
                    alive["count"] += 1
                    alive["bytes"] += size
                ready.put((tree, size))
                del tree
                with room:
                    room.wait_for(lambda: alive["stopped"] or (alive["count"] < 2 and alive["bytes"] < max_bytes))
                    if alive["stopped"]:
                        return
            ready.put((done, 0))
        except BaseException as error:  # handed to the consumer, which re-raises it
            ready.put((error, 0))

    thread = threading.Thread(target=produce, name="glm_jax-produce-ahead", daemon=True)
    thread.start()
    try:
        while (item := ready.get())[0] is not done:
            tree, size = item
            if isinstance(tree, BaseException):
                raise tree
            del item
            yield tree
            del tree
            with room:
                alive["count"] -= 1
                alive["bytes"] -= size
                room.notify()
    finally:
        with room:
            alive["stopped"] = True
            room.notify()
    thread.join()


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

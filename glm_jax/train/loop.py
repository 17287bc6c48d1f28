"""The training program: mesh, rules, data, state, step, checkpoints, loop.

`train(experiment)` reads top to bottom; every detail is one call away and every
knob is a field of the Experiment (glm_jax.experiment), built from gin at the
command line (glm_jax.cli.train).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from glm_jax.checkpoint import DamagedCheckpoint
from glm_jax.data.chat_source import is_chat_source
from glm_jax.data.pipeline import LocalBatches, load_tokenizer, make_batches
from glm_jax.evaluation import eval_stream, evaluate, make_eval_step
from glm_jax.experiment import Experiment
from glm_jax.model import ModelConfig
from glm_jax.optim import make_optimizer
from glm_jax.parallel.batch import (batch_shardings, check_batch_fits_mesh, check_sequence_fits_mesh,
                                    global_batch, row_shard)
from glm_jax.model.pipeline_parallel import check_stages_fit_mesh
from glm_jax.parallel.mesh import make_mesh
from glm_jax.parallel.rules import logical_axis_rules
from glm_jax.run_dir import RunDir
from glm_jax.train import flops
from glm_jax.train.log import RunLogger
from glm_jax.train.state import TrainState, check_trainable, frozen_shardings, init_state, restore_state, state_shardings
from glm_jax.train.step import make_train_step


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def train(experiment: Experiment) -> dict:
    """Trains a GLM as the experiment says; resumes from the latest checkpoint of its run directory.

    Returns the final summary (also printed and written to RUN/summary.json). SIGTERM
    (preemption) and a first Ctrl-C both finish the current step, save it and return
    (summary['stopped_by'] names the signal); a second Ctrl-C exits at once.
    """
    stop = _StopSignals()  # first, so a signal during start-up still ends in a clean save
    try:
        return _train(experiment, stop)
    finally:
        stop.restore()


def _train(experiment: Experiment, stop: _StopSignals) -> dict:
    settings, model = experiment.train, experiment.model
    check_trainable(model)
    run = RunDir(settings.run_dir)
    mesh, rules = make_mesh(experiment.mesh), logical_axis_rules(settings.sharding)
    check_batch_fits_mesh(experiment.data.batch_size, experiment.optimizer.grad_accum_steps, mesh)
    adapter_kind = settings.adapter if settings.adapter != "none" else None
    check_sequence_fits_mesh(experiment.data.seq_len, mesh, adapter_kind)
    check_stages_fit_mesh(model, experiment.data.batch_size, experiment.optimizer.grad_accum_steps, mesh,
                          adapter_kind)
    shard_index, shard_count = row_shard(mesh)  # processes that share a split sequence load the same rows

    base = RunDir.resolve(settings.init_from) if settings.init_from else None
    data = experiment.data
    if base and data.tokenizer_path is None:  # fine-tuning reads the base run's tokenizer
        data = dataclasses.replace(data, tokenizer_path=str(base[0].tokenizer_path))
    tokenizer = load_tokenizer(data)
    _check_vocabulary(model, tokenizer.vocab_size, data)
    tx, schedule = make_optimizer(experiment.optimizer, settings.steps)
    adapter = experiment.adapters  # train.adapter: only adapters train; the base stays frozen beside the state
    shardings = state_shardings(model, tx, mesh, rules, adapter)
    batch_sharding = batch_shardings(mesh)
    frozen, frozen_sharding = (), ()
    if adapter is not None:
        frozen_sharding = (frozen_shardings(model, mesh, rules),)
        frozen = (_frozen_base(run, base, model, frozen_sharding[0]),)

    checkpoints = run.checkpointer(keep=settings.keep_checkpoints)
    restored = _restore_newest_intact(run, checkpoints, model, tx, shardings, adapter)
    if restored is None and base is not None and adapter is None:
        state, data_state = _state_from(base, model, tx, shardings), None
    elif restored is None:  # a new model, or new adapters (fresh LoRA: the base's function)
        state, data_state = init_state(model, tx, jax.random.key(settings.seed), shardings, adapter), None
    else:
        state, meta = restored
        data_state = meta["data"][jax.process_index()]
    if int(state.step) >= settings.steps:
        checkpoints.close()
        print(f"{run.path} is already trained to step {int(state.step)} (train.steps = {settings.steps}); raise "
              "train.steps to continue it or choose another RUN_DIR", flush=True)
        return {"final_train_loss": None, "losses": [],
                "checkpoint": str(checkpoints.directory / str(checkpoints.latest_step())),
                "preempted": False, "stopped_by": None}
    batches = make_batches(data, experiment.objective, "train", shard_index, shard_count, tokenizer, data_state)
    eval_data = eval_stream(data, experiment.objective, tokenizer, process_index=shard_index,
                            process_count=shard_count)

    with jax.set_mesh(mesh):
        train_step = jax.jit(make_train_step(model, tx, schedule, rules, experiment.optimizer.grad_accum_steps,
                                             settings.z_loss, settings.loss_chunk_length, adapter, settings.seed),
                             in_shardings=(shardings, batch_sharding, *frozen_sharding),
                             out_shardings=(shardings, None), donate_argnums=0)
        eval_step = jax.jit(make_eval_step(model, rules, settings.loss_chunk_length, adapter),
                            in_shardings=(shardings.params, batch_sharding, *frozen_sharding))
    peak, peak_source = flops.peak_flops_per_device(jax.devices()[0])
    with RunLogger(run, settings.steps, start_step=int(state.step), gin_config=experiment.gin_text,
                   tokenizer=tokenizer) as logger:
        last, window = {}, _MetricsWindow()
        for step in range(int(state.step), settings.steps):
            local = next(batches)
            started = time.perf_counter()
            # The step only dispatches: its metrics stay on the device until the window is fetched
            # (the guard makes a stray per-step host sync an error on GPU / TPU).
            with jax.set_mesh(mesh), jax.transfer_guard_device_to_host("disallow"):
                state, step_metrics = train_step(state, global_batch(local, batch_sharding, shard_count), *frozen)
            window.add(step + 1, step_metrics, local, started)

            checkpoint_due = (step + 1) % settings.checkpoint_every == 0
            eval_due = (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps
            # Multi-process runs agree on a stop only at the (identical) window boundaries: a signal
            # seen by one process must not start a collective the others do not join.
            stop_seen = jax.process_count() == 1 and stop.requested
            done = step + 1 == settings.steps or stop_seen
            if done or checkpoint_due or eval_due or (step + 1) % settings.log_every == 0:
                last = _log_window(window, model, peak, logger, checkpoints, settings.log_every, shard_count) or last
                done = done or stop.agreed()
            if checkpoint_due or done:
                checkpoints.save(step + 1, state.params, state.opt_state, _all_data_states(batches),
                                 experiment.gin_text)
            if eval_due:
                with jax.set_mesh(mesh):
                    scores = evaluate(lambda params, batch: eval_step(params, batch, *frozen), state.params,
                                      eval_data, settings.eval_batches,
                                      to_device=lambda batch: global_batch(batch, batch_sharding, shard_count))
                logger.log_eval(step + 1, scores)
            if done:
                break

        checkpoints.close()
        return logger.finish(last, peak_source, checkpoints.directory, checkpoints.latest_step(),
                             stopped_by=stop.received)


def _restore_newest_intact(run: RunDir, checkpoints, model: ModelConfig, tx, shardings, adapter=None):
    """(state, meta) of the newest checkpoint that restores, or None. Damaged steps are moved aside, loudly."""
    for step in reversed(checkpoints.all_steps()):
        try:
            return restore_state(checkpoints, step, model, tx, shardings, adapter)
        except DamagedCheckpoint as damaged:
            if jax.process_index() == 0:
                moved = checkpoints.move_aside(step, run.damaged_checkpoints_path)
                print(f"WARNING: {damaged}. Moved it to {moved} (nothing is deleted); trying the checkpoint "
                      "before it.", file=sys.stderr, flush=True)
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices(f"moved damaged checkpoint {step}")
                checkpoints.reload()
    return None


def _state_from(base: tuple[RunDir, int | None], model: ModelConfig, tx, shardings):
    """Step 0 of a fine-tuning run: the base run's parameters (placed in their shards), a fresh optimizer."""
    run, step = base
    params, step = run.restore_params(model, step, shardings.params)
    print(f"starting from the parameters of {run.path} step {step} (train.init_from)", flush=True)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return TrainState(step=jax.device_put(np.zeros((), np.int32), shardings.step), params=params, opt_state=opt_state)


def _frozen_base(run: RunDir, base: tuple[RunDir, int | None], model: ModelConfig, shardings):
    """An adapter run's frozen parameters: recorded at its start (adapter_base.json), checked when it resumes."""
    if not run.adapter_base_path.is_file():
        base_run, step = base
        if step is None:
            checkpoints = base_run.checkpointer(read_only=True)
            step = checkpoints.latest_step()
            checkpoints.close()
        run.path.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            run.write_adapter_base(base_run, step)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("adapter base recorded")
    params = run.adapter_base(model, shardings)
    print(f"training adapters on the frozen parameters of {json.loads(run.adapter_base_path.read_text())['run']} "
          "(train.init_from)", flush=True)
    return params


def _check_vocabulary(model: ModelConfig, tokenizer_size: int, data) -> None:
    if model.vocab_size >= tokenizer_size:
        return
    if is_chat_source(data.source):
        raise ValueError(f"with the chat role tokens the tokenizer has {tokenizer_size} ids, but the model's "
                         f"embedding table has ModelConfig.vocab_size = {model.vocab_size} rows; fine-tune a "
                         "model whose vocabulary has room for them (THUDM's checkpoints pad theirs; glm_jax's own "
                         "tokenizers reserve pieces for them)")
    raise ValueError(f"ModelConfig.vocab_size {model.vocab_size} is smaller than the tokenizer's "
                     f"{tokenizer_size} pieces; raise ModelConfig.vocab_size to at least "
                     f"{tokenizer_size} or lower DataConfig.vocab_size")


def _all_data_states(batches: LocalBatches) -> list:
    """Every process's data state (all processes call this; process 0 writes it)."""
    mine = batches.state_array()
    gathered = np.asarray(multihost_utils.process_allgather(mine)) if jax.process_count() > 1 else mine[None]
    return [LocalBatches.state_from_array(process) for process in gathered]


class _MetricsWindow:
    """The metrics of the steps since the last fetch, kept on the device, fetched in one transfer.

    Steps are dispatched asynchronously; fetching waits for the window's last step, so the
    window's wall time over its steps is the mean step time (the first window includes the compile).
    """

    def __init__(self):
        self.steps: list[int] = []
        self.metrics: list[dict] = []
        self.rows: list[dict] = []  # what each step's FLOP count needs (host arrays)
        self.started = 0.0
        self.compiled = False  # the first window's time includes compiling the step

    def add(self, step: int, metrics: dict, local: dict, started: float) -> None:
        if not self.steps:
            self.started = started
        self.steps.append(step)
        self.metrics.append(metrics)
        self.rows.append({"tokens": local["tokens"].size, "segment_ids": local["segment_ids"],
                          "prefix_mask": local["prefix_mask"]})

    def fetch(self) -> tuple[list[tuple[int, dict, dict]], float, bool]:
        """[(step, metrics as floats, its rows)] of the window, its mean seconds per step, and
        whether those seconds are steady (False for the first window: it includes the compile)."""
        host = jax.device_get(self.metrics)
        seconds = (time.perf_counter() - self.started) / max(len(self.steps), 1)
        fetched = [(step, {k: float(v) for k, v in metrics.items()}, rows)
                   for step, metrics, rows in zip(self.steps, host, self.rows)]
        self.steps, self.metrics, self.rows = [], [], []
        steady, self.compiled = self.compiled, True
        return fetched, seconds, steady


def _log_window(window: _MetricsWindow, model: ModelConfig, peak: float | None, logger: RunLogger,
                checkpoints, log_every: int, row_shards: int) -> dict:
    """Fetches the window, stops on a non-finite loss (before anything is saved), logs every step.

    Returns the last step's metrics ({} for an empty window).
    """
    rows, seconds, steady = window.fetch()
    for step, metrics, _ in rows:
        if not np.isfinite(metrics["loss"]):
            checkpoints.close()
            fetched = (f" (steps {rows[0][0]}..{rows[-1][0]} ran before their metrics were fetched together, "
                       f"train.log_every = {log_every})" if len(rows) > 1 else "")
            raise TrainingDiverged(
                f"loss is {metrics['loss']} at step {step}; stopped without saving{fetched}. The last good "
                f"checkpoint is step {checkpoints.latest_step()} in {checkpoints.directory}; lower the learning "
                "rate or raise grad clipping / z_loss and resume from it")
    last = {}
    for step, metrics, batch_rows in rows:
        last = {**metrics, **_throughput(model, batch_rows, seconds, peak, row_shards)}
        logger.log_step(step, last, steady)
    return last


def _throughput(model: ModelConfig, rows: dict, seconds: float, peak: float | None, row_shards: int) -> dict:
    """Rates of one step of this process's rows (tokens, segment_ids, prefix_mask) taking `seconds`;
    the global batch is row_shards such slices (parallel.batch.row_shard)."""
    tokens = rows["tokens"] * row_shards
    pairs = flops.training_flops_both(model, rows["segment_ids"], rows["prefix_mask"])
    per_device = {key: pairs[key] * row_shards / seconds / jax.device_count()
                  for key in ("attended", "full_matrix")}
    rates = {"step_seconds": seconds, "tokens_per_second": tokens / seconds,
             "model_flops_per_device": per_device["attended"]}
    if peak is not None:  # MFU only against a fixed hardware peak (flops.peak_flops_per_device)
        rates.update(mfu=per_device["attended"] / peak, mfu_full_matrix=per_device["full_matrix"] / peak)
    return rates


class _StopSignals:
    """SIGTERM (TPU preemption, SLURM time limit) or Ctrl-C asks the loop to checkpoint and stop.

    The first Ctrl-C is handled like SIGTERM, so a save in progress completes and the step
    reached is saved. It also gives SIGINT back to the operating system's default, so a
    second Ctrl-C ends the process at once, even inside a long compile or save (Python runs
    its own handlers only between bytecodes): Orbax writes each step to a temporary
    directory and renames it when complete, so the newest complete step stays loadable.
    The previous handlers come back when training returns.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            print("\nCtrl-C: finishing this step, saving a checkpoint and stopping (Ctrl-C again exits at once, "
                  "keeping the newest complete checkpoint)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """True on every process once any process was signalled (saving is collective)."""
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))

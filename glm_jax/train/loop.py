"""The training program: mesh, rules, data, state, step, checkpoints, loop.

Every knob is a gin binding (experiments/configs/*.gin); `train` reads top to
bottom and each detail is one call away.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path

import gin
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from glm_jax.data.objectives import Objective
from glm_jax.data.pipeline import DataConfig, LocalBatches, load_tokenizer, make_batches
from glm_jax.model import ModelConfig
from glm_jax.parallel.mesh import MeshConfig, make_mesh
from glm_jax.parallel.rules import logical_axis_rules
from glm_jax.train import metrics as flops
from glm_jax.train.checkpoint import Checkpointer
from glm_jax.train.log import RunLogger
from glm_jax.train.optim import OptimizerConfig, make_optimizer
from glm_jax.train.state import abstract_state, init_state, state_shardings
from glm_jax.train.step import make_eval_step, make_train_step


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@gin.configurable
def train(run_dir: str = gin.REQUIRED, steps: int = gin.REQUIRED, *, sharding: str = "fsdp",
          checkpoint_every: int = 100, keep_checkpoints: int = 3, eval_every: int = 100, eval_batches: int = 4,
          seed: int = 0, z_loss: float = 0.0) -> dict:
    """Trains a GLM from gin bindings; resumes from the latest checkpoint in run_dir.

    Returns the final summary (also printed and written to run_dir/summary.json).
    """
    stop = _PreemptionFlag()  # first, so a SIGTERM during start-up still ends in a clean save
    run_dir = Path(run_dir).absolute()
    model, data, objective, optimizer = ModelConfig(), DataConfig(), Objective(), OptimizerConfig()
    mesh, rules = make_mesh(MeshConfig()), logical_axis_rules(sharding)

    tokenizer = load_tokenizer(data)
    if model.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"ModelConfig.vocab_size {model.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} pieces; raise ModelConfig.vocab_size to at least "
                         f"{tokenizer.vocab_size} or lower DataConfig.vocab_size")
    tx, schedule = make_optimizer(optimizer, steps)
    shardings = state_shardings(model, tx, mesh, rules)
    batch_sharding = {k: NamedSharding(mesh, PartitionSpec(("data", "fsdp"))) for k in
                      ("tokens", "targets", "loss_mask", "segment_ids", "prefix_mask")}
    batch_sharding["positions"] = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, None))

    checkpoints = Checkpointer(run_dir / "checkpoints", keep=keep_checkpoints)
    latest = checkpoints.latest_step()
    if latest is None:
        state, data_state = init_state(model, tx, jax.random.key(seed), shardings), None
    else:
        state, meta = checkpoints.restore(latest, abstract_state(model, tx), shardings)
        data_state = meta["data"][jax.process_index()]
    if int(state.step) >= steps:
        checkpoints.close()
        print(f"{run_dir} is already trained to step {int(state.step)} (train.steps = {steps}); raise "
              "train.steps to continue it or choose another RUN_DIR", flush=True)
        return {"final_train_loss": None, "losses": [], "checkpoint": str(checkpoints.directory / str(latest)),
                "preempted": False}
    batches = make_batches(data, objective, "train", tokenizer=tokenizer, state=data_state)
    eval_data = make_batches(dataclasses.replace(data, seed=data.seed + 1), objective, "eval", tokenizer=tokenizer)

    with jax.set_mesh(mesh):
        train_step = jax.jit(make_train_step(model, tx, schedule, rules, optimizer.grad_accum_steps, z_loss),
                             in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                             donate_argnums=0)
        eval_step = jax.jit(make_eval_step(model, rules), in_shardings=(shardings.params, batch_sharding))
    gin_config = gin.operative_config_str()
    logger = RunLogger(run_dir, steps, start_step=int(state.step), gin_config=gin_config, tokenizer=tokenizer)
    peak, peak_source = flops.peak_flops_per_device(jax.devices()[0])

    last = {}
    for step in range(int(state.step), steps):
        local = next(batches)
        start = time.perf_counter()
        with jax.set_mesh(mesh):
            state, step_metrics = train_step(state, _global_batch(local, batch_sharding))
        last = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        seconds = time.perf_counter() - start
        if not np.isfinite(last["loss"]):
            checkpoints.close()
            raise TrainingDiverged(
                f"loss is {last['loss']} at step {step + 1}; stopped without saving. The last good checkpoint "
                f"is step {checkpoints.latest_step()} in {checkpoints.directory}; lower the learning rate or "
                "raise grad clipping / z_loss and resume from it")
        last.update(_throughput(model, local, seconds, peak))
        logger.log_step(step + 1, last)

        done = step + 1 == steps or stop.agreed()
        if (step + 1) % checkpoint_every == 0 or done:
            checkpoints.save(step + 1, state, _all_data_states(batches), gin_config)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            logger.log_eval(step + 1, evaluate(eval_step, state.params, eval_data, batch_sharding, mesh,
                                               eval_batches))
        if done:
            break

    checkpoints.close()
    summary = logger.finish(last, peak_source, checkpoints.directory, checkpoints.latest_step(),
                            preempted=stop.requested)
    return summary


def evaluate(eval_step, params, batches: LocalBatches, batch_sharding, mesh, num_batches: int) -> dict:
    """Loss and masked-token accuracy over the first num_batches batches of the eval split."""
    batches.rewind()
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for _ in range(num_batches):
        with jax.set_mesh(mesh):
            sums = jax.device_get(eval_step(params, _global_batch(next(batches), batch_sharding)))
        for key in totals:
            totals[key] += float(sums[key])
    count = max(totals["count"], 1.0)
    return {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count}


def _global_batch(local: dict, shardings: dict) -> dict:
    """Per-process rows -> global jax.Arrays sharded over ('data', 'fsdp')."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}


def _all_data_states(batches: LocalBatches) -> list:
    """Every process's data state (all processes call this; process 0 writes it)."""
    mine = np.asarray([[s["epoch"], s["group"], s["row"]] for s in batches.get_state()["shards"]], np.int64)
    gathered = np.asarray(multihost_utils.process_allgather(mine)) if jax.process_count() > 1 else mine[None]
    return [{"shards": [dict(zip(("epoch", "group", "row"), map(int, row))) for row in process]}
            for process in gathered]


def _throughput(model: ModelConfig, local: dict, seconds: float, peak: float) -> dict:
    tokens = local["tokens"].size * jax.process_count()
    counted = flops.training_flops_both(model, local["segment_ids"], local["prefix_mask"])
    devices = jax.device_count()
    return {"step_seconds": seconds, "tokens_per_second": tokens / seconds,
            "mfu": counted["attended"] * jax.process_count() / seconds / (peak * devices),
            "mfu_full_matrix": counted["full_matrix"] * jax.process_count() / seconds / (peak * devices)}


class _PreemptionFlag:
    """SIGTERM (TPU preemption, SLURM time limit) asks the loop to checkpoint and stop."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        """True on every process once any process was signalled (saving is collective)."""
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


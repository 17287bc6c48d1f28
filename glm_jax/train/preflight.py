"""Ahead-of-time compile of the full sharded train step for a TPU topology, on a CPU machine.

Uses libtpu's topology descriptions (`pip install 'glm_jax[tpu]'`): the REAL TPU
compiler (Mosaic included) builds the step for the pod's devices, and
`compiled.memory_analysis()` gives per-device HBM (glm_jax.parallel.tpu_topology). So an OOM is found before a pod
is booked (MaxText's train_compile). The command line is `glm_jax preflight`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from glm_jax.experiment import Experiment
from glm_jax.optim import make_optimizer
from glm_jax.parallel.batch import abstract_batch, check_sequence_fits_mesh
from glm_jax.model.pipeline_parallel import check_stages_fit_mesh
from glm_jax.parallel.mesh import make_mesh
from glm_jax.parallel.rules import logical_axis_rules
from glm_jax.train.state import (abstract_boxed_params, abstract_state, check_trainable, frozen_shardings, placed,
                                 state_shardings)
from glm_jax.train.step import make_train_step

def accelerator_experiment(experiment: Experiment) -> Experiment:
    """The experiment as a pod would run it: dtype 'auto' becomes bfloat16, the mesh spans all devices."""
    model = experiment.model
    if model.dtype == "auto":
        model = model.replace(dtype="bfloat16")
    return experiment.replace(model=model, mesh=dataclasses.replace(experiment.mesh, num_devices=None))


def compile_train_step(devices, experiment: Experiment):
    """The compiled train step for `devices` (abstract inputs only; nothing is allocated).

    An adapter experiment (train.adapter) compiles its own step: adapters and their moments in
    the state, the frozen base parameters as a third (abstract, sharded) argument.
    """
    check_trainable(experiment.model)
    mesh = make_mesh(experiment.mesh, devices)
    adapter_kind = experiment.adapters.kind if experiment.adapters else None
    check_sequence_fits_mesh(experiment.data.seq_len, mesh, adapter_kind)
    check_stages_fit_mesh(experiment.model, experiment.data.batch_size, experiment.optimizer.grad_accum_steps, mesh,
                          adapter_kind)
    rules = logical_axis_rules(experiment.train.sharding)
    tx, schedule = make_optimizer(experiment.optimizer, experiment.train.steps)
    adapter = experiment.adapters
    shardings = state_shardings(experiment.model, tx, mesh, rules, adapter)
    state = placed(abstract_state(experiment.model, tx, adapter), shardings)
    frozen = () if adapter is None else (placed(nn.unbox(abstract_boxed_params(experiment.model)),
                                             frozen_shardings(experiment.model, mesh, rules)),)
    batch = abstract_batch(mesh, experiment.data.batch_size, experiment.data.seq_len)
    step = make_train_step(experiment.model, tx, schedule, rules, experiment.optimizer.grad_accum_steps,
                           experiment.train.z_loss, experiment.train.loss_chunk_length, adapter)
    with jax.set_mesh(mesh):
        return jax.jit(step, donate_argnums=0).lower(state, batch, *frozen).compile()

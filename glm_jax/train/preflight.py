"""Ahead-of-time compile of the full sharded train step for a TPU topology, on a CPU machine.

Uses libtpu's topology descriptions (`pip install 'glm_jax[tpu]'`): the REAL TPU
compiler (Mosaic included) builds the step for the pod's devices, and
`compiled.memory_analysis()` gives per-device HBM. So an OOM is found before a pod
is booked (MaxText's train_compile). The command line is `glm_jax preflight`.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax

from glm_jax.experiment import Experiment
from glm_jax.optim import make_optimizer
from glm_jax.parallel.batch import abstract_batch
from glm_jax.parallel.mesh import make_mesh
from glm_jax.parallel.rules import logical_axis_rules
from glm_jax.train.state import abstract_boxed_params, abstract_state, frozen_shardings, placed, state_shardings
from glm_jax.train.step import make_train_step

# HBM per chip (bytes), from the vendor specifications.
HBM_BYTES = {"TPU v4": 32 << 30, "TPU v5 lite": 16 << 30, "TPU v5e": 16 << 30, "TPU v5p": 95 << 30,
             "TPU v5": 95 << 30, "TPU v6 lite": 32 << 30, "TPU v6e": 32 << 30}


def hbm_capacity(device_kind: str) -> int:
    for name, capacity in HBM_BYTES.items():
        if device_kind.startswith(name):
            return capacity
    raise ValueError(f"unknown TPU kind {device_kind!r}; known: {sorted(HBM_BYTES)}")


def topology_devices(topology: str):
    from jax.experimental import topologies

    # Describing a topology loads libtpu; let several processes (test workers, a
    # preflight next to another job) do so without fighting over its lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as error:  # libtpu missing or a bad name: say which
        raise SystemExit(f"preflight: cannot describe TPU topology {topology!r} ({error}); install libtpu "
                         "with `pip install 'glm_jax[tpu]'` and use names like v5e:2x2, v4:2x2x1, v5p:2x2x2")


def accelerator_experiment(experiment: Experiment) -> Experiment:
    """The experiment as a pod would run it: dtype 'auto' becomes bfloat16, the mesh spans all devices."""
    model = experiment.model
    if model.dtype == "auto":
        model = model.replace(dtype="bfloat16")
    return experiment.replace(model=model, mesh=dataclasses.replace(experiment.mesh, num_devices=None))


def compile_train_step(devices, experiment: Experiment):
    """The compiled train step for `devices` (abstract inputs only; nothing is allocated).

    An adapter experiment (LoRA, P-tuning) compiles its own step: adapters and their moments in
    the state, the frozen base parameters as a third (abstract, sharded) argument.
    """
    mesh = make_mesh(experiment.mesh, devices)
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



def report(compiled, device_kind: str) -> dict:
    stats = compiled.memory_analysis()
    used = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes + stats.generated_code_size_in_bytes)
    capacity = hbm_capacity(device_kind)
    return {"device_kind": device_kind, "arguments": stats.argument_size_in_bytes,
            "outputs": stats.output_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
            "aliased": stats.alias_size_in_bytes, "per_device_bytes": used, "hbm_bytes": capacity,
            "fits": used <= capacity}

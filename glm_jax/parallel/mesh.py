"""Device meshes ('data', 'stage', 'fsdp', 'sequence', 'tensor') and multi-host initialisation.

Mesh sizes come from the experiment's MeshConfig; one size may be -1 and takes the remaining devices.
Multi-slice TPU runs give the DCN (between-slice) factor of each axis and get a
hybrid ICI x DCN mesh from jax.experimental.mesh_utils.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from glm_jax.parallel.rules import MESH_AXES


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; -1 fills the rest. dcn_* are between-slice factors.

    sequence: devices one sequence is split over (context parallelism,
    glm_jax/kernels/context_parallel.py); 1 keeps every sequence on one device.
    stage: pipeline stages the layer stack is split into (glm_jax/model/pipeline_parallel.py;
    ModelConfig.pipeline_microbatches sets the schedule's micro-batches); 1 = no pipeline.
    num_devices: use only the first N devices (None = all), e.g. to compare a run
    on fewer devices.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    sequence: int = 1
    stage: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    dcn_sequence: int = 1
    dcn_stage: int = 1
    num_devices: int | None = None

    def sizes(self) -> tuple[int, ...]:
        """The axis sizes in MESH_AXES order."""
        return tuple(getattr(self, axis) for axis in MESH_AXES)

    def dcn_sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, f"dcn_{axis}") for axis in MESH_AXES)

    def shape(self, num_devices: int) -> tuple[int, ...]:
        return resolve_shape(self.sizes(), num_devices)


def resolve_shape(sizes: tuple[int, ...], num_devices: int) -> tuple[int, ...]:
    """Replaces one -1 by what is left; checks the product equals num_devices."""
    if list(sizes).count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if known <= 0 or num_devices % known:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the {num_devices} devices; "
                         "change MeshConfig (one axis may be -1 to take the rest)")
    shape = tuple(num_devices // known if s == -1 else s for s in sizes)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} devices but "
                         f"{num_devices} are present; set one MeshConfig axis to -1")
    return shape


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """The ('data', 'stage', 'fsdp', 'sequence', 'tensor') mesh over `devices` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    if config.num_devices is not None:
        if config.num_devices > len(devices):
            raise ValueError(f"MeshConfig.num_devices {config.num_devices} exceeds the {len(devices)} devices")
        devices = devices[:config.num_devices]
    dcn = config.dcn_sizes()
    if math.prod(dcn) > 1:
        num_slices = math.prod(dcn)
        ici = resolve_shape(config.sizes(), len(devices) // num_slices)
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        shape = config.shape(len(devices))
        try:
            grid = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices).reshape(shape)  # e.g. CPU or a subset of devices
    return Mesh(grid, MESH_AXES)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Starts jax.distributed when the run spans several processes.

    TPU pods: GLM_JAX_DISTRIBUTED=auto (launch.sh tpu sets it) and jax
    auto-detects the rest. SLURM: read from SLURM_* variables. GPU clusters and local
    multi-process runs: the coordinator address, process count and id, given as
    arguments or in GLM_JAX_COORDINATOR / GLM_JAX_NUM_PROCESSES / GLM_JAX_PROCESS_ID
    (launch.sh sets them; under SLURM they come from SLURM_* variables).
    Local CPU processes talk through gloo collectives.
    """
    coordinator = coordinator or os.environ.get("GLM_JAX_COORDINATOR")
    if coordinator is None and "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()  # jax reads the SLURM environment itself
        return
    if coordinator is None:
        if os.environ.get("GLM_JAX_DISTRIBUTED") == "auto":  # set by `launch.sh tpu`
            jax.distributed.initialize()  # TPU pod: coordinator and process ids auto-detected
        return
    num_processes = num_processes or int(os.environ["GLM_JAX_NUM_PROCESSES"])
    process_id = process_id if process_id is not None else int(os.environ["GLM_JAX_PROCESS_ID"])
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)

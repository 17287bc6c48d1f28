"""TPU topologies described on a CPU machine (libtpu), and what a compiled program needs of a chip.

`topology_devices('v5e:4x4')` gives the pod's devices without owning them: programs lowered
for them are compiled by the real TPU compiler, and `memory_report` reads per-device HBM from
the compiled program's memory analysis. The train step's preflight (glm_jax.train.preflight)
and the decoder's (glm_jax.infer.preflight) both use these.
"""

from __future__ import annotations

import os

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


def memory_report(compiled, device_kind: str) -> dict:
    stats = compiled.memory_analysis()
    used = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes + stats.generated_code_size_in_bytes)
    capacity = hbm_capacity(device_kind)
    return {"device_kind": device_kind, "arguments": stats.argument_size_in_bytes,
            "outputs": stats.output_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
            "aliased": stats.alias_size_in_bytes, "per_device_bytes": used, "hbm_bytes": capacity,
            "fits": used <= capacity}

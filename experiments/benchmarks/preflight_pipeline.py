"""Per-chip HBM and pipeline bubble of GLM-130B training in its 3D layout (data x tensor x stage).

    pip install 'glm_jax[tpu]'    # libtpu: the real TPU compiler, run on this CPU machine
    python experiments/benchmarks/preflight_pipeline.py [--topology v5p:4x4x5] [--stages 10] [--tensor 4] \
        [--microbatches 10 40] [--rows data fsdp] [--out experiments/results/preflight_pipeline.json] [--gin 'NAME = VALUE' ...]

Side by side in one run, the full sharded train step of glm_130b (bf16 compute, remat 'full',
the Mosaic flash kernel, the chunked head + loss, T = 2048) compiled ahead of time for the
topology (glm_jax.train.preflight) in glm_jax/configs/meshes/glm_130b_3d.gin's layout:
tensor --tensor x stage --stages x the rest, which is plain data parallelism or FSDP
(--rows), one row per micro-batch count (more micro-batches: a smaller bubble, more
activations held). The global batch gives every data-parallel group one row per micro-batch. Prints a table (per-chip bytes, whether the step
fits the chip's HBM, the GPipe bubble) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from glm_jax import experiment as experiment_lib
from glm_jax.model.pipeline_parallel import bubble_fraction
from glm_jax.parallel import tpu_topology
from glm_jax.train import preflight

REPO = Path(__file__).resolve().parents[2]


def glm_130b_experiment(stages: int, tensor: int, microbatches: int, batch: int, rows: str, extra=()):
    """rows: the axis the rest of the chips take, 'data' (weights and optimizer state replicated) or 'fsdp'
    (split: ZeRO-3 over the data-parallel groups)."""
    other = "fsdp" if rows == "data" else "data"
    bindings = ["DataConfig.seq_len = 2048", f"DataConfig.batch_size = {batch}", "ModelConfig.remat_policy = 'full'",
                f"MeshConfig.stage = {stages}", f"MeshConfig.tensor = {tensor}", f"MeshConfig.{rows} = -1",
                f"MeshConfig.{other} = 1",
                f"ModelConfig.pipeline_microbatches = {microbatches}", *extra]
    experiment = experiment_lib.from_gin([REPO / "experiments/configs/glm_tiny_stdlib.gin", "models/glm_130b.gin",
                                          "meshes/glm_130b_3d.gin"], bindings)
    return preflight.accelerator_experiment(experiment)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p:4x4x5")
    parser.add_argument("--stages", type=int, default=10)
    parser.add_argument("--tensor", type=int, default=4)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--rows", nargs="+", choices=["data", "fsdp"], default=["data", "fsdp"],
                        help="the axis that takes the remaining chips: plain data parallelism, or FSDP")
    parser.add_argument("--gin", action="append", default=[], help="extra binding, e.g. 'ModelConfig.num_layers = 10'")
    parser.add_argument("--out", default="experiments/results/preflight_pipeline.json")
    args = parser.parse_args()

    devices = tpu_topology.topology_devices(args.topology)
    chips = len(devices)
    groups = chips // (args.stages * args.tensor)
    rows = []
    for row_axis in args.rows:
        for microbatches in args.microbatches:
            batch = groups * microbatches
            experiment = glm_130b_experiment(args.stages, args.tensor, microbatches, batch, row_axis, args.gin)
            try:
                compiled = preflight.compile_train_step(devices, experiment)
                report = tpu_topology.memory_report(compiled, devices[0].device_kind)
            except Exception as error:  # the TPU compiler refuses a step that cannot fit: report its words
                report = {"fits": False, "error": str(error).splitlines()[0][:300]}
            rows.append({"layout": f"{row_axis} {groups} x tensor {args.tensor} x stage {args.stages}",
                         "microbatches": microbatches, "global_batch": batch,
                         "bubble": bubble_fraction(args.stages, microbatches), **report})
            print(f"compiled: {rows[-1]['layout']}, {microbatches} micro-batches", flush=True)

    gib = 1 << 30
    print(f"\nglm_130b train step {args.gin or ''}, {args.topology} ({chips} x {devices[0].device_kind}), "
          "T=2048, bf16, remat full, GPipe")
    print(f"{'layout':<32} {'micro-batches':>13} {'batch':>5} {'bubble':>7} {'temporaries GiB':>16} "
          f"{'per chip GiB':>13} {'fits':>5}")
    for r in rows:
        head = f"{r['layout']:<32} {r['microbatches']:>13} {r['global_batch']:>5} {r['bubble']:>7.1%}"
        if "error" in r:
            print(f"{head} {'-':>16} {'-':>13} {'False':>5}  ({r['error']})")
        else:
            print(f"{head} {r['temporaries'] / gib:>16.2f} {r['per_device_bytes'] / gib:>13.2f} {str(r['fits']):>5}")
    result = {"benchmark": "preflight_pipeline (glm_130b)", "topology": args.topology, "stages": args.stages,
              "tensor": args.tensor, "bindings": args.gin, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Per-chip HBM of GLM-4-9B training on 128k-token sequences: one sequence per chip vs split over chips.

    pip install 'glm_jax[tpu]'    # libtpu: the real TPU compiler, run on this CPU machine
    python experiments/benchmarks/preflight_context.py [--topology v5p:2x2x4] [--seq_len 131072] \
        [--sequence 8] [--out experiments/results/preflight_context.json] [--gin 'NAME = VALUE' ...]

Side by side in one run: the full sharded train step of glm4_9b (bf16 compute, remat
'full', the Mosaic flash kernel, the chunked head + loss) compiled ahead of time for the
topology (glm_jax.train.preflight) with
  - no context parallelism: FSDP over every chip, one sequence per chip (the fewest
    tokens per chip a layout without a sequence split can have), and
  - context parallelism: MeshConfig.sequence = --sequence chips per sequence
    (glm_jax/kernels/context_parallel.py), FSDP over the rest, one sequence per group.
Prints a table (temporaries and per-chip bytes, and whether the step fits the chip's
HBM) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from glm_jax import experiment as experiment_lib
from glm_jax.parallel import tpu_topology
from glm_jax.train import preflight

REPO = Path(__file__).resolve().parents[2]


def glm4_9b_experiment(seq_len: int, batch: int, sequence: int, extra=()):
    bindings = [f"DataConfig.seq_len = {seq_len}", f"DataConfig.batch_size = {batch}",
                "ModelConfig.remat_policy = 'full'", f"MeshConfig.sequence = {sequence}", "MeshConfig.fsdp = -1",
                *extra]
    experiment = experiment_lib.from_gin([REPO / "experiments/configs/glm_tiny_stdlib.gin", "models/glm4_9b.gin"],
                                         bindings)
    return preflight.accelerator_experiment(experiment)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p:2x2x4")
    parser.add_argument("--seq_len", type=int, default=131072)
    parser.add_argument("--sequence", type=int, default=8, help="chips per sequence in the context-parallel layout")
    parser.add_argument("--gin", action="append", default=[], help="extra binding, e.g. 'ModelConfig.num_layers = 2'")
    parser.add_argument("--out", default="experiments/results/preflight_context.json")
    args = parser.parse_args()

    devices = tpu_topology.topology_devices(args.topology)
    chips = len(devices)
    layouts = [("one sequence per chip (FSDP)", 1, chips),
               (f"context parallel: {args.sequence} chips per sequence x FSDP {chips // args.sequence}",
                args.sequence, chips // args.sequence)]
    rows = []
    for name, sequence, batch in layouts:
        experiment = glm4_9b_experiment(args.seq_len, batch, sequence, args.gin)
        try:
            compiled = preflight.compile_train_step(devices, experiment)
            report = tpu_topology.memory_report(compiled, devices[0].device_kind)
        except Exception as error:  # the TPU compiler refuses a step that cannot fit: report its words
            report = {"fits": False, "error": str(error).splitlines()[0][:300]}
        rows.append({"layout": name, "sequence": sequence, "global_batch": batch, **report})
        print(f"compiled: {name}", flush=True)

    gib = 1 << 30
    print(f"\nglm4_9b train step {args.gin or ''}, {args.topology} ({chips} x {devices[0].device_kind}), "
          f"T={args.seq_len} tokens per sequence, bf16, remat full")
    print(f"{'layout':<52} {'batch':>5} {'temporaries GiB':>16} {'per chip GiB':>13} {'fits':>5}")
    for r in rows:
        if "error" in r:
            print(f"{r['layout']:<52} {r['global_batch']:>5} {'-':>16} {'-':>13} {'False':>5}  ({r['error']})")
        else:
            print(f"{r['layout']:<52} {r['global_batch']:>5} {r['temporaries'] / gib:>16.2f} "
                  f"{r['per_device_bytes'] / gib:>13.2f} {str(r['fits']):>5}")
    result = {"benchmark": "preflight_context (glm4_9b)", "topology": args.topology, "seq_len": args.seq_len,
              "bindings": args.gin, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Per-chip HBM of GLM-4-9B training on a TPU pod slice: whole logits vs the chunked head + loss.

    pip install 'glm_jax[tpu]'    # libtpu: the real TPU compiler, run on this CPU machine
    python experiments/benchmarks/preflight_loss.py [--topology v5p:2x2x2] [--seq_len 8192] \
        [--out experiments/results/preflight_loss.json]

Side by side in one run: the full sharded train step of glm4_9b (FSDP over every chip,
bf16 compute, remat 'full', the Mosaic flash kernel) compiled ahead of time for the
topology (glm_jax.train.preflight), once with train.loss_chunk_length = None (float32
[B, T, 151552] logits and their gradient) and once per chunk length.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from glm_jax import experiment as experiment_lib
from glm_jax.train import preflight

REPO = Path(__file__).resolve().parents[2]


def glm4_9b_experiment(seq_len: int, batch: int, chunk: int | None, extra=()):
    bindings = [f"DataConfig.seq_len = {seq_len}", f"DataConfig.batch_size = {batch}",
                "ModelConfig.remat_policy = 'full'", f"train.loss_chunk_length = {chunk}", *extra]
    experiment = experiment_lib.from_gin([REPO / "experiments/configs/glm_tiny_stdlib.gin", "models/glm4_9b.gin"],
                                         bindings)
    return preflight.accelerator_experiment(experiment)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p:2x2x2")
    parser.add_argument("--seq_len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: one row per chip)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--gin", action="append", default=[], help="extra binding, e.g. 'ModelConfig.num_layers = 2'")
    parser.add_argument("--out", default="experiments/results/preflight_loss.json")
    args = parser.parse_args()

    devices = preflight.topology_devices(args.topology)
    batch = args.batch or len(devices)
    rows = []
    for chunk in [None, *args.chunks]:
        compiled = preflight.compile_train_step(devices, glm4_9b_experiment(args.seq_len, batch, chunk, args.gin))
        rows.append({"loss_chunk_length": chunk, **preflight.report(compiled, devices[0].device_kind)})
    gib = 1 << 30
    print(f"glm4_9b train step {args.gin or ''}, {args.topology} ({len(devices)} x {devices[0].device_kind}), global batch {batch}, "
          f"T={args.seq_len}, bf16, remat full, FSDP")
    print(f"{'loss_chunk_length':>18} {'temporaries GiB':>16} {'per chip GiB':>13} {'fits':>5}")
    for r in rows:
        print(f"{str(r['loss_chunk_length']):>18} {r['temporaries'] / gib:>16.2f} {r['per_device_bytes'] / gib:>13.2f} "
              f"{str(r['fits']):>5}")
    whole = rows[0]["temporaries"]
    for r in rows[1:]:
        print(f"chunk {r['loss_chunk_length']}: temporaries {r['temporaries'] / whole:.2f}x whole logits, "
              f"{(whole - r['temporaries']) / gib:.2f} GiB less per chip")
    result = {"benchmark": "preflight_loss (glm4_9b)", "topology": args.topology, "seq_len": args.seq_len,
              "global_batch": batch, "bindings": args.gin, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

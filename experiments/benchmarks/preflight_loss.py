"""Per-chip HBM of GLM-4-9B training on a TPU pod slice: whole logits vs the chunked head + loss.

    pip install 'glm_jax[tpu]'    # libtpu: the real TPU compiler, run on this CPU machine
    python experiments/benchmarks/preflight_loss.py [--topology v5p:2x2x2] [--seq_len 8192] \
        [--out experiments/results/preflight_loss.json]
    python experiments/benchmarks/preflight_loss.py --head_only [--rows 1 4]   # the head + loss alone

Side by side in one run: the full sharded train step of glm4_9b (FSDP over every chip,
bf16 compute, remat 'full', the Mosaic flash kernel) compiled ahead of time for the
topology (glm_jax.train.preflight), once with train.loss_chunk_length = None (float32
[B, T, 151552] logits and their gradient) and once per chunk length.

--head_only compiles only GLM-4-9B's output head + cross-entropy, forward and backward
(hidden [rows, T, 4096] bf16, kernel [4096, 151552] bf16), for one chip of the topology:
the memory of the region the chunking changes, whatever else sets the full step's peak.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from glm_jax import experiment as experiment_lib
from glm_jax.parallel import tpu_topology
from glm_jax.train import preflight

REPO = Path(__file__).resolve().parents[2]


def glm4_9b_experiment(seq_len: int, batch: int, chunk: int | None, extra=()):
    bindings = [f"DataConfig.seq_len = {seq_len}", f"DataConfig.batch_size = {batch}",
                "ModelConfig.remat_policy = 'full'", f"train.loss_chunk_length = {chunk}", *extra]
    experiment = experiment_lib.from_gin([REPO / "experiments/configs/glm_tiny_stdlib.gin", "models/glm4_9b.gin"],
                                         bindings)
    return preflight.accelerator_experiment(experiment)


GLM4_9B_HIDDEN, GLM4_9B_VOCAB = 4096, 151552


def head_only_rows(device, seq_len: int, rows_per_chip: list[int], chunks: list[int]) -> list[dict]:
    """Compiled temporaries of the head + loss (forward and both gradients) on one TPU chip."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from glm_jax.model.chunked_loss import chunked_cross_entropy
    from glm_jax.model.loss import cross_entropy_sums

    def whole(hidden, kernel, targets, mask):  # the train step's path with loss_chunk_length = None
        logits = jnp.einsum("bte,ev->btv", hidden, kernel, preferred_element_type=jnp.float32)
        return cross_entropy_sums(logits, targets, mask)["loss_sum"]

    def chunked(chunk):
        return lambda hidden, kernel, targets, mask: chunked_cross_entropy(hidden, kernel, targets, mask, 0.0, chunk)[0]

    one_chip = SingleDeviceSharding(device)
    results = []
    for rows in rows_per_chip:
        avals = [jax.ShapeDtypeStruct(shape, dtype, sharding=one_chip) for shape, dtype in
                 (((rows, seq_len, GLM4_9B_HIDDEN), jnp.bfloat16), ((GLM4_9B_HIDDEN, GLM4_9B_VOCAB), jnp.bfloat16),
                  ((rows, seq_len), jnp.int32), ((rows, seq_len), jnp.float32))]
        for chunk in [None, *chunks]:
            loss = whole if chunk is None else chunked(chunk)
            memory = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*avals).compile().memory_analysis()
            results.append({"rows_per_chip": rows, "loss_chunk_length": chunk,
                            "temporaries": memory.temp_size_in_bytes})
    return results


def head_only_main(args) -> None:
    device = tpu_topology.topology_devices(args.topology)[0]
    rows = head_only_rows(device, args.seq_len, args.rows, args.chunks)
    gib = 1 << 30
    print(f"glm4_9b head + loss (hidden {GLM4_9B_HIDDEN}, vocab {GLM4_9B_VOCAB}), forward + backward, one "
          f"{device.device_kind} chip, T={args.seq_len}, bf16 hidden and kernel, float32 logits")
    print(f"{'rows per chip':>13} {'loss_chunk_length':>18} {'temporaries GiB':>16}")
    for r in rows:
        print(f"{r['rows_per_chip']:>13} {str(r['loss_chunk_length']):>18} {r['temporaries'] / gib:>16.2f}")
    result = {"benchmark": "preflight_loss --head_only (glm4_9b head + loss)", "topology": args.topology,
              "device_kind": device.device_kind, "seq_len": args.seq_len, "rows": rows}
    out = args.out.replace(".json", "_head.json") if args.out == DEFAULT_OUT else args.out
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


DEFAULT_OUT = "experiments/results/preflight_loss.json"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p:2x2x2")
    parser.add_argument("--seq_len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: one row per chip)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--gin", action="append", default=[], help="extra binding, e.g. 'ModelConfig.num_layers = 2'")
    parser.add_argument("--head_only", action="store_true", help="compile only the head + loss for one chip")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4], help="--head_only: rows per chip")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.head_only:
        return head_only_main(args)

    devices = tpu_topology.topology_devices(args.topology)
    batch = args.batch or len(devices)
    rows = []
    for chunk in [None, *args.chunks]:
        compiled = preflight.compile_train_step(devices, glm4_9b_experiment(args.seq_len, batch, chunk, args.gin))
        rows.append({"loss_chunk_length": chunk, **tpu_topology.memory_report(compiled, devices[0].device_kind)})
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

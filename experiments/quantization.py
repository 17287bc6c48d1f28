"""Quality and size of weight-only INT8 / INT4 quantization on a trained run.

    python experiments/quantization.py [--run runs/glm_tiny_stdlib] [--eval_batches 16]
        [--out experiments/results/quantization.json]

Each scheme quantizes the run's attention and MLP projections (glm_jax.model.quantization,
what `glm_jax convert quantize` writes) and evaluates the run's held-out split (Part-B loss
of its own objective, the same batches for every scheme). Sizes are parameter bytes of the
run's model and, from abstract parameters (nothing allocated), of glm_130b, each against
its bfloat16 parameters. Train the run first: ./launch.sh train experiments/configs/glm_tiny_stdlib.gin
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax

from glm_jax.evaluation import evaluate_model
from glm_jax.experiment import load_preset
from glm_jax.model import abstract_params, param_bytes, quantize_params
from glm_jax.run_dir import load_run

SCHEMES = {"float": (None, None), "INT8": (8, None), "INT8-g128": (8, 128), "INT4-g128": (4, 128),
           "INT4-g64": (4, 64), "INT4": (4, None)}


def bf16_bytes(tree) -> int:
    return int(sum(x.size * 2 for x in jax.tree.leaves(tree)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/glm_tiny_stdlib")
    parser.add_argument("--eval_batches", type=int, default=16)
    parser.add_argument("--out", default="experiments/results/quantization.json")
    args = parser.parse_args()
    if not (Path(args.run) / "config.gin").is_file():
        print(f"{args.run} is not a trained run; train it first: ./launch.sh train "
              "experiments/configs/glm_tiny_stdlib.gin", file=sys.stderr)
        return 2
    run = load_run(args.run)
    data, objective = run.experiment.data, run.experiment.objective
    rows = []
    for name, (bits, group) in SCHEMES.items():
        config, params = run.model, run.params
        if bits:
            config = config.replace(quant_bits=bits, quant_group_size=group)
            params = quantize_params(params, config)
        result = evaluate_model(config, params, data, objective, run.tokenizer, args.eval_batches)
        rows.append({"scheme": name, "bits": bits, "group_size": group, "eval_loss": result["loss"],
                     "eval_accuracy": result["accuracy"], "tokens": result["tokens"],
                     "param_bytes": param_bytes(params), "bf16_param_bytes": bf16_bytes(run.params)})
    float_loss = rows[0]["eval_loss"]
    for row in rows:
        row["loss_change"] = row["eval_loss"] / float_loss - 1

    big = load_preset("glm_130b", param_dtype="bfloat16")
    sizes = {"glm_130b bf16": param_bytes(abstract_params(big))}
    for name, (bits, group) in SCHEMES.items():
        if bits:
            quantized = big.replace(quant_bits=bits, quant_group_size=group)
            sizes[f"glm_130b {name}"] = param_bytes(abstract_params(quantized))

    print(f"{args.run} step {run.step}: held-out loss over {rows[0]['tokens']} Part-B tokens "
          f"({args.eval_batches} batches)")
    print(f"{'scheme':<10} {'loss':>8} {'change':>8} {'accuracy':>9} {'bytes/bf16':>11}")
    for row in rows:
        print(f"{row['scheme']:<10} {row['eval_loss']:>8.4f} {100 * row['loss_change']:>7.2f}% "
              f"{row['eval_accuracy']:>9.4f} {row['param_bytes'] / row['bf16_param_bytes']:>11.3f}")
    print("\nglm_130b parameter bytes (abstract parameters; embedding stays bfloat16)")
    for name, size in sizes.items():
        print(f"  {name:<20} {size / 2**30:>8.1f} GiB  {size / sizes['glm_130b bf16']:.3f} of bf16")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": str(args.run), "step": run.step, "eval_batches": args.eval_batches,
                               "rows": rows, "glm_130b_param_bytes": sizes}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

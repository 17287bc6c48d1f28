"""Throughput of the data pipeline vs what the glm_tiny training step consumes, in one run.

    python experiments/benchmarks/data_pipeline.py [--batches 200] [--out experiments/results/data_pipeline.json]

For each objective: examples/s, tokens/s (row tokens) and packing efficiency of
tokenised stdlib corpus -> corruption -> packing -> [8, 512] batches, on one
core of this machine (the token cache is built first and not timed). The
glm_tiny forward+backward step is timed in the same run to give the ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from glm_jax.data.objectives import Objective
from glm_jax.data.pipeline import DataConfig, load_tokenizer, make_dataset

OBJECTIVES = {
    "token": Objective(),
    "sentence": Objective(token=0.0, sentence=1.0),
    "document": Objective(token=0.0, document=1.0),
    "causal": Objective(token=0.0, causal=1.0),
    "glm_10b_mix": Objective(token=0.5, sentence=0.3, document=0.2, gmask_ratio_min=0.25),
    "glm_130b_mix": Objective(token=0.3, document=0.7),
}


def measure(name: str, objective: Objective, config: DataConfig, tokenizer, batches: int) -> dict:
    dataset = make_dataset(config, objective, "train", 0, 1, tokenizer=tokenizer)
    iterator = dataset.iterator()
    start = time.perf_counter()
    examples = 0
    for _ in range(batches):
        batch = next(iterator)
        examples += int(batch["segment_ids"].max(axis=1).sum())
    seconds = time.perf_counter() - start
    tokens = batches * config.batch_size * config.seq_len
    return {"objective": name, "batches": batches, "seconds": seconds, "examples_per_second": examples / seconds,
            "tokens_per_second": tokens / seconds, "packing_efficiency": iterator.packing_efficiency,
            **dataset.counts}


def glm_tiny_tokens_per_second(batch: int, seq_len: int) -> float:
    """Forward+backward tokens/s of glm_tiny (the benchmarks/model_step.py measurement)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from model_step import measure as measure_step  # noqa: E402
    from model_step import matmul_peak

    from glm_jax.experiment import load_preset

    return measure_step("glm_tiny", load_preset("glm_tiny"), batch, seq_len, 3, matmul_peak())["tokens_per_second"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--out", default="experiments/results/data_pipeline.json")
    args = parser.parse_args()
    config = DataConfig(seq_len=512, batch_size=8)
    tokenizer = load_tokenizer(config)
    make_dataset(config, Objective(), "train", 0, 1, tokenizer=tokenizer)  # build the token cache (untimed)

    rows = [measure(name, objective, config, tokenizer, args.batches) for name, objective in OBJECTIVES.items()]
    train_rate = glm_tiny_tokens_per_second(config.batch_size, config.seq_len)

    print(f"{'objective':<14} {'examples/s':>10} {'tokens/s':>10} {'packing':>8} {'x glm_tiny step':>16}")
    for r in rows:
        print(f"{r['objective']:<14} {r['examples_per_second']:>10.0f} {r['tokens_per_second']:>10.0f} "
              f"{r['packing_efficiency']:>8.1%} {r['tokens_per_second'] / train_rate:>15.0f}x")
    print(f"glm_tiny forward+backward consumes {train_rate:.0f} tokens/s (B=8, T=512, float32)")
    result = {"benchmark": "data_pipeline (stdlib, T=512, B=8)", "glm_tiny_train_tokens_per_second": train_rate,
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

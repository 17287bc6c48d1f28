"""Which uptraining recipe returns a converted model to its source? A sweep on the identity control.

    python experiments/uptrain_recipe.py [--config experiments/configs/ablate_attention.gin]
        [--out_dir runs/uptrain_recipe] [--results experiments/results] [--seeds 3] [--quick]

The attention ablation's identity control (MHA -> MHA, nothing pooled) uptrained for alpha = 0.05 of
the source's steps should end where the source is, or better: it is the source given more steps.
With the recipe that restarts the source's peak learning rate it ended worse, and so did every
converted model. This script trains the ablation's MHA source (Study.source_steps steps of the
study's config), then uptrains the identity control with each recipe of RECIPES (uptrain_recipe.*
bindings of glm_jax.convert.uptrain) for each data seed, and GQA-G / MQA (mean pooling) with the
best recipe and the old default (--best_only: the best alone). Every model is scored on the source's eval batches (the same
masks). Writes RESULTS/uptrain_recipe.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

from ablate_attention import Study  # noqa: E402  (registers Study.* for the study's gin files)
from study_args import parse_study_args  # noqa: E402

from glm_jax import experiment as experiment_lib  # noqa: E402
from glm_jax.convert.uptrain import convert_run  # noqa: E402
from glm_jax.evaluation import evaluate_model  # noqa: E402
from glm_jax.run_dir import load_run  # noqa: E402
from glm_jax.train.loop import train  # noqa: E402

ALPHA = 0.05


def recipe(learning_rate_from: str, learning_rate_scale: float, schedule: str, warmup_fraction: float = 0.1) -> dict:
    return dict(learning_rate_from=learning_rate_from, learning_rate_scale=learning_rate_scale, schedule=schedule,
                warmup_fraction=warmup_fraction)


RECIPES = {  # name -> every uptrain_recipe knob but alpha (glm_jax.convert.uptrain.UptrainRecipe)
    "peak, cosine (restart)": recipe("peak", 1.0, "cosine"),
    "0.3 peak, cosine": recipe("peak", 0.3, "cosine"),
    "final, cosine": recipe("final", 1.0, "cosine"),
    "final, constant": recipe("final", 1.0, "constant"),
    "final, constant, no warmup": recipe("final", 1.0, "constant", warmup_fraction=0.0),
    "0.5 final, constant": recipe("final", 0.5, "constant"),
}
OLD_DEFAULT = "peak, cosine (restart)"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="data seeds per recipe (the spread is the noise)")
    parser.add_argument("--best_only", action="store_true",
                        help="uptrain GQA / MQA with the best recipe only (not also the old default)")
    return parse_study_args(parser, argv, config="ablate_attention", runs="uptrain_recipe")


def recipe_bindings(knobs: dict) -> list[str]:
    return [f"uptrain_recipe.{name} = {value!r}" for name, value in knobs.items()]


def train_source(args, overrides: list, study: Study) -> Path:
    source = args.out_dir / "source"
    if not (source / "summary.json").exists():
        train(experiment_lib.from_gin([args.config], overrides + [
            f"RUN_DIR = '{source}'", f"STEPS = {study.source_steps}"]))
    return source


def uptrain(source: Path, out: Path, kv_heads: int, knobs: dict, seed: int) -> Path:
    """Converts the source (mean pooling to kv_heads) and uptrains it on data seed `seed`."""
    if not (out / "summary.json").exists():
        shutil.rmtree(out, ignore_errors=True)  # a conversion or uptraining interrupted before it finished
        convert_run(source, kv_heads, "mean", out, alpha=ALPHA, recipe_bindings=recipe_bindings(knobs))
        train(experiment_lib.from_gin([str(out / "config.gin")], [f"DataConfig.seed = {seed}"]))
    return out


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    start = time.time()
    study, model = experiment_lib.read([args.config], overrides, "Study", "ModelConfig")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    source_dir = train_source(args, overrides, study)
    source = load_run(source_dir)
    data, objective = source.experiment.data, source.experiment.objective

    def score(run_dir: Path) -> float:  # every model on the source's eval batches (the same masks)
        run = load_run(run_dir)
        return evaluate_model(run.model, run.params, data, objective, source.tokenizer, study.eval_batches)["loss"]

    source_loss = score(source_dir)
    seeds = range(args.seeds)
    rows = []
    for name, knobs in RECIPES.items():
        losses = [score(uptrain(source_dir, args.out_dir / f"mha_{slug(name)}_s{s}", model.num_heads, knobs, s))
                  for s in seeds]
        rows.append({"target": "MHA (identity)", "recipe": name, **knobs, "losses": losses})
        print(f"{name:<28} identity control {statistics.mean(losses):.4f} +- {spread(losses):.4f} "
              f"(source {source_loss:.4f})", flush=True)
    best = min(rows, key=lambda r: statistics.mean(r["losses"]))["recipe"]
    for label, kv_heads in ((f"GQA-{study.gqa_kv_heads}", study.gqa_kv_heads), ("MQA", 1)):
        for name in dict.fromkeys((best,) if args.best_only else (OLD_DEFAULT, best)):
            losses = [score(uptrain(source_dir, args.out_dir / f"{label.lower()}_{slug(name)}_s{s}", kv_heads,
                                    RECIPES[name], s)) for s in seeds]
            rows.append({"target": f"{label} (mean)", "recipe": name, **RECIPES[name], "losses": losses})
            print(f"{label} {name:<28} {statistics.mean(losses):.4f} +- {spread(losses):.4f}", flush=True)
    write_report(rows, source_loss, best, study, args, time.time() - start)
    return 0


def write_report(rows: list[dict], source_loss: float, best: str, study: Study, args, seconds: float) -> None:
    args.results.mkdir(parents=True, exist_ok=True)
    steps = max(1, round(ALPHA * study.source_steps))
    lines = [f"# Uptraining recipe sweep{' (QUICK smoke run: numbers mean nothing)' if args.quick else ''}", "",
             f"Generated by `python experiments/uptrain_recipe.py{' --quick' if args.quick else ''} --seeds "
             f"{args.seeds}{' --best_only' if args.best_only else ''}` in {seconds / 60:.0f} min on {jax.devices()[0].device_kind}. Source: the attention "
             f"ablation's MHA model, {study.source_steps} steps; every conversion is uptrained for alpha = {ALPHA} "
             f"({steps} steps) from the source's data position, once per data seed (0 continues the source's own "
             f"stream); eval loss on the source's {study.eval_batches} eval batches, mean +- standard deviation over "
             f"seeds. Source eval loss: **{source_loss:.4f}**.", "",
             "| target | recipe | peak learning rate | schedule | warmup | eval loss | vs source |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mean = statistics.mean(r["losses"])
        scale = "" if r["learning_rate_scale"] == 1.0 else f"{r['learning_rate_scale']:g} x "
        lines.append(f"| {r['target']} | {r['recipe']} | {scale}source's {r['learning_rate_from']} | {r['schedule']} | "
                     f"{r['warmup_fraction']:g} | {mean:.4f} +- {spread(r['losses']):.4f} | "
                     f"{mean - source_loss:+.4f} |")
    lines += ["", f"Lowest identity-control loss: **{best}**.", ""]
    report = args.results / "uptrain_recipe.md"
    marker = "<!-- findings -->"
    old = report.read_text() if report.exists() else ""
    findings = marker + old.split(marker, 1)[1] if marker in old else f"{marker}\n## Findings\n\n(not yet written)\n"
    report.write_text("\n".join(lines) + "\n" + findings)
    (args.results / "uptrain_recipe.json").write_text(json.dumps(
        {"study": dataclasses.asdict(study), "alpha": ALPHA, "seeds": args.seeds, "source_loss": source_loss,
         "best": best, "seconds": seconds, "quick": args.quick, "rows": rows}, indent=2))
    print(f"wrote {report}")


if __name__ == "__main__":
    sys.exit(main())

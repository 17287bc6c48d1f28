"""The MHA vs GQA vs MQA study in one command: train, convert, uptrain, evaluate, time, report.

    python experiments/ablate_attention.py [--seeds 3] [--config experiments/configs/ablate_attention.gin]
        [--out_dir runs/ablate_attention] [--results experiments/results] [--quick] [--gin.NAME=VALUE ...]

Steps (every run shares the --config experiment; Study.* bindings size it):
 1. train an MHA baseline (H KV heads), and GQA-G and MQA from scratch with the same token budget;
 2. convert the MHA checkpoint to GQA-G and MQA with each method (glm_jax.convert.uptrain: the
    merges mean, first, random, weighted, aligned, svd; 'similarity-MERGE' groups similar heads
    first, calibrated on the source's own data), evaluate at alpha = 0, and uptrain for each alpha;
    the identity conversion (G = H) uptrained the same way is the control: the MHA
    model given the same extra steps;
 3. evaluate every model on the same eval batches (teacher-forced Part-B loss and
    blank-infilling token accuracy, glm_jax.evaluation) and time decoding of
    each attention layout at a long context (experiments/benchmarks/decode.py);
 4. write RESULTS/attention_ablation.{md,json} and PNG plots.
With --seeds N every model is made N times (seed s: train.seed = DataConfig.seed = s, so
initialisation, data order and the masks of training differ; the random conversion draws
with seed s + 1) under OUT_DIR/seed<s>/, every model is scored on seed 0's eval batches,
and the tables give mean +- standard deviation over seeds plus per-seed paired differences.
Finished runs are reused when the script is started again (each run directory is
resumable), so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments" / "benchmarks"))
sys.path.insert(0, str(REPO / "experiments"))

from decode import glm_jax_decode  # noqa: E402
from study_args import parse_study_args  # noqa: E402

from glm_jax import experiment as experiment_lib  # noqa: E402
from glm_jax.convert.uptrain import convert_run  # noqa: E402
from glm_jax.evaluation import evaluate_model  # noqa: E402
from glm_jax.run_dir import RunDir, load_run  # noqa: E402
from glm_jax.train.loop import train  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Study:
    source_steps: int = 500
    gqa_kv_heads: int = 2
    methods: tuple = ("mean", "first", "random")
    alphas: tuple = (0.05, 0.10)
    eval_batches: int = 16
    decode_context: int = 4096
    decode_batch: int = 8
    decode_tokens: int = 32


experiment_lib.register("Study", Study)  # bound as Study.* in the study's gin files


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1, help="make every model with seeds 0..N-1 (mean +- std)")
    return parse_study_args(parser, argv, config="ablate_attention", runs="ablate_attention")


# ------------------------------------------------------------------------- runs
def train_run(files: list, bindings: list) -> None:
    """One training run in this process (resumes if its directory has checkpoints)."""
    train(experiment_lib.from_gin(files, bindings))


def study_settings(config_file: str, overrides: list) -> tuple[Study, int]:
    study, model = experiment_lib.read([config_file], overrides, "Study", "ModelConfig")
    return study, model.num_heads


def run_plan(study: Study, num_heads: int) -> list[dict]:
    """Every model of the study: name, how it is made, and its layout."""
    G = study.gqa_kv_heads
    plan = [{"name": "mha", "kind": "scratch", "kv_heads": num_heads},
            {"name": f"gqa{G}_scratch", "kind": "scratch", "kv_heads": G},
            {"name": "mqa_scratch", "kind": "scratch", "kv_heads": 1}]
    targets = [(f"gqa{G}", G), ("mqa", 1)]
    for label, kv_heads in targets:
        for method in study.methods:
            for alpha in (0.0, *study.alphas):
                plan.append({"name": f"{label}_{method}_a{alpha:g}", "kind": "uptrain", "kv_heads": kv_heads,
                             "method": method, "alpha": alpha, "target": label})
    for alpha in study.alphas:  # the control: MHA given the same extra steps (identity conversion)
        plan.append({"name": f"mha_continued_a{alpha:g}", "kind": "uptrain", "kv_heads": num_heads,
                     "method": "mean", "alpha": alpha, "target": "mha"})
    return plan


def seed_bindings(seed: int) -> list[str]:
    """Seed s changes the initialisation (train.seed) and the data order and masks (DataConfig.seed)."""
    return [f"train.seed = {seed}", f"DataConfig.seed = {seed}"]


def make_model(entry: dict, study: Study, config: str, runs: Path, overrides: list, seed: int) -> Path:
    """Trains or converts + uptrains one model of the plan under `runs` (one seed's directory)."""
    run_dir = runs / entry["name"]
    if entry["kind"] == "scratch":
        if not (run_dir / "summary.json").exists():
            train_run([config], overrides + seed_bindings(seed) + [
                f"RUN_DIR = '{run_dir}'", f"STEPS = {study.source_steps}",
                f"ModelConfig.num_kv_heads = {entry['kv_heads']}"])
        return run_dir
    if not (run_dir / "provenance.json").exists():
        shutil.rmtree(run_dir, ignore_errors=True)  # a conversion interrupted before it finished
        grouping, merge = method_parts(entry["method"])
        convert_run(runs / "mha", entry["kv_heads"], merge, run_dir, seed=seed + 1, alpha=entry["alpha"] or None,
                    grouping=grouping)
    if entry["alpha"] > 0 and not (run_dir / "summary.json").exists():
        train(RunDir(run_dir).read_experiment())
    return run_dir


def method_parts(method: str) -> tuple[str, str]:
    """'mean' -> ('contiguous', 'mean'); 'similarity-aligned' -> ('similarity', 'aligned')."""
    grouping, _, merge = method.rpartition("-")
    return grouping or "contiguous", merge


def measure(run_dir: Path, entry: dict, study: Study, reference, decode_cache: dict, seed: int) -> dict:
    """Eval scores on the reference run's eval batches (the same for every model and seed) and decode speed."""
    run = load_run(run_dir, step=0 if entry.get("alpha") == 0.0 else None)
    data, objective = reference.experiment.data, reference.experiment.objective
    scores = evaluate_model(run.model, run.params, data, objective, reference.tokenizer, study.eval_batches)
    kv_heads = run.experiment.model.num_kv_heads
    if kv_heads not in decode_cache:  # decode speed depends on the layout only
        config = run.experiment.model.replace(scan_layers=False, dtype="float32")
        decode_cache[kv_heads] = glm_jax_decode(config, study.decode_batch, study.decode_context,
                                                study.decode_tokens, repeats=2)
    speed = decode_cache[kv_heads]
    slots = study.decode_batch * (study.decode_context + study.decode_tokens)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    return {**entry, "seed": seed, "eval_loss": scores["loss"], "accuracy": scores["accuracy"], "perplexity": scores["perplexity"],
            "params": run.experiment.model.num_params(), "kv_bytes_per_token": speed["kv_cache_bytes"] // slots,
            "decode_tokens_per_second": speed["tokens_per_second"],
            "seconds_per_sample": speed["seconds_per_step"] * study.decode_tokens / study.decode_batch,
            "train_losses": summary.get("losses", []), "step": run.step}


# ----------------------------------------------------------------------- report
PER_SEED = ("seed", "eval_loss", "accuracy", "perplexity", "train_losses")
PAPER_METHODS = ("mean", "first", "random")  # the GQA paper's; the others are compared with mean pooling


def summarize(rows: list[dict]) -> dict[str, dict]:
    """One record per model: its layout fields, and eval loss / accuracy as mean and standard
    deviation over seeds (0 for one seed); the training curve of the first seed."""
    by_name = defaultdict(list)
    for row in rows:
        by_name[row["name"]].append(row)
    summary = {}
    for name, runs in by_name.items():
        record = {k: v for k, v in runs[0].items() if k not in PER_SEED}
        record["seeds"] = [r["seed"] for r in runs]
        record["train_losses"] = runs[0]["train_losses"]
        for key in ("eval_loss", "accuracy"):
            values = [r[key] for r in runs]
            record[key] = statistics.fmean(values)
            record[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[name] = record
    return summary


def losses_by_seed(rows: list[dict]) -> dict[tuple[str, int], float]:
    """{(model name, seed): eval loss}: what the paired comparisons read."""
    return {(r["name"], r["seed"]): r["eval_loss"] for r in rows}


def paired(loss: dict, name: str, baseline: str) -> list[float]:
    """Per seed, eval loss of `name` minus that of `baseline` (both made with that seed)."""
    return [loss[name, s] - loss[baseline, s] for (n, s) in loss if n == name and (baseline, s) in loss]


def spread(values: list[float], digits: int = 4, sign: str = "") -> str:
    """'mean ± std' over seeds ('mean' alone for one seed)."""
    mean = f"{statistics.fmean(values):{sign}.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.{digits}f}"


def loss_cell(record: dict, seeds: int) -> str:
    """A model's eval loss, '± std' over seeds when there are several."""
    return f"{record['eval_loss']:.4f}" + (f" ± {record['eval_loss_std']:.4f}" if seeds > 1 else "")


def score_cell(record: dict | None, seeds: int) -> str:
    return "-" if record is None else f"{loss_cell(record, seeds)} ({record['accuracy']:.3f})"


def ordering_counts(loss: dict, target: str, methods: tuple, alpha: float, seeds: int) -> str:
    """In how many seeds each consecutive pair of methods is ordered as listed at `alpha` (lower loss first)."""
    def ordered(a: str, b: str, seed: int) -> bool:
        return loss[f"{target}_{a}_a{alpha:g}", seed] < loss[f"{target}_{b}_a{alpha:g}", seed]

    counts = []
    for better, worse in zip(methods, methods[1:]):
        wins = sum(ordered(better, worse, s) for s in range(seeds))
        counts.append(f"{better} < {worse} in {wins}/{seeds}")
    chain = sum(all(ordered(a, b, s) for a, b in zip(methods, methods[1:])) for s in range(seeds))
    return "; ".join(counts) + f"; the whole order {' < '.join(methods)} in {chain}/{seeds}"


def write_report(rows: list[dict], study: Study, num_heads: int, seeds: int, results: Path, seconds: float,
                 quick: bool):
    results.mkdir(parents=True, exist_ok=True)
    by_name, loss = summarize(rows), losses_by_seed(rows)
    G = study.gqa_kv_heads
    first_alpha = study.alphas[0]
    headline = [("MHA", "mha"), (f"GQA-{G} (scratch)", f"gqa{G}_scratch"), ("MQA (scratch)", "mqa_scratch"),
                (f"GQA-{G} (mean, uptrained a={first_alpha:g})", f"gqa{G}_mean_a{first_alpha:g}"),
                (f"MQA (mean, uptrained a={first_alpha:g})", f"mqa_mean_a{first_alpha:g}"),
                (f"MHA continued a={first_alpha:g} (control)", f"mha_continued_a{first_alpha:g}")]
    command = "python experiments/ablate_attention.py" + (f" --seeds {seeds}" if seeds > 1 else "") + \
        (" --quick" if quick else "")
    pm = " ± std" if seeds > 1 else ""
    lines = [f"# Attention ablation: MHA vs GQA-{G} vs MQA{' (QUICK smoke run: sizes are meaningless)' if quick else ''}",
             "",
             f"Generated by `{command}` in {seconds / 60:.0f} min on {jax.devices()[0].device_kind} "
             f"({jax.device_count()} device(s)). {seeds} seed(s) per model (initialisation, data order and training "
             f"masks; scores are mean{pm} over seeds). Source runs: {study.source_steps} steps; {num_heads} query heads. "
             f"Quality is measured on the same {study.eval_batches} eval batches for every model and seed "
             "(teacher-forced Part-B cross-entropy and blank-infilling token accuracy); decode speed is the compiled "
             f"KV-cache loop at context {study.decode_context}, batch {study.decode_batch}, {study.decode_tokens} new "
             "tokens (float32 cache), measured once per layout.", "",
             "## Table 1 (the GQA paper's shape)", "",
             f"| model | params | KV cache bytes / token | decode tokens/s | time per sample (s) | eval loss{pm} | accuracy |",
             "|---|---|---|---|---|---|---|"]
    for label, name in headline:
        r = by_name.get(name)
        if r:
            lines.append(f"| {label} | {r['params'] / 1e6:.2f}M | {r['kv_bytes_per_token']:,} | "
                         f"{r['decode_tokens_per_second']:.1f} | {r['seconds_per_sample']:.4g} | {loss_cell(r, seeds)} | "
                         f"{r['accuracy']:.4f} |")
    lines += ["", f"## Conversion method x uptraining proportion (eval loss{pm}; accuracy in brackets)", "",
              "| target | method | " + " | ".join(f"alpha={a:g}" for a in (0.0, *study.alphas)) + " |",
              "|---|---|" + "---|" * (1 + len(study.alphas))]
    for label in (f"gqa{G}", "mqa"):
        for method in study.methods:
            cells = [score_cell(by_name.get(f"{label}_{method}_a{alpha:g}"), seeds) for alpha in (0.0, *study.alphas)]
            lines.append(f"| {label.upper()} | {method} | " + " | ".join(cells) + " |")
    control = [by_name.get(f"mha_continued_a{a:g}") for a in study.alphas]
    lines.append("| MHA (control) | identity | " + " | ".join(score_cell(r, seeds) for r in [by_name["mha"], *control])
                 + " |")
    lines += ["", "## Paired differences (per seed, then mean" + pm + ")", "",
              "Eval loss of each model minus that of the model it is compared with, made with the same seed "
              "(negative: better).", "",
              "| model | minus MHA source | minus the control (MHA continued, same alpha) |", "|---|---|---|"]
    for name in (f"gqa{G}_scratch", "mqa_scratch"):
        lines.append(f"| {name} | {spread(paired(loss, name, 'mha'), sign='+')} | - |")
    for label in (f"gqa{G}", "mqa"):
        for method in study.methods:
            for alpha in study.alphas:
                name = f"{label}_{method}_a{alpha:g}"
                lines.append(f"| {name} | {spread(paired(loss, name, 'mha'), sign='+')} | "
                             f"{spread(paired(loss, name, f'mha_continued_a{alpha:g}'), sign='+')} |")
    for alpha in study.alphas:
        lines.append(f"| mha_continued_a{alpha:g} | {spread(paired(loss, f'mha_continued_a{alpha:g}', 'mha'), sign='+')}"
                     " | - |")
    beyond = [m for m in study.methods if m not in PAPER_METHODS]
    if beyond and "mean" in study.methods:
        lines += ["", f"## Beyond mean pooling: each method minus mean pooling (paired per seed, then mean{pm})", "",
                  "Negative: the method beats mean pooling. 'similarity-MERGE' groups similar heads (calibrated on "
                  "the source's own training data) before merging.", "",
                  "| target | method | " + " | ".join(f"alpha={a:g}" for a in (0.0, *study.alphas)) + " | beats mean |",
                  "|---|---|" + "---|" * (2 + len(study.alphas))]
        for label in (f"gqa{G}", "mqa"):
            for method in beyond:
                diffs = [paired(loss, f"{label}_{method}_a{a:g}", f"{label}_mean_a{a:g}") for a in (0.0, *study.alphas)]
                wins = [sum(d < 0 for d in ds) for ds in diffs]
                lines.append(f"| {label.upper()} | {method} | " + " | ".join(spread(d, sign="+") for d in diffs)
                             + " | " + ", ".join(f"{w}/{seeds}" for w in wins) + " |")
    paper = tuple(m for m in PAPER_METHODS if m in study.methods)
    if len(paper) > 1:
        lines += ["", "Method order of the GQA paper's methods (lower eval loss first), counted per seed:", ""]
        for alpha in (0.0, *study.alphas):
            for label in (f"gqa{G}", "mqa"):
                lines.append(f"- alpha = {alpha:g}, {label.upper()}: "
                             f"{ordering_counts(loss, label, paper, alpha, seeds)}")
    lines += ["", "Plots (error bars: one standard deviation over seeds): `attention_quality_vs_time.png` (quality vs "
              "decode time per sample, the paper's Figure 6 shape), `attention_alpha.png` (eval loss vs alpha per "
              "method), `attention_training_curves.png` (seed 0).", ""]
    (results / "attention_ablation.md").write_text("\n".join(lines) + "\n" + _findings_placeholder(results))
    (results / "attention_ablation.json").write_text(json.dumps(
        {"study": dataclasses.asdict(study), "num_heads": num_heads, "seeds": seeds, "seconds": seconds,
         "quick": quick, "summary": by_name, "rows": rows}, indent=2))
    _plots(by_name, study, results)


def _findings_placeholder(results: Path) -> str:
    """Keeps the hand-written findings section (below the marker) when the tables are regenerated."""
    marker = "<!-- findings -->"
    old = results / "attention_ablation.md"
    if old.exists() and marker in old.read_text():
        return marker + old.read_text().split(marker, 1)[1]
    return f"{marker}\n## Findings\n\n(not yet written for this run)\n"


def _plots(by_name: dict[str, dict], study: Study, results: Path) -> None:
    """The three figures from the per-model summaries (error bars: standard deviation over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    G, a = study.gqa_kv_heads, study.alphas[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label, marker in [("mha", "MHA", "o"), (f"gqa{G}_scratch", f"GQA-{G} scratch", "s"),
                                ("mqa_scratch", "MQA scratch", "^"), (f"gqa{G}_mean_a{a:g}", f"GQA-{G} uptrained", "s"),
                                (f"mqa_mean_a{a:g}", "MQA uptrained", "^"), (f"mha_continued_a{a:g}", "MHA continued", "o")]:
        r = by_name.get(name)
        if r:
            filled = "scratch" in name or name == "mha"
            color = "C0" if filled else "C3"
            ax.errorbar(r["seconds_per_sample"], r["eval_loss"], yerr=r["eval_loss_std"], marker=marker, ms=8,
                        label=label, color=color, mfc=color if filled else "none", capsize=3, ls="none")
    ax.set_title("Quality vs decode time")
    _save(fig, ax, f"decode time per sample (s): {study.decode_tokens} tokens at context {study.decode_context}",
          "eval loss (lower is better)", results / "attention_quality_vs_time.png")

    alphas = (0.0, *study.alphas)
    control = [by_name["mha"], *(by_name[f"mha_continued_a{x:g}"] for x in study.alphas)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, target in zip(axes, (f"gqa{G}", "mqa")):  # one panel per target: eval loss vs alpha per method
        for i, method in enumerate(study.methods):
            records = [by_name[f"{target}_{method}_a{x:g}"] for x in alphas]
            ax.errorbar(alphas, [r["eval_loss"] for r in records], yerr=[r["eval_loss_std"] for r in records],
                        fmt="-" if method in PAPER_METHODS else "--", marker="o", color=f"C{i}", capsize=3,
                        label=method)
        ax.errorbar(alphas, [r["eval_loss"] for r in control], yerr=[r["eval_loss_std"] for r in control], fmt=":",
                    marker="x", color="k", capsize=3, label="MHA control (identity)")
        ax.set_title(target.upper())
    axes[1].set_xlabel("uptraining proportion alpha")
    _save(fig, axes[0], "uptraining proportion alpha", "eval loss", results / "attention_alpha.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("mha", f"gqa{G}_scratch", "mqa_scratch"):
        if name in by_name:
            ax.plot(range(1, len(by_name[name]["train_losses"]) + 1), by_name[name]["train_losses"], label=name, lw=0.8)
    offset = study.source_steps
    for name in (f"gqa{G}_mean_a{study.alphas[-1]:g}", f"mqa_mean_a{study.alphas[-1]:g}",
                 f"mqa_random_a{study.alphas[-1]:g}", f"mha_continued_a{study.alphas[-1]:g}"):
        if name in by_name:
            losses = by_name[name]["train_losses"]
            ax.plot(range(offset + 1, offset + len(losses) + 1), losses, label=f"{name} (uptraining)", lw=1.2)
    _save(fig, ax, "step (seed 0)", "train loss", results / "attention_training_curves.png")


def _save(fig, ax, xlabel: str, ylabel: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    start = time.time()
    study, num_heads = study_settings(args.config, overrides)
    plan = run_plan(study, num_heads)
    seeds = range(args.seeds)
    if not jax.config.jax_compilation_cache_dir:  # seeds 1.. reuse seed 0's compiled steps (same shapes)
        jax.config.update("jax_compilation_cache_dir", str(args.out_dir / "compile_cache"))
    for seed in seeds:  # sources first: the plan lists the MHA baseline before any conversion
        for entry in plan:
            print(f"== seed {seed}: {entry['name']}", flush=True)
            make_model(entry, study, args.config, args.out_dir / f"seed{seed}", overrides, seed)
    reference = load_run(args.out_dir / "seed0" / "mha")  # its eval batches score every model
    decode_cache, rows = {}, []
    for seed in seeds:
        for entry in plan:
            rows.append(measure(args.out_dir / f"seed{seed}" / entry["name"], entry, study, reference, decode_cache,
                                seed))
            print(f"seed {seed} {entry['name']:<24} eval loss {rows[-1]['eval_loss']:.4f} "
                  f"accuracy {rows[-1]['accuracy']:.4f} decode {rows[-1]['decode_tokens_per_second']:.1f} tokens/s",
                  flush=True)
    write_report(rows, study, num_heads, args.seeds, args.results, time.time() - start, args.quick)
    print(f"wrote {args.results / 'attention_ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Parameter-efficient fine-tuning side by side: full fine-tuning, LoRA, P-tuning v2, prompt tuning and
bottleneck adapters teaching one frozen chat model new tools, at matched trainable-parameter budgets.

    python experiments/peft_study.py [--config experiments/configs/peft_study.gin]
        [--out_dir runs/peft_study] [--results experiments/results] [--quick] [--gin.NAME=VALUE ...]

1. Data in OUT_DIR/data (experiments/tool_chats.py): conversations with the ledger tools (subtract,
   currency; the base's), with the atlas tools (add, lookup; the new ones) and 100 held-out atlas
   questions drawn with another seed.
2. The base: experiments/configs/sft_tiny_ledger.gin's chat model trained on the ledger data (it chats,
   copies and calls tools, but not atlas's: it scores 0%).
3. Every method trains on the atlas data from that base for the same steps, batch and schedule: full
   fine-tuning (every parameter, at the SFT recipe's learning rate) and, at the adapters' learning
   rate, LoRA on query/value, P-tuning v2, prompt tuning and bottleneck adapters, whose sizes are
   chosen for about the same trainable parameters (PeftStudy's fields; the table gives the counts).
4. Scores: the held-out questions through `python -m glm_jax.chat --input` (the real chat path, tool
   calls executed) and `tool_chats.score`: exact tool calls (name and arguments) and exact final
   answers; with trainable parameters, Adam's optimizer-state bytes (from the train state's shapes),
   the final eval loss, and the seconds per train step of each method's compiled step, timed
   round-robin in one process after training (a ratio to full fine-tuning; the machine is noisy).
   Written to RESULTS/peft_study.{md,json,png}.
Finished runs are reused when the script is started again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

import tool_chats  # noqa: E402
from study_args import parse_study_args  # noqa: E402

from glm_jax import experiment as experiment_lib  # noqa: E402
from glm_jax.model.glm import param_bytes  # noqa: E402
from glm_jax.optim import make_optimizer  # noqa: E402
from glm_jax.model import init_params  # noqa: E402
from glm_jax.run_dir import RunDir  # noqa: E402
from glm_jax.train.loop import train  # noqa: E402
from glm_jax.train.state import abstract_state, create_state  # noqa: E402
from glm_jax.train.step import make_train_step  # noqa: E402

CONFIGS = REPO / "experiments" / "configs"
METHODS = ("full", "lora", "prefix", "prompt", "bottleneck")
NAMES = {"full": "full fine-tuning", "lora": "LoRA (query, value)", "prefix": "P-tuning v2",
         "prompt": "prompt tuning", "bottleneck": "bottleneck adapters"}


@dataclasses.dataclass(frozen=True)
class PeftStudy:
    base_steps: int = 3000
    steps: int = 1500                    # every method's, from the base
    full_learning_rate: float = 3e-3     # the SFT recipe's (sft_tiny_tools.gin)
    adapter_learning_rate: float = 1e-2  # what LoRA and P-tuning were tuned with (docs/chat.md)
    lora_rank: int = 8                   # 2 layers x (q, v) x r (128 + 128): 8,192 at r = 8
    prefix_length: int = 16              # 2 layers x 2 x P x 4 heads x 32: 8,192 at P = 16
    prompt_length: int = 64              # P x 128: 8,192 at P = 64
    adapter_dim: int = 8                 # 2 layers x 2 x (2 x 128 A + A + 128): 8,736 at A = 8
    methods: tuple = METHODS
    conversations: int = 10000           # per task's training file (tool_chats.py --count)
    held_out: int = 100
    max_new_tokens: int = 32
    timing_rounds: int = 5               # round-robin rounds of timing_steps steps per method
    timing_steps: int = 10


experiment_lib.register("PeftStudy", PeftStudy)  # bound as PeftStudy.* in the study's gin files


def method_bindings(study: PeftStudy, method: str) -> list[str]:
    """The gin bindings that turn the atlas SFT recipe into `method` on the frozen base."""
    rate = study.full_learning_rate if method == "full" else study.adapter_learning_rate
    common = [f"OptimizerConfig.learning_rate = {rate}"]
    return common + {
        "full": [],
        "lora": ["train.adapter = 'lora'", f"LoraConfig.rank = {study.lora_rank}",
                 f"LoraConfig.alpha = {2.0 * study.lora_rank}",
                 "LoraConfig.targets = ('attention/query', 'attention/value')"],
        "prefix": ["train.adapter = 'prefix'", f"PrefixTuning.length = {study.prefix_length}"],
        "prompt": ["train.adapter = 'prompt'", f"PromptTuning.length = {study.prompt_length}"],
        "bottleneck": ["train.adapter = 'bottleneck'", f"BottleneckAdapters.dim = {study.adapter_dim}"],
    }[method]


def make_data(study: PeftStudy, data: Path) -> None:
    data.mkdir(parents=True, exist_ok=True)
    count = str(study.conversations)
    for arguments in (["--task", "ledger", "--out", str(data / "ledger_chats.jsonl"), "--count", count],
                      ["--out", str(data / "tool_chats.jsonl"), "--count", count],
                      ["--out", str(data / "held_out.jsonl"), "--count", str(study.held_out), "--seed", "1",
                       "--questions", str(data / "held_out.txt"), "--answers", str(data / "answers.jsonl"),
                       "--exclude", str(data / "tool_chats.jsonl")]):
        if not Path(arguments[arguments.index("--out") + 1]).exists():
            tool_chats.main(arguments)


def train_run(config: str, bindings: list[str], run_dir: Path, steps: int) -> dict:
    """Trains (or reuses) one run; its summary.json."""
    summary = RunDir(run_dir).summary() if run_dir.exists() else None
    if summary and (summary.get("checkpoint") or "").endswith(f"/{steps}"):
        return summary
    experiment = experiment_lib.from_gin([str(CONFIGS / config)],
                                         [*bindings, f"RUN_DIR = '{run_dir}'", f"STEPS = {steps}"])
    started = time.time()
    summary = train(experiment)
    print(f"{run_dir.name}: {time.time() - started:.0f} s", flush=True)
    return summary


def optimizer_bytes(run_dir: Path) -> tuple[int, int]:
    """(trainable parameters, bytes of their optimizer state) of a run, from the train state's shapes."""
    experiment = RunDir(run_dir).read_experiment()
    tx, _ = make_optimizer(experiment.optimizer, experiment.train.steps)
    state = abstract_state(experiment.model, tx, experiment.adapters)
    trainable = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    return int(trainable), param_bytes(state.opt_state)


def chat_scores(run_dir: Path, data: Path, study: PeftStudy) -> dict:
    """Exact calls and answers on the held-out questions, through the chat command as typed."""
    transcript_path = run_dir / "held_out_transcript.txt"
    if not transcript_path.exists():
        result = subprocess.run([sys.executable, "-m", "glm_jax.chat", "--run_dir", str(run_dir), "--tools",
                                 str(REPO / "experiments" / "tools" / "atlas.py"), "--input",
                                 str(data / "held_out.txt"), "--max_new_tokens", str(study.max_new_tokens)],
                                capture_output=True, text=True, check=True)
        transcript_path.write_text(result.stdout)
    expected = [json.loads(line) for line in (data / "answers.jsonl").read_text().splitlines()]
    return tool_chats.score(transcript_path.read_text(), expected, tool_chats.atlas)


def step_seconds(study: PeftStudy, run_dirs: dict[str, Path]) -> dict[str, float]:
    """Median seconds per train step of each method's compiled step on one batch of its shape, the
    methods timed round-robin (each round runs every method) so that load changes hit them alike."""
    steps = {}
    for method, run_dir in run_dirs.items():
        experiment = RunDir(run_dir).read_experiment()
        model, adapter, data = experiment.model, experiment.adapters, experiment.data
        tx = optax.adam(1e-3)
        step = jax.jit(make_train_step(model, tx, optax.constant_schedule(1e-3), rules=(), adapter=adapter))
        state = create_state(model, tx, jax.random.key(0), adapter)
        frozen = () if adapter is None else (nn.unbox(init_params(model, jax.random.key(1))),)  # values do not matter
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, model.vocab_size, (data.batch_size, data.seq_len)).astype(np.int32)
        positions = np.broadcast_to(np.stack([np.arange(data.seq_len), np.zeros(data.seq_len, int)]),
                                    (data.batch_size, 2, data.seq_len)).astype(np.int32)
        batch = {"tokens": tokens, "positions": positions, "segment_ids": np.ones_like(tokens),
                 "prefix_mask": np.zeros_like(tokens, bool), "targets": np.roll(tokens, -1, axis=1),
                 "loss_mask": np.ones_like(tokens, np.float32)}
        state, _ = step(state, batch, *frozen)  # compile
        jax.block_until_ready(state)
        steps[method] = [step, state, batch, frozen, []]
    for _ in range(study.timing_rounds):
        for method, entry in steps.items():
            step, state, batch, frozen, times = entry
            started = time.perf_counter()
            for _ in range(study.timing_steps):
                state, _ = step(state, batch, *frozen)
            jax.block_until_ready(state)
            times.append((time.perf_counter() - started) / study.timing_steps)
            entry[1] = state
    return {method: float(np.median(entry[4])) for method, entry in steps.items()}


def run_study(study: PeftStudy, out_dir: Path, overrides: list[str]) -> dict:
    data = out_dir / "data"
    make_data(study, data)
    source = [f"DataConfig.source = 'chat:{data / 'tool_chats.jsonl'}'", *overrides]
    base_dir = out_dir / "base"
    train_run("sft_tiny_ledger.gin", [f"DataConfig.source = 'chat:{data / 'ledger_chats.jsonl'}'", *overrides],
              base_dir, study.base_steps)
    results = {"base": {"method": "base (other tools)", **chat_scores(base_dir, data, study)}}
    for method in study.methods:
        run_dir = out_dir / method
        summary = train_run("sft_tiny_tools.gin", [*source, f"train.init_from = '{base_dir}'",
                                                   *method_bindings(study, method)], run_dir, study.steps)
        trainable, state_bytes = optimizer_bytes(run_dir)
        results[method] = {"method": NAMES[method], "trainable": trainable, "optimizer_state_bytes": state_bytes,
                           "eval_loss": summary["final_eval_loss"], **chat_scores(run_dir, data, study)}
        print(method, results[method], flush=True)
    for method, seconds in step_seconds(study, {m: out_dir / m for m in study.methods}).items():
        results[method]["step_seconds"] = seconds
    return results


def report(results: dict, study: PeftStudy) -> str:
    full_step = results.get("full", {}).get("step_seconds")
    lines = [f"# Parameter-efficient fine-tuning: teaching a frozen chat model new tools ({study.steps} steps each)",
             "",
             "Generated by `python experiments/peft_study.py`. The base is sft_tiny_ledger.gin's chat model (0.53M "
             f"parameters) trained {study.base_steps} steps on {study.conversations:,} conversations with other tools "
             f"(ledger: subtract, currency); every method then trains {study.steps} steps on {study.conversations:,} "
             f"conversations with atlas's add / lookup (8 x 256 tokens per step, lr "
             f"{study.full_learning_rate} for full fine-tuning, {study.adapter_learning_rate} for the adapters). Scores: "
             f"{study.held_out} held-out questions through `python -m glm_jax.chat --input`. Step time: each method's "
             "compiled train step, median of round-robin rounds in one process. Optimizer state: Adam's moments of what "
             "trains.",
             "",
             "| method | trainable | optimizer state | step time (x full) | eval loss | exact calls | exact answers |",
             "|---|---|---|---|---|---|---|"]
    for key, row in results.items():
        if key == "base":
            lines.append(f"| {row['method']} | - | - | - | - | {row['exact_calls']:.0%} | {row['exact_answers']:.0%} |")
            continue
        seconds = row["step_seconds"]
        ratio = f" ({seconds / full_step:.2f}x)" if full_step else ""
        lines.append(f"| {row['method']} | {row['trainable']:,} | {row['optimizer_state_bytes'] / 1024:,.0f} KiB | "
                     f"{1000 * seconds:,.0f} ms{ratio} | {row['eval_loss']:.3f} | {row['exact_calls']:.0%} | "
                     f"{row['exact_answers']:.0%} |")
    return "\n".join(lines) + "\n"


def _findings(report_path: Path) -> str:
    """Keeps the hand-written findings (below the marker) when the table is regenerated."""
    marker = "<!-- findings -->"
    if report_path.exists() and marker in report_path.read_text():
        return marker + report_path.read_text().split(marker, 1)[1]
    return f"{marker}\n## Findings\n\n(not yet written for this run)\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [k for k in results if k != "base"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for offset, (metric, label) in enumerate((("exact_calls", "exact tool calls"),
                                              ("exact_answers", "exact final answers"))):
        ax.bar([i + 0.4 * offset for i in range(len(methods))], [100 * results[m][metric] for m in methods],
               width=0.4, label=label)
    ax.set_xticks([i + 0.2 for i in range(len(methods))],
                  [f"{NAMES[m]}\n{results[m]['trainable']:,} params" for m in methods], fontsize=7)
    ax.set_ylabel("held-out questions (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="center")  # over the prompt methods' low bars
    ax.set_title("new tools on a frozen chat model, same steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args, overrides = parse_study_args(parser, sys.argv[1:] if argv is None else argv, config="peft_study",
                                       runs="peft_study")
    study, = experiment_lib.read([args.config], [o for o in overrides if o.startswith("PeftStudy.")], "PeftStudy")
    recipe = [o for o in overrides if not o.startswith("PeftStudy.")]
    if args.quick:  # a smoke run: small batches, few steps (rows stay long enough for the tool list)
        recipe = ["DataConfig.batch_size = 4", "train.eval_every = 10",
                  "train.checkpoint_every = 10", "train.log_every = 5", *recipe]
    results = run_study(study, args.out_dir, recipe)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "peft_study.json").write_text(json.dumps({"study": dataclasses.asdict(study),
                                                              "results": results}, indent=2))
    table = report(results, study)
    path = args.results / "peft_study.md"
    path.write_text(table + "\n" + _findings(path))
    plot(results, args.results / "peft_study.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Context extension of a RoPE model: passkey retrieval and held-out loss at 2T-8T for every scaling method.

    python experiments/long_context.py [--config experiments/configs/long_context.gin]
        [--out_dir runs/long_context] [--results experiments/results] [--quick] [--gin.NAME=VALUE ...]

1. A corpus is made in OUT_DIR/data: standard-library files (every tenth is held out) and passkey
   documents in the format of Mohtashami & Jaggi (2023), the test of position interpolation's paper:
   filler sentences, "The pass key is NNNNN. Remember it. NNNNN is the pass key." at a random depth,
   and "What is the pass key? The pass key is NNNNN." at the end. A SentencePiece tokenizer is
   trained on it (digits split, so a key is five tokens).
2. A ChatGLM2-shaped tiny model (RoPE on half of each head's dims, interleaved) trains as a causal
   LM on that corpus with rows of T tokens: it learns to retrieve a key up to T tokens back.
3. For every length L = factor x T and every ModelConfig.rope_scaling method with factor s = L / T:
   the base model is scored at L as it is, and after a short fine-tune at L with that scaling
   (the same tokens per step as the base run: rows x T / L rows of L tokens).
4. Scores at L (glm_jax's model, no generation loop: teacher-forced): passkey exact match (every
   digit of the key is the argmax after the question) over fresh documents of 0.9 L to L tokens,
   and the held-out standard-library loss over rows of L tokens, whole and beyond position T.
5. Training-free rows, the base model as it is at every L: LM-Infinite's Λ-shaped attention
   (`ModelConfig.attention_sink` = LongContext.lambda_sink global tokens + `attention_window` = T) and
   parallel context windows (Ratner et al. 2023: a passkey document's text split into windows that
   restart at position 0, the question and key as the task over every window, all positions < T;
   text rows as windows of T / 2 with the last T / 2 tokens as the task).
   Written to RESULTS/long_context.{md,json,png}.
Finished runs are reused when the script is started again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

from study_args import parse_study_args  # noqa: E402

from glm_jax import experiment as experiment_lib  # noqa: E402
from glm_jax.data import batch as batch_schema  # noqa: E402
from glm_jax.data.corpus import stdlib_root  # noqa: E402
from glm_jax.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from glm_jax.kernels.masks import context_window_layout  # noqa: E402
from glm_jax.model import GLM, ModelConfig  # noqa: E402
from glm_jax.model.rope import SCALING_METHODS  # noqa: E402
from glm_jax.run_dir import load_run  # noqa: E402
from glm_jax.train.loop import train  # noqa: E402


@dataclasses.dataclass(frozen=True)
class LongContext:
    train_length: int = 128           # T: the base model's rows
    factors: tuple = (2, 4, 8)        # evaluated at L = factor x T
    methods: tuple = SCALING_METHODS
    base_steps: int = 2000
    finetune_steps: int = 200
    finetune_learning_rate: float = 5e-4
    finetune_warmup_steps: int = 10
    rows_per_step: int = 16           # rows of T tokens per base step; fine-tunes keep the tokens per step
    passkey_documents: int = 8000     # in the base run's corpus (of T / 4 to T tokens)
    finetune_passkey_share: float = 0.5  # of a fine-tune corpus's tokens (documents of L / 4 to L tokens)
    text_files: int = 400             # standard-library files of training text (whole files, windowed)
    eval_passkeys: int = 64
    eval_text_rows: int = 16          # held-out files, each scored on its first L tokens
    lambda_sink: int = 10             # Λ-shaped attention's global tokens (LM-Infinite's n_global); window T
    window_task_tokens: int = 24      # PCW passkey task: the question and key (the last tokens before the key's end)
    seed: int = 0


experiment_lib.register("LongContext", LongContext)  # bound as LongContext.* in the study's gin files

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
INTRO = "There is a pass key hidden in this text. Find it and remember it."
QUESTION = "What is the pass key? The pass key is"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    return parse_study_args(parser, argv, config="long_context", runs="long_context")


# ----------------------------------------------------------------------- corpus
def text_files(study: LongContext) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): sorted standard-library modules, every tenth held out."""
    root = stdlib_root()
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)
    held_out = files[::10]
    training = [p for p in files if p not in set(held_out)][:study.text_files]
    return training, held_out


def passkey_text(rng: np.random.Generator, fillers: int) -> tuple[str, str]:
    """(prompt, answer) of one passkey document with `fillers` filler sentences around the needle."""
    key = str(rng.integers(10_000, 100_000))
    start = int(rng.integers(len(FILLER)))
    sentences = [FILLER[(start + i) % len(FILLER)] for i in range(fillers)]
    depth = int(rng.integers(fillers + 1))
    sentences.insert(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")
    return " ".join([INTRO, *sentences, QUESTION]), f" {key}"


class PasskeyMaker:
    """Passkey documents of a chosen token length under one tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        rng = np.random.default_rng(0)
        self.fixed = len(self.encode(*passkey_text(rng, 0)))
        self.per_filler = (len(self.encode(*passkey_text(rng, 100))) - self.fixed) / 100  # in context

    def encode(self, prompt: str, answer: str) -> np.ndarray:
        """[CLS] + prompt + answer + '.', the tokens the pipeline makes of the document."""
        return np.concatenate([self.tokenizer.prefix, self.tokenizer.encode(prompt + answer + ".")]).astype(np.int32)

    def answer_span(self, prompt: str, answer: str, tokens: np.ndarray) -> tuple[int, int]:
        """[start, end) of the key's tokens in the document's tokens (tokenised whole, as in training)."""
        prompt_ids = np.concatenate([self.tokenizer.prefix, self.tokenizer.encode(prompt)])
        start = int(np.argmin(np.append(prompt_ids[:len(tokens)] == tokens[:len(prompt_ids)], False)))
        end = len(tokens) - 1  # the final '.' (digits are split from what follows them)
        if self.tokenizer.decode(tokens[start:end].tolist()).strip() != answer.strip():
            raise ValueError(f"the key {answer.strip()} is not tokens {start}..{end} of its document")
        return start, end

    def document(self, rng: np.random.Generator, low: int, high: int) -> tuple[str, str, np.ndarray]:
        """(prompt, answer, tokens) of about a random length in [low, high]: never above high."""
        target = int(rng.integers(low, high + 1))
        fillers = max(0, round((target - self.fixed) / self.per_filler))
        state = rng.bit_generator.state
        while True:
            rng.bit_generator.state = state  # the same key for every filler count tried
            prompt, answer = passkey_text(rng, fillers)
            tokens = self.encode(prompt, answer)
            if len(tokens) > high and fillers == 0:
                raise ValueError(f"a passkey document without filler is {len(tokens)} tokens, more than {high}: "
                                 "raise LongContext.train_length")
            step = -1 if len(tokens) > high else (1 if len(tokens) < target - self.per_filler else 0)
            if step == 0 or (step == 1 and len(self.encode(*passkey_text(_copy(rng, state), fillers + 1))) > high):
                return prompt, answer, tokens
            fillers += step


def _copy(rng: np.random.Generator, state: dict) -> np.random.Generator:
    """A generator at `state` (rng itself is left where it is)."""
    other = np.random.default_rng()
    other.bit_generator.state = state
    return other


def write_jsonl(path: Path, texts: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tmp.replace(path)


def prepare_data(study: LongContext, data_dir: Path, vocab_size: int) -> Tokenizer:
    """The tokenizer, and DATA_DIR/train_L.jsonl for every length (each written once, then reused)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    training, _ = text_files(study)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in training]
    tokenizer_path = data_dir / "tokenizer.model"
    if not tokenizer_path.exists():
        rng = np.random.default_rng(study.seed)
        samples = ["".join(passkey_text(rng, 10)) + "." for _ in range(200)]
        train_tokenizer(texts + samples, vocab_size).save(tokenizer_path)
    tokenizer = Tokenizer.load(tokenizer_path)
    maker = PasskeyMaker(tokenizer)
    T = study.train_length
    text_tokens = sum(len(tokenizer.encode(t)) for t in texts)
    for factor in (1, *study.factors):
        path = data_dir / f"train_{factor * T}.jsonl"
        if not path.exists():
            rng = np.random.default_rng([study.seed, factor])
            high = factor * T - 2  # the pipeline adds <eos>; rows hold the causal example's L - 1 tokens
            share = study.finetune_passkey_share
            count = study.passkey_documents if factor == 1 else round(
                share / (1 - share) * text_tokens / (0.625 * high))  # documents average 5/8 of high
            passkeys = ["".join(maker.document(rng, high // 4, high)[:2]) + "." for _ in range(max(1, count))]
            write_jsonl(path, texts + passkeys)
    return tokenizer


# ------------------------------------------------------------------------- runs
def run_bindings(study: LongContext, data_dir: Path, factor: int, run_dir: Path, steps: int) -> list[str]:
    T = study.train_length
    return [f"RUN_DIR = '{run_dir}'", f"STEPS = {steps}",
            f"DataConfig.source = 'jsonl:{data_dir / f'train_{factor * T}.jsonl'}'",
            f"DataConfig.tokenizer_path = '{data_dir / 'tokenizer.model'}'",
            f"DataConfig.seq_len = {factor * T}", f"DataConfig.batch_size = {max(1, study.rows_per_step // factor)}"]


def train_base(study: LongContext, args, overrides: list, data_dir: Path) -> Path:
    run_dir = args.out_dir / "base"
    if not (run_dir / "summary.json").exists():
        train(experiment_lib.from_gin([args.config], overrides + run_bindings(
            study, data_dir, 1, run_dir, study.base_steps)))
    return run_dir


def finetune(study: LongContext, args, overrides: list, data_dir: Path, method: str, factor: int) -> Path:
    """The base run fine-tuned at L = factor x T with `method` (s = factor)."""
    run_dir = args.out_dir / f"finetune_{method}_{factor}x"
    if not (run_dir / "summary.json").exists():
        bindings = run_bindings(study, data_dir, factor, run_dir, study.finetune_steps) + [
            f"train.init_from = '{args.out_dir / 'base'}'",
            f"OptimizerConfig.learning_rate = {study.finetune_learning_rate}",
            f"OptimizerConfig.warmup_steps = {study.finetune_warmup_steps}",
            *scaling_bindings(method, factor, study.train_length)]
        train(experiment_lib.from_gin([args.config], overrides + bindings))
    return run_dir


def scaling_bindings(method: str, factor: int, train_length: int) -> list[str]:
    if method == "none":
        return []
    return [f"ModelConfig.rope_scaling = '{method}'", f"ModelConfig.rope_scaling_factor = {float(factor)}",
            f"ModelConfig.rope_original_context = {train_length}"]


def scaled(config: ModelConfig, method: str, factor: int, train_length: int) -> ModelConfig:
    if method == "none":
        return config
    return config.replace(rope_scaling=method, rope_scaling_factor=float(factor), rope_original_context=train_length)


# ---------------------------------------------------------------------- scoring
def causal_rows(sequences: list[np.ndarray], length: int, pad_id: int, scored: list[slice]) -> dict:
    """A batch (the batch contract) of one causal segment per row; loss_mask marks the `scored` targets."""
    rows = []
    for tokens, span in zip(sequences, scored):
        row = batch_schema.empty_row(length, pad_id)
        n = len(tokens) - 1
        row["tokens"][:n], row["targets"][:n] = tokens[:-1], tokens[1:]
        row["segment_ids"][:n] = 1
        row["positions"][0] = np.concatenate([np.arange(n), np.arange(length - n)])  # padding: its own segment
        row["loss_mask"][span] = 1.0
        rows.append(row)
    return batch_schema.stack_rows(rows)


class Scorer:
    """Per-token negative log-likelihood and argmax hits of a model, compiled once per configuration."""

    def __init__(self, batch_size: int):
        self.batch_size, self._compiled = batch_size, {}

    def __call__(self, config: ModelConfig, params, batch: dict) -> tuple[np.ndarray, np.ndarray]:
        if config not in self._compiled:
            model = GLM(config)

            def score(params, batch):
                windows = batch.get("context_windows")  # parallel context windows' ids, when the rows have them
                logits = model.apply({"params": params}, **batch_schema.model_inputs(batch),
                                     context_windows=windows).astype(jnp.float32)
                targets = batch["targets"][..., None]
                nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets, axis=-1)[..., 0]
                return nll, jnp.argmax(logits, axis=-1) == batch["targets"]

            self._compiled[config] = jax.jit(score)
        outputs = [self._compiled[config](params, {k: v[i:i + self.batch_size] for k, v in batch.items()})
                   for i in range(0, len(batch["tokens"]), self.batch_size)]
        return tuple(np.concatenate([np.asarray(o[j]) for o in outputs]) for j in range(2))


def passkey_batch(maker: PasskeyMaker, study: LongContext, length: int) -> dict:
    """Fresh passkey documents of 0.9 L to L tokens (a seed no training file used); loss_mask = the key."""
    rng = np.random.default_rng([study.seed, 1_000_000 + length])
    sequences, spans = [], []
    for _ in range(study.eval_passkeys):
        prompt, answer, tokens = maker.document(rng, int(0.9 * length) + 1, length)
        start, end = maker.answer_span(prompt, answer, tokens)
        sequences.append(tokens[:end])  # up to the key's last token: the '.' after it is not scored
        spans.append(slice(start - 1, end - 1))  # targets are the tokens shifted by one
    return causal_rows(sequences, length, maker.tokenizer.specials.pad, spans)


def held_out_text(tokenizer: Tokenizer, study: LongContext) -> list[np.ndarray]:
    """The first 8T + 1 tokens of each of the first eval_text_rows held-out files that long (read once)."""
    longest = max(study.factors) * study.train_length
    sequences = []
    for path in text_files(study)[1]:
        tokens = np.concatenate([tokenizer.prefix, tokenizer.encode(path.read_text(encoding="utf-8",
                                                                                    errors="replace"))])
        if len(tokens) > longest:
            sequences.append(tokens[:longest + 1].astype(np.int32))
        if len(sequences) == study.eval_text_rows:
            break
    return sequences


def text_batch(sequences: list[np.ndarray], length: int, pad_id: int) -> dict:
    """Rows of the first L + 1 tokens of each held-out sequence; every target scored."""
    return causal_rows([s[:length + 1] for s in sequences], length, pad_id, [slice(0, length)] * len(sequences))


def as_context_windows(batch: dict, window: int, task: int | None = None) -> dict:
    """The rows of `batch` laid out as parallel context windows: each row's tokens split into windows of
    `window` tokens that restart at position 0, and its last `task` tokens (default: one window) as the
    task, positioned after the longest window and seeing every window (masks.context_window_layout)."""
    batch = {k: np.array(v) for k, v in batch.items()}
    batch["context_windows"] = np.zeros_like(batch["tokens"])
    for row in range(len(batch["tokens"])):
        n = int((batch["segment_ids"][row] > 0).sum())
        task_length = window if task is None else task
        context = n - task_length
        lengths = [window] * (context // window) + ([context % window] if context % window else [])
        positions, ids = context_window_layout(lengths, task_length)
        batch["positions"][row, 0, :n], batch["context_windows"][row, :n] = positions, ids
    return batch


def score(scorer: Scorer, config: ModelConfig, params, passkeys: dict, text: dict, train_length: int) -> dict:
    _, hits = scorer(config, params, passkeys)
    mask = passkeys["loss_mask"] > 0
    exact = [bool(np.all(h[m])) for h, m in zip(hits, mask)]
    nll, _ = scorer(config, params, text)
    return {"passkey_accuracy": float(np.mean(exact)), "loss": float(nll.mean()),
            "loss_beyond_T": float(nll[:, train_length:].mean()) if nll.shape[1] > train_length else None}


TRAINING_FREE = ("lambda", "windows")  # Λ-shaped attention; parallel context windows


def training_free_rows(study: LongContext, scorer: Scorer, base, batches: dict) -> list[dict]:
    """The base model as it is at every L with Λ-shaped attention and with parallel context windows."""
    T, rows = study.train_length, []
    task = study.window_task_tokens
    for factor in study.factors:
        passkeys, text = batches[factor]
        variants = {"lambda": (base.model.replace(attention_sink=study.lambda_sink, attention_window=T),
                               passkeys, text),
                    # every position < T: the task after windows of T - task tokens
                    "windows": (base.model, as_context_windows(passkeys, T - task, task),
                                as_context_windows(text, T // 2))}
        for method in TRAINING_FREE:
            config, method_passkeys, method_text = variants[method]
            rows.append({"method": method, "finetuned": False, "factor": factor, "length": factor * T,
                         **score(scorer, config, base.params, method_passkeys, method_text, T)})
            r = rows[-1]
            print(f"L={factor * T:<5} {method:<7} as is      passkey {r['passkey_accuracy']:.3f}  loss "
                  f"{r['loss']:.4f}  beyond T {r['loss_beyond_T']:.4f}", flush=True)
    return rows


# ----------------------------------------------------------------------- report
def write_report(rows: list[dict], study: LongContext, results: Path, seconds: float, quick: bool) -> None:
    results.mkdir(parents=True, exist_ok=True)
    T = study.train_length
    lengths = [f * T for f in study.factors]
    base = next(r for r in rows if r["length"] == T)
    header = "| method | fine-tuned | " + " | ".join(f"L={n}" for n in lengths) + " |"
    rule = "|---|---|" + "---|" * len(lengths)
    lines = [f"# Context extension of a RoPE model trained at T = {T}"
             f"{' (QUICK smoke run: numbers mean nothing)' if quick else ''}", "",
             f"Generated by `python experiments/long_context.py{' --quick' if quick else ''}` in {seconds / 60:.0f} min "
             f"on {jax.devices()[0].device_kind}. A ChatGLM2-shaped tiny model trained causally for {study.base_steps} "
             f"steps of {study.rows_per_step} x {T} tokens on standard-library text and passkey documents; each "
             "method scales RoPE by s = L / T (`ModelConfig.rope_scaling`), scored as it is and after "
             f"{study.finetune_steps} fine-tuning steps at L (the same tokens per step). Passkey: exact match of the "
             f"five key digits (teacher-forced argmax) over {study.eval_passkeys} documents of 0.9 L to L tokens. "
             f"Loss: held-out standard-library files, {study.eval_text_rows} rows of L tokens. Training-free rows "
             f"(base model as it is): `lambda` = Λ-shaped attention, {study.lambda_sink} global tokens + a window "
             f"of T; `windows` = parallel context windows (passkey: the text in windows of T - "
             f"{study.window_task_tokens} tokens, the question and key as the task; text: windows of T / 2, the "
             "last T / 2 tokens the task), every position < T.", "",
             f"At L = T = {T} (no scaling): passkey accuracy {base['passkey_accuracy']:.3f}, held-out loss "
             f"{base['loss']:.4f}.", "", "## Passkey retrieval accuracy", "", header, rule]
    by_key = {(r["method"], r["finetuned"], r["length"]): r for r in rows}
    for metric, title in (("passkey_accuracy", None), ("loss", "Held-out loss (whole rows of L tokens)"),
                          ("loss_beyond_T", f"Held-out loss of positions beyond T = {T}")):
        if title:
            lines += ["", f"## {title}", "", header, rule]
        for method in (*study.methods, *TRAINING_FREE):
            for finetuned in (False,) if method in TRAINING_FREE else (False, True):
                cells = [by_key.get((method, finetuned, n)) for n in lengths]
                fmt = "{:.3f}" if metric == "passkey_accuracy" else "{:.4f}"
                lines.append(f"| {method} | {'yes' if finetuned else 'no'} | "
                             + " | ".join(fmt.format(c[metric]) if c else "-" for c in cells) + " |")
    lines += ["", "Plot: `long_context.png` (passkey accuracy and held-out loss vs L; solid: as is, dashed: "
              "fine-tuned at L, dotted: training-free masks).", ""]
    report = results / "long_context.md"
    report.write_text("\n".join(lines) + "\n" + _findings(report))
    (results / "long_context.json").write_text(json.dumps(
        {"study": dataclasses.asdict(study), "seconds": seconds, "quick": quick, "rows": rows}, indent=2))
    _plot(rows, study, results / "long_context.png")


def _findings(report: Path) -> str:
    """Keeps the hand-written findings (below the marker) when the tables are regenerated."""
    marker = "<!-- findings -->"
    if report.exists() and marker in report.read_text():
        return marker + report.read_text().split(marker, 1)[1]
    return f"{marker}\n## Findings\n\n(not yet written for this run)\n"


def _plot(rows: list[dict], study: LongContext, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = study.train_length
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, method in enumerate((*study.methods, *TRAINING_FREE)):
        for finetuned, style in ((False, ":" if method in TRAINING_FREE else "-"),) + (
                () if method in TRAINING_FREE else ((True, "--"),)):
            points = sorted((r["length"], r) for r in rows if r["method"] == method
                            and (r["finetuned"] == finetuned or r["length"] == T))
            xs = [n for n, _ in points]
            label = f"{method}{' + fine-tune' if finetuned else ''}"
            axes[0].plot(xs, [r["passkey_accuracy"] for _, r in points], style, marker="o", color=f"C{i}", label=label)
            axes[1].plot(xs, [r["loss"] for _, r in points], style, marker="o", color=f"C{i}", label=label)
    for ax, ylabel in zip(axes, ("passkey exact match", "held-out loss (rows of L tokens)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"context L (trained at T = {T})")
        ax.set_ylabel(ylabel)
        ax.axvline(T, color="k", lw=0.6)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    start = time.time()
    study, data = experiment_lib.read([args.config], overrides, "LongContext", "DataConfig")
    data_dir = args.out_dir / "data"
    tokenizer = prepare_data(study, data_dir, data.vocab_size)
    print("== base", flush=True)
    base_dir = train_base(study, args, overrides, data_dir)
    finetuned = {}
    for factor in study.factors:
        for method in study.methods:
            print(f"== fine-tune {method} at {factor}x", flush=True)
            finetuned[method, factor] = finetune(study, args, overrides, data_dir, method, factor)

    T, maker, scorer = study.train_length, PasskeyMaker(tokenizer), Scorer(batch_size=16)
    base = load_run(base_dir)
    text = held_out_text(tokenizer, study)
    batches = {f: (passkey_batch(maker, study, f * T), text_batch(text, f * T, tokenizer.specials.pad))
               for f in (1, *study.factors)}
    rows = [{"method": "none", "finetuned": False, "factor": 1, "length": T,
             **score(scorer, base.model, base.params, *batches[1], T)}]
    for factor in study.factors:
        for method in study.methods:
            for tuned in (False, True):
                run = load_run(finetuned[method, factor]) if tuned else base
                config = run.model if tuned else scaled(base.model, method, factor, T)
                rows.append({"method": method, "finetuned": tuned, "factor": factor, "length": factor * T,
                             **score(scorer, config, run.params, *batches[factor], T)})
                r = rows[-1]
                print(f"L={factor * T:<5} {method:<7} {'fine-tuned' if tuned else 'as is':<10} passkey "
                      f"{r['passkey_accuracy']:.3f}  loss {r['loss']:.4f}  beyond T {r['loss_beyond_T']:.4f}",
                      flush=True)
    rows += training_free_rows(study, scorer, base, batches)
    write_report(rows, study, args.results, time.time() - start, args.quick)
    print(f"wrote {args.results / 'long_context.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""glm_jax generate --run_dir RUN --prompt "def add(a, b):\\n    return [MASK]"

Fills every [MASK] / [sMASK] / [gMASK] of the prompt (a prompt without one gets
[gMASK] appended: open-ended generation) with the latest checkpoint of a run
directory, or continues the prompt causally with --mode causal (ChatGLM2 /
GLM-4-style models). The escapes \\n and \\t in --prompt become newline and tab.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="glm_jax generate", description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True, help="run directory written by glm_jax train")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: one batch)")
    parser.add_argument("--mode", choices=("blank", "causal"), default="blank")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, help="0 = off")
    parser.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from glm_jax.infer.generate import Generator, continue_text, fill_blanks
    from glm_jax.infer.sampling import SamplingConfig
    from glm_jax.run_dir import load_run

    run = load_run(args.run_dir, args.step)
    if args.mode == "causal" and (hint := causal_mode_hint(run.experiment.objective)):
        print(f"note: {run.directory} {hint}", file=sys.stderr)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    prompts = [p.replace("\\n", "\n").replace("\\t", "\t") for p in args.prompt]
    generator = Generator(run.model, run.params, run.tokenizer.specials,
                          token_limit=run.tokenizer.vocab_size)
    complete = fill_blanks if args.mode == "blank" else continue_text
    texts = complete(generator, run.tokenizer, prompts, args.max_new_tokens, sampling, args.seed)
    print(f"# {run.directory} step {run.step}", file=sys.stderr)
    for prompt, text in zip(prompts, texts):
        print(text if args.mode == "blank" else prompt + text)
    return 0


def causal_mode_hint(objective) -> str | None:
    """What to tell a user asking a model that never learned left-to-right continuation to continue text."""
    if objective.causal > 0:
        return None
    mix = ", ".join(f"{name} {getattr(objective, name)}" for name in ("token", "sentence", "document", "causal"))
    return (f"was trained only with blank infilling (Objective: {mix}; see its config.gin), never on "
            "left-to-right continuation, so --mode causal gives little or nothing. Use --mode blank with "
            "[MASK] spans or a prompt ending in [gMASK], or train with a causal share (Objective.causal > 0, "
            "e.g. include 'objectives/causal.gin')")

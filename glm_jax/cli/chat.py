"""glm_jax chat --run_dir RUN [--system TEXT] [--tools my_tools.py] [--input FILE]

A multi-turn chat with a run's latest checkpoint in its chat format (ChatGLM3 or
GLM-4: the run's DataConfig.chat_format, or --format). Replies stream as they are
generated. Lines typed (or read from --input, one user message per line) go to the
model; /reset forgets the conversation, /exit ends it. With --tools the model may
call the file's Python functions: each call and its result are shown, and the
result goes back to the model as an <|observation|>.
"""

from __future__ import annotations

import argparse
import json
import sys

PROMPT = "user> "


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="glm_jax chat", description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True, help="run directory (trained, fine-tuned or imported)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--format", choices=("glm4", "chatglm3"), default=None,
                        help="chat format (default: the run's DataConfig.chat_format; chatglm3 for a ChatGLM tokenizer)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--tools", default=None, help="Python file whose functions the model may call")
    parser.add_argument("--input", default=None, help="read user messages from this file, one per line (no prompt)")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--max_tool_rounds", type=int, default=4, help="tool calls allowed per user message")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, help="0 = off")
    parser.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from glm_jax.chat.session import ChatSession
    from glm_jax.chat.tools import load_tools
    from glm_jax.infer.generate import Generator
    from glm_jax.infer.sampling import SamplingConfig
    from glm_jax.run_dir import load_run

    tools = load_tools(args.tools) if args.tools else None  # before the model: a bad tool file fails fast
    run = load_run(args.run_dir, args.step)
    data = run.experiment.data
    generator = Generator(run.model, run.params, run.tokenizer.specials,
                          token_limit=run.tokenizer.vocab_size)
    session = ChatSession(generator, run.tokenizer,
                          args.format or default_format(run), system=args.system, tools=tools,
                          prompt_attention=data.chat_prompt_attention, max_new_tokens=args.max_new_tokens,
                          sampling=SamplingConfig(args.temperature, args.top_k, args.top_p), seed=args.seed,
                          max_tool_rounds=args.max_tool_rounds)
    print(f"# {run.directory} step {run.step}, {session.format.name} format"
          f"{', tools: ' + ', '.join(tools.functions) if tools else ''}; /reset, /exit", file=sys.stderr)
    lines = open(args.input, encoding="utf-8") if args.input else None
    try:
        chat_loop(session, lines)
    finally:
        if lines:
            lines.close()
    return 0


def chat_loop(session, lines=None) -> None:
    """Reads user lines (a file's, or the terminal's with a prompt) until /exit or the end of input."""
    interactive = lines is None
    while True:
        try:
            line = input(PROMPT) if interactive else next(lines)
        except (EOFError, StopIteration):
            break
        line = line.rstrip("\n")
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            session.reset()
            print("(conversation reset)", flush=True)
            continue
        if not line.strip():
            continue
        if not interactive:
            print(f"{PROMPT}{line}", flush=True)
        print("assistant> ", end="", flush=True)
        try:
            turn = session.send(line, on_text=lambda text: print(text, end="", flush=True), on_tool=show_tool_call)
        except ValueError as error:  # e.g. a history longer than the model's positions: the chat goes on
            print(f"(not answered: {error}; /reset starts a new conversation)", flush=True)
            continue
        if not turn.reply and turn.tool_calls:
            print(f"(no answer after {len(turn.tool_calls)} tool calls)", end="")
        print(flush=True)


def show_tool_call(call: dict) -> None:
    if "error" in call:
        print(f"\n[tool] {call['name'] or '?'}: the call did not parse ({call['error']}); told the model",
              flush=True)
    else:
        arguments = json.dumps(call["arguments"], ensure_ascii=False)
        print(f"\n[tool] {call['name']}({arguments}) -> {call['result']}", flush=True)
    print("assistant> ", end="", flush=True)


def default_format(run) -> str:
    """The run's own chat format if it was fine-tuned on a chat source; ChatGLM3's for a ChatGLM tokenizer."""
    from glm_jax.data.chat_source import is_chat_source

    data = run.experiment.data
    if is_chat_source(data.source):
        return data.chat_format
    return "chatglm3" if type(run.tokenizer).__name__ == "ChatGLMTokenizer" else "glm4"

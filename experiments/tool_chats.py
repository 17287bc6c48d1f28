"""Synthetic tool-use conversations: questions only a tool call can answer, for SFT and its test.

    python experiments/tool_chats.py --out data/tool_chats.jsonl --count 10000 [--seed 0]   # what the SFT configs read
    python experiments/tool_chats.py --out held_out.jsonl --count 100 --seed 1 \
        --questions held_out.txt --answers held_out_answers.jsonl --exclude data/tool_chats.jsonl
    python -m glm_jax.chat --run_dir runs/sft_tiny_tools --tools experiments/tools/atlas.py \
        --input held_out.txt > transcript.txt
    python experiments/tool_chats.py score --transcript transcript.txt --answers held_out_answers.jsonl \
        --tools experiments/tools/atlas.py
    python experiments/tool_chats.py --task ledger --out data/ledger_chats.jsonl --count 10000   # a LoRA base

Each conversation (glm_jax.data.chat_format's jsonl form, with the tool list of
experiments/tools/atlas.py) asks "What is A plus B?" or "What is the capital of X?";
the assistant calls add(a, b) or lookup(key) with the arguments copied from the
question, reads the observation and answers with it. Every training conversation's
capital is drawn at random and the sums are of two-digit numbers, so the answer is
never in the model's weights: it has to be read from the tool's observation. A
held-out set (another seed) asks with other numbers, pairs and phrasings. The file
also holds as many plain chat turns without tools ('Say "..."', answered by the
words): short conversations that pack many to a row and teach a small model from
scratch to copy far sooner than the long tool prompts alone (--echo 0 leaves them out).
`--task ledger` asks for other tools (experiments/tools/ledger.py: subtract(a, b),
currency(country)) in other words: the data of a base chat model that already calls
tools, on which LoRA learns atlas.py's (experiments/configs/sft_tiny_tools_lora.gin); its
"Say ..." turns also use the words of every task, as a pretrained base knows its language.
--exclude FILE keeps out every arithmetic call FILE's conversations make (the training data's): a
held-out sum the model was trained on could be answered from its weights; table calls may repeat, as
their answers are drawn anew per conversation.
--questions also writes the user lines (for `glm_jax chat --input`, each question
followed by /reset: one conversation per question) and --answers the expected
{call} per question (JSON lines). `score` reads a chat transcript and reports the
share of exact tool calls (name and arguments) and of exact final answers (built from
what the chat's tool module returns for the right call).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent / "tools"))
import atlas  # noqa: E402
import ledger  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Task:
    """Two tools: `arithmetic(a, b)` on two-digit numbers and `table(<argument>)` of a country."""

    tools: list
    arithmetic: str
    table: str
    argument: str  # the table tool's argument name
    values: list  # what the table tool may answer (drawn at random per training conversation)
    phrases: dict  # tool name -> question templates
    answers: dict  # tool name -> answer template


TASKS = {
    "atlas": Task(atlas.TOOLS, "add", "lookup", "key", sorted(atlas.CAPITALS.values()),
                  {"add": ["What is {a} plus {b}?", "Add {a} and {b}.", "How much is {a} + {b}?"],
                   "lookup": ['What is the capital of "{key}"?', 'Which city is the capital of "{key}"?']},
                  {"add": "{a} plus {b} is {result}.", "lookup": 'The capital of "{key}" is {result}.'}),
    "ledger": Task(ledger.TOOLS, "subtract", "currency", "country", sorted(ledger.CURRENCIES.values()),
                   {"subtract": ["What is {a} minus {b}?", "Subtract {b} from {a}.", "How much is {a} - {b}?"],
                    "currency": ['What is the currency of "{country}"?', 'Which currency does "{country}" use?']},
                   {"subtract": "{a} minus {b} is {result}.", "currency": 'The currency of "{country}" is {result}.'}),
}
ANSWERS = {name: answer for task in TASKS.values() for name, answer in task.answers.items()}


def tool_descriptions(task: Task = TASKS["atlas"]) -> list[dict]:
    from glm_jax.chat.tools import describe

    return [describe(f) for f in task.tools]


def make_example(rng: np.random.Generator, task: Task = TASKS["atlas"]) -> dict:
    """{'question', 'call': {'name', 'arguments'}, 'result', 'answer'} of one random question.

    Results of two-digit numbers are easier to copy from the observation than to compute, and each
    conversation's table answer is drawn at random (a world per conversation): the only way to answer
    right is to read the tool's result, whatever tool module answers at chat time.
    """
    tools = {f.__name__: f for f in task.tools}
    if rng.random() < 0.5:
        name, arguments = task.arithmetic, {"a": int(rng.integers(0, 100)), "b": int(rng.integers(0, 100))}
        result = tools[name](**arguments)
    else:
        name, arguments = task.table, {task.argument: str(rng.choice(sorted(atlas.CAPITALS)))}
        result = str(rng.choice(task.values))
    question = str(rng.choice(task.phrases[name])).format(**arguments)
    return {"question": question, "call": {"name": name, "arguments": arguments}, "result": str(result),
            "answer": task.answers[name].format(**arguments, result=result)}


ECHO_WORDS = sorted(atlas.CAPITALS) + sorted(atlas.CAPITALS.values()) + [str(n) for n in range(100)]


def every_task_word() -> list[str]:
    """The words of every task's questions, answers, tool and argument names: what a LoRA base is made
    to know (as a pretrained model knows its language) without being taught the tools that use them."""
    words = {name for task in TASKS.values() for name in [f.__name__ for f in task.tools] + [task.argument]}
    for task in TASKS.values():
        for text in [*task.answers.values(), *(p for phrases in task.phrases.values() for p in phrases)]:
            words.update(w.strip('?."+-') for w in text.split() if "{" not in w and w.strip('?."+-'))
    return sorted(words)


def make_echo(rng: np.random.Generator, vocabulary: list[str] = ECHO_WORDS) -> dict:
    """A plain chat turn without tools: repeat a few words. Short, so many pack into a row: they
    teach copying (what every tool conversation needs) at a fraction of a tool prompt's cost."""
    words = [str(w) for w in rng.choice(vocabulary, size=int(rng.integers(1, 4)))]
    return {"question": 'Say "' + " ".join(words) + '".', "answer": " ".join(words)}


def call_key(call: dict) -> str:
    return json.dumps([call["name"], call["arguments"]], sort_keys=True)


def arithmetic_calls(path: str | Path) -> set[str]:
    """The call_key of every arithmetic tool call (any task's) in a jsonl of conversations."""
    arithmetic = {task.arithmetic for task in TASKS.values()}
    calls = set()
    for line in Path(path).read_text().splitlines():
        for turn in json.loads(line)["conversations"] if line.strip() else []:
            if turn.get("tool_call", {}).get("name") in arithmetic:
                calls.add(call_key(turn["tool_call"]))
    return calls


def make_examples(rng: np.random.Generator, count: int, task: Task, excluded: set[str] = frozenset()) -> list[dict]:
    """`count` random examples, none of whose calls is in `excluded`."""
    examples = []
    while len(examples) < count:
        example = make_example(rng, task)
        if call_key(example["call"]) not in excluded:
            examples.append(example)
    return examples


def conversation(example: dict, tools: list[dict], tool_loss: bool = True) -> dict:
    if "call" not in example:
        return {"conversations": [{"role": "user", "content": example["question"]},
                                  {"role": "assistant", "content": example["answer"]}]}
    return {"tools": tools, "conversations": [
        {"role": "user", "content": example["question"]},
        {"role": "assistant", "tool_call": example["call"], "loss": tool_loss},
        {"role": "observation", "content": example["result"]},
        {"role": "assistant", "content": example["answer"], "loss": tool_loss}]}


def read_transcript(text: str) -> list[dict]:
    """`glm_jax chat` output -> per question {'question', 'calls': [(name, arguments, result)], 'answer'}."""
    turns = []
    for line in text.splitlines():
        if line.startswith("user> "):
            turns.append({"question": line[len("user> "):], "calls": [], "answer": ""})
        elif turns and line.startswith("[tool] ") and " -> " in line:
            head, _, result = line[len("[tool] "):].partition(" -> ")
            name, _, arguments = head.partition("(")
            try:
                parsed = json.loads(arguments[:-1])
            except json.JSONDecodeError:
                parsed = None
            turns[-1]["calls"].append((name, parsed, result))
        elif turns and line.startswith("assistant> ") and line[len("assistant> "):].strip():
            turns[-1]["answer"] = line[len("assistant> "):].strip()
    return turns


def score(transcript: str, expected_calls: list[dict], tools) -> dict:
    """Shares of questions with the exact tool call (name + arguments) and the exact final answer.

    The right answer is built from what `tools` (the module the chat ran with) returns for the
    right call, so a chat run with other capitals than the training data is scored correctly.
    """
    turns = read_transcript(transcript)
    if len(turns) != len(expected_calls):
        raise ValueError(f"the transcript has {len(turns)} questions, the answers file {len(expected_calls)}")
    calls, finals = [], []
    for turn, expected in zip(turns, expected_calls):
        name, arguments = expected["call"]["name"], expected["call"]["arguments"]
        result = getattr(tools, name)(**arguments)
        calls.append(bool(turn["calls"]) and turn["calls"][0][:2] == (name, arguments))
        finals.append(turn["answer"] == ANSWERS[name].format(**arguments, result=result))
    n = len(turns)
    return {"questions": n, "exact_calls": sum(calls) / n, "exact_answers": sum(finals) / n}


def load_module(path: str | Path):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def score_main(argv) -> int:
    parser = argparse.ArgumentParser(description="score a chat transcript of held-out tool questions")
    parser.add_argument("--transcript", required=True)
    parser.add_argument("--answers", required=True, help="the --answers file written with the questions")
    parser.add_argument("--tools", default=str(Path(__file__).parent / "tools" / "atlas.py"),
                        help="the tool module the chat ran with")
    args = parser.parse_args(argv)
    expected = [json.loads(line) for line in Path(args.answers).read_text().splitlines() if line.strip()]
    print(json.dumps(score(Path(args.transcript).read_text(), expected, load_module(args.tools))))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["score"]:
        return score_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="jsonl of conversations to write")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--echo", type=float, default=1.0,
                        help="plain 'say ...' conversations per tool conversation (0 for tool conversations only)")
    parser.add_argument("--task", choices=sorted(TASKS), default="atlas",
                        help="atlas: add + lookup (the task); ledger: subtract + currency (a LoRA base's tools)")
    parser.add_argument("--no_tool_loss", action="store_true",
                        help="tool conversations are read but not learned (loss: false on their assistant turns)")
    parser.add_argument("--exclude", default=None,
                        help="jsonl of (training) conversations whose arithmetic calls are not asked again")
    parser.add_argument("--questions", default=None, help="also write the questions, one per line")
    parser.add_argument("--answers", default=None, help="also write the expected call and answer per question")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    task = TASKS[args.task]
    examples = make_examples(rng, args.count, task, arithmetic_calls(args.exclude) if args.exclude else set())
    vocabulary = ECHO_WORDS if args.task == "atlas" else ECHO_WORDS + every_task_word()
    echoes = [make_echo(rng, vocabulary) for _ in range(int(args.count * args.echo))]
    tools = tool_descriptions(task)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    mixed = [e for k in range(max(len(examples), len(echoes))) for e in examples[k:k + 1] + echoes[k:k + 1]]
    out.write_text("".join(json.dumps(conversation(e, tools, not args.no_tool_loss)) + "\n" for e in mixed))
    if args.questions:
        Path(args.questions).write_text("".join(e["question"] + "\n/reset\n" for e in examples))
    if args.answers:
        Path(args.answers).write_text("".join(json.dumps({"call": e["call"]}) + "\n" for e in examples))
    print(f"wrote {len(mixed)} conversations ({len(examples)} with tools) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

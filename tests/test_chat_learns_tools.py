"""A model fine-tuned on conversations learns to use tools, measured through the chat command.

The README's commands, as typed, in a fresh working directory: generate the synthetic tool data,
train experiments/configs/sft_tiny_tools.gin, then chat with held-out questions (another seed)
through `python -m glm_jax.chat --input`. The held-out chat runs with the capitals shuffled
inside the tool, so a right answer to a lookup question can only come from reading the tool's
observation, never from the weights, and no held-out sum is one the training data asked (--exclude).
Slow (about 15 CPU minutes): run with -m slow.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from train_fixtures import REPO, subprocess_env

pytestmark = pytest.mark.slow


def tool_chats():
    spec = importlib.util.spec_from_file_location("tool_chats", REPO / "experiments" / "tool_chats.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tool_chats"] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run(command: list[str], cwd, timeout: int) -> str:
    # Without the test-only compile flags: what is measured is the model a user's run would train.
    result = subprocess.run(command, cwd=cwd, env=subprocess_env(1, fast_compile=False), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def write_shuffled_tools(directory, atlas) -> None:
    """experiments/tools/atlas.py with every country given another one's capital (same descriptions)."""
    countries = sorted(atlas.CAPITALS)
    moved = {c: atlas.CAPITALS[countries[(i + 7) % len(countries)]] for i, c in enumerate(countries)}
    source = (REPO / "experiments" / "tools" / "atlas.py").read_text()
    start, end = source.index("CAPITALS = {"), source.index("}\n", source.index("CAPITALS = {")) + 2
    (directory / "atlas_shuffled.py").write_text(source[:start] + f"CAPITALS = {moved!r}\n" + source[end:])


def held_out_scores(directory, module, run_dirs: list[str]) -> dict:
    """Each run's exact calls and answers on 100 held-out questions (seed 1, no training sum), asked through
    `python -m glm_jax.chat --input` with the capitals shuffled inside the tool."""
    python = sys.executable
    run([python, str(REPO / "experiments" / "tool_chats.py"), "--out", "held_out.jsonl", "--count", "100",
         "--seed", "1", "--questions", "held_out.txt", "--answers", "answers.jsonl", "--exclude", "data/tool_chats.jsonl"],
        directory, 120)
    write_shuffled_tools(directory, module.atlas)
    expected = [json.loads(line) for line in (directory / "answers.jsonl").read_text().splitlines()]
    tools = module.load_module(directory / "atlas_shuffled.py")
    scores = {}
    for run_dir in run_dirs:
        transcript = run([python, "-m", "glm_jax.chat", "--run_dir", run_dir, "--tools", "atlas_shuffled.py",
                          "--input", "held_out.txt", "--max_new_tokens", "32"], directory, 900)
        scores[run_dir] = module.score(transcript, expected, tools)
    return scores


def test_sft_learns_exact_tool_calls_and_answers_from_observations(tmp_path):
    module = tool_chats()
    python = sys.executable
    run([python, str(REPO / "experiments" / "tool_chats.py"), "--out", "data/tool_chats.jsonl", "--count", "10000"],
        tmp_path, 120)
    run([python, "-m", "glm_jax", "train", "--gin_file", str(REPO / "experiments" / "configs" / "sft_tiny_tools.gin")],
        tmp_path, 3000)
    scores = held_out_scores(tmp_path, module, ["runs/sft_tiny_tools"])["runs/sft_tiny_tools"]
    print(f"\nheld-out tool use after SFT: {scores}")
    assert scores["questions"] == 100
    assert scores["exact_calls"] >= 0.9 and scores["exact_answers"] >= 0.9, scores


def test_lora_on_query_and_value_teaches_a_chat_model_new_tools(tmp_path):
    """LoRA rank 8 on the query and value projections of a frozen chat model trained with other tools
    (experiments/configs/sft_tiny_ledger.gin, on 10,000 ledger conversations) learns atlas.py's tools:
    the base alone makes no right call, the adapted model reaches >= 90% exact calls and exact answers
    on the held-out questions, as full fine-tuning does. About 20 CPU minutes."""
    module = tool_chats()
    python = sys.executable
    script = str(REPO / "experiments" / "tool_chats.py")
    configs = REPO / "experiments" / "configs"
    run([python, script, "--task", "ledger", "--out", "data/ledger_chats.jsonl", "--count", "10000"], tmp_path, 120)
    run([python, script, "--out", "data/tool_chats.jsonl", "--count", "10000"], tmp_path, 120)
    run([python, "-m", "glm_jax", "train", "--gin_file", str(configs / "sft_tiny_ledger.gin")], tmp_path, 2400)
    run([python, "-m", "glm_jax", "train", "--gin_file", str(configs / "sft_tiny_tools_lora.gin")], tmp_path, 3000)
    scores = held_out_scores(tmp_path, module, ["runs/sft_tiny_ledger", "runs/sft_tiny_tools_lora"])
    print(f"\nheld-out tool use, base and LoRA: {scores}")
    assert scores["runs/sft_tiny_ledger"]["exact_calls"] <= 0.05
    lora = scores["runs/sft_tiny_tools_lora"]
    assert lora["exact_calls"] >= 0.9 and lora["exact_answers"] >= 0.9, lora

"""Fine-tuning a run on conversations (train.init_from + a 'chat:' source) and chatting with the result
through the command line, as a user types it: relative paths, from a fresh working directory."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from glm_jax.data.tokenizer import load_tokenizer_file
from glm_jax.run_dir import load_run
from hf_fixtures import write_chatglm_tokenizer
from train_fixtures import TINY_BINDINGS, shared_run, subprocess_env, train_in_process

TOOLS = "def add(a: int, b: int) -> int:\n    '''Adds two whole numbers.'''\n    return a + b\n"


def tool_conversation(k: int) -> dict:
    a, b = k % 7, k % 5
    return {"tools": [{"name": "add", "description": "Adds two whole numbers.", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}],
        "conversations": [{"role": "user", "content": f"alpha {a} beta {b}?"},
                          {"role": "assistant", "tool_call": {"name": "add", "arguments": {"a": a, "b": b}}},
                          {"role": "observation", "content": str(a + b)},
                          {"role": "assistant", "content": f"gamma {a + b}."}]}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny text run fine-tuned for one step, learning rate 1e-30 (no change in float32), on tool conversations: (base, sft) dirs."""
    base = shared_run(tmp_path_factory, "text_tiny", steps=2) / "run"
    work = tmp_path_factory.mktemp("sft")
    (work / "chats.jsonl").write_text("".join(json.dumps(tool_conversation(k)) + "\n" for k in range(100)))
    summary = train_in_process(TINY_BINDINGS + [
        f"DataConfig.source = 'chat:{work}/chats.jsonl'", "DataConfig.seq_len = 128", "DataConfig.num_shards = 1", "DataConfig.eval_fraction = 0.2",
        f"DataConfig.cache_dir = '{work / 'cache'}'", f"train.init_from = '{base}'", f"RUN_DIR = '{work / 'sft'}'",
        "STEPS = 1", "OptimizerConfig.learning_rate = 1e-30", "OptimizerConfig.weight_decay = 0.0"])
    assert np.isfinite(summary["final_train_loss"])
    return base, work / "sft"


def test_fine_tuning_starts_from_the_base_runs_parameters_and_tokenizer(sft_run):
    base_dir, sft_dir = sft_run
    base, sft = load_run(base_dir), load_run(sft_dir)
    # one step at learning rate 1e-30 leaves the base parameters bit for bit
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: np.array_equal(x, y), base.params, sft.params))
    # the run's tokenizer is the base's with the role tokens in its reserved pieces (ids unchanged)
    text = "alpha beta gamma."
    assert sft.tokenizer.encode(text).tolist() == base.tokenizer.encode(text).tolist()
    assert sft.tokenizer.special_id("<|assistant|>") is not None and base.tokenizer.special_id("<|assistant|>") is None
    assert sft.tokenizer.vocab_size == base.tokenizer.vocab_size


def test_chat_command_streams_replies_runs_tools_and_resets(sft_run, tmp_path):
    _, sft_dir = sft_run
    (tmp_path / "runs").symlink_to(sft_dir.parent)
    (tmp_path / "my_tools.py").write_text(TOOLS)
    (tmp_path / "questions.txt").write_text("alpha 1 beta 2?\n/reset\nalpha 3 beta 4?\n/exit\nnever read\n")
    # The tools' system prompt (GLM-4's Chinese preamble, byte pieces in this tiny tokenizer) outgrows the
    # tiny model's 128 positions: that turn is refused with a message, and the chat goes on.
    result = subprocess.run([sys.executable, "-m", "glm_jax.chat", "--run_dir", f"runs/{sft_dir.name}", "--tools",
                             "my_tools.py", "--input", "questions.txt", "--max_new_tokens", "6"],
                            cwd=tmp_path, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "glm4 format, tools: add; /reset, /exit" in result.stderr
    assert "Traceback" not in result.stderr and "libtpu" not in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "user> alpha 1 beta 2?" and lines[1].startswith("assistant> (not answered: prompt bucket")
    result = subprocess.run([sys.executable, "-m", "glm_jax.chat", "--run_dir", f"runs/{sft_dir.name}",
                             "--input", "questions.txt", "--max_new_tokens", "6"],
                            cwd=tmp_path, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "user> alpha 1 beta 2?" and lines[1].startswith("assistant> ")
    assert "(conversation reset)" in lines and "user> alpha 3 beta 4?" in lines
    assert "never read" not in result.stdout


@pytest.mark.parametrize("arguments, words", [
    (["--run_dir", "runs/none"], "runs/none/config.gin does not exist"),
    (["--run_dir", "RUN", "--tools", "missing_tools.py"], "tool module missing_tools.py does not exist"),
    (["--run_dir", "RUN", "--format", "chatglm9"], "invalid choice: 'chatglm9'"),
])
def test_chat_command_errors_are_messages(sft_run, tmp_path, arguments, words):
    _, sft_dir = sft_run
    arguments = [str(sft_dir) if a == "RUN" else a for a in arguments]
    result = subprocess.run([sys.executable, "-m", "glm_jax", "chat", *arguments], cwd=tmp_path,
                            env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


def test_a_chat_run_whose_model_has_no_room_for_role_tokens_is_refused(tmp_path):
    write_chatglm_tokenizer(tmp_path / "chatglm2", roles=False)  # specials end at n + 5, no role tokens
    n = load_tokenizer_file(tmp_path / "chatglm2" / "tokenizer.model").vocab_size
    (tmp_path / "chats.jsonl").write_text(json.dumps(tool_conversation(1)) + "\n")
    bindings = [b for b in TINY_BINDINGS if not b.startswith("ModelConfig.vocab_size")] + [
        f"ModelConfig.vocab_size = {n}", f"DataConfig.source = 'chat:{tmp_path}/chats.jsonl'",
        f"DataConfig.tokenizer_path = '{tmp_path / 'chatglm2' / 'tokenizer.model'}'",
        f"RUN_DIR = '{tmp_path / 'sft'}'", "STEPS = 1", "DataConfig.num_shards = 1"]
    with pytest.raises(ValueError, match=f"the tokenizer has {n + 4} ids, but .* ModelConfig.vocab_size = {n} rows"):
        train_in_process(bindings)

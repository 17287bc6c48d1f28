"""Talking to a model: the decoder's extra stop tokens and streaming, the chat session's tool loop
(with a scripted generator, so every branch is exercised exactly), tools from a file."""

from __future__ import annotations

import numpy as np
import pytest

from glm_jax.chat.session import ChatSession
from glm_jax.chat.tools import ToolBox, describe, load_tools
from glm_jax.data import chat_format as cf
from glm_jax.infer import prompts as prompt_lib
from glm_jax.infer.generate import Generator
from glm_jax.infer.sampling import SamplingConfig
from test_chat_format import glm4  # noqa: F401 (fixture)
from test_generate import CAUSAL_PROMPTS, SPECIALS, make_generator, tiny_config


# ------------------------------------------------------------------ the decoder
def test_stop_ids_end_a_causal_row_and_stream_sees_every_token_in_order():
    generator = make_generator(tiny_config())
    batch = prompt_lib.make_prompt_batch(CAUSAL_PROMPTS, SPECIALS, "causal", 8)
    free = generator.generate(batch, "causal", 12, ignore_stop=True)
    seen = []
    streamed = generator.generate(batch, "causal", 12, ignore_stop=True,
                                  stream=lambda step, tokens, live: seen.append((step, tokens.tolist(), live.tolist())))
    assert np.array_equal(streamed["tokens"], free["tokens"])  # the callback changes nothing
    assert [s for s, _, _ in seen] == list(range(12))
    assert np.array_equal(np.asarray([t for _, t, _ in seen]).T, free["tokens"])
    stop = int(free["tokens"][0, 3])  # a token row 0 produces at step 3 (and maybe before)
    stopped = generator.generate(batch, "causal", 12, stop_ids=(stop,))
    first = int(np.flatnonzero(free["tokens"][0] == stop)[0])
    assert stopped["num_tokens"][0] == first + 1 and np.array_equal(stopped["tokens"][0, :first + 1],
                                                                    free["tokens"][0, :first + 1])


def test_token_limit_keeps_ids_the_tokenizer_lacks_out_of_every_sample():
    """A model's embedding table may be padded past its tokenizer (THUDM's are): never sample those ids."""
    config = tiny_config()
    batch = prompt_lib.make_prompt_batch(CAUSAL_PROMPTS, SPECIALS, "causal", 8)
    hot = SamplingConfig(temperature=5.0)
    free = make_generator(config).generate(batch, "causal", 24, hot, seed=3, ignore_stop=True)["tokens"]
    assert (free >= 10).any()  # without the limit a flat model does produce them
    limited = Generator(config, make_generator(config).params, SPECIALS, token_limit=10)
    assert (limited.generate(batch, "causal", 24, hot, seed=3, ignore_stop=True)["tokens"] < 10).all()


# ------------------------------------------------------------------ the session, scripted
class ScriptedGenerator:
    """Stands in for Generator: returns the next scripted reply (text after <|assistant|>), streamed
    token by token and ended by the format's stop token, and records the prompts it was given."""

    def __init__(self, tokenizer, replies: list[str]):
        self.tokenizer, self.replies, self.prompts = tokenizer, list(replies), []

    def generate(self, batch, mode, max_new_tokens, sampling, seed, stop_ids=(), stream=None):
        assert mode == "causal"
        n = int(batch["lengths"][0])
        self.prompts.append((batch["tokens"][0, :n].copy(), batch["prefix_mask"][0, :n].copy()))
        ids = [*self.tokenizer.encode_plain(self.replies.pop(0)), stop_ids[1]]  # ends at <|user|>
        if stream:
            for step, token in enumerate(ids):
                stream(step, np.asarray([token]), np.asarray([True]))
        return {"tokens": np.asarray([ids + [0] * (max_new_tokens - len(ids))]), "num_tokens": np.asarray([len(ids)])}


def add(a: int, b: int) -> int:
    """Adds two whole numbers.

    (More detail the model does not need.)"""
    return a + b


def divide(a: float, b: float) -> float:
    return a / b


def test_a_tool_call_runs_and_its_result_is_the_observation_the_model_answers_from(glm4):  # noqa: F811
    generator = ScriptedGenerator(glm4, ['add\n{"a": 2, "b": 3}', "\nIt is 5."])
    session = ChatSession(generator, glm4, "glm4", tools=ToolBox([add, divide]), system="Be brief.")
    streamed, tools_seen = [], []
    turn = session.send("What is 2 plus 3?", on_text=streamed.append, on_tool=tools_seen.append)
    assert turn.reply == "It is 5." and "".join(streamed) == "It is 5."  # the call itself is not streamed
    assert turn.tool_calls == tools_seen == [{"name": "add", "arguments": {"a": 2, "b": 3}, "result": "5", "ok": True}]
    assert [(m.role, m.content) for m in session.history][-3:] == [("assistant", ""), ("observation", "5"),
                                                                   ("assistant", "It is 5.")]
    # the second prompt, as text: the tools' system message, the system prompt, the question, the call,
    # its observation and <|assistant|> (GLM-4's template, written out by hand)
    prompt = glm4.decode(generator.prompts[1][0])
    assert prompt.startswith("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。")
    assert '\n\n## add\n\n{\n    "name": "add",\n    "description": "Adds two whole numbers.",' in prompt
    assert prompt.endswith("<|system|>\nBe brief.<|user|>\nWhat is 2 plus 3?<|assistant|>add\n"
                           '{"a": 2, "b": 3}<|observation|>\n5<|assistant|>')
    assert not generator.prompts[1][1].any()  # causal prompt
    assert describe(add) == {"name": "add", "description": "Adds two whole numbers.", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}


def test_bad_calls_become_error_observations_and_the_chat_goes_on(glm4):  # noqa: F811
    generator = ScriptedGenerator(glm4, ["add\n{oops", 'multiply\n{"a": 1}', 'add\n{"a": 1}',
                                         'divide\n{"a": 1, "b": 0}', "\nI cannot."])
    session = ChatSession(generator, glm4, "glm4", tools=ToolBox([add, divide]))
    turn = session.send("Compute.")
    assert turn.reply == "I cannot."
    observations = [m.content for m in session.history if m.role == "observation"]
    assert observations[0].startswith("error: the tool call arguments are not JSON")
    assert observations[1] == "error: there is no tool named 'multiply'; the tools are ['add', 'divide']"
    assert observations[2].startswith("error: add cannot take these arguments (missing a required argument: 'b')")
    assert observations[3] == "error: divide raised ZeroDivisionError: division by zero"
    assert [c.get("ok") for c in turn.tool_calls] == [None, False, False, False]
    cf.check_order(session.conversation)  # the history is still a valid conversation


def test_tool_rounds_are_bounded_and_reset_forgets(glm4):  # noqa: F811
    generator = ScriptedGenerator(glm4, ['add\n{"a": 1, "b": 1}'] * 3 + ["\nhello"])
    session = ChatSession(generator, glm4, "glm4", tools=ToolBox([add]), max_tool_rounds=2, system="S")
    turn = session.send("loop")
    assert turn.reply == "" and len(turn.tool_calls) == 3
    session.reset()
    assert [m.role for m in session.history] == ["system"]
    assert session.send("hi").reply == "hello"


def test_prefix_sessions_mark_the_first_turn_as_the_prompt_prefix(glm4):  # noqa: F811
    generator = ScriptedGenerator(glm4, ["\nA1", "\nA2"])
    session = ChatSession(generator, glm4, "glm4", prompt_attention="prefix")
    session.send("Q1")
    session.send("Q2")
    (first, first_prefix), (second, second_prefix) = generator.prompts
    assert first_prefix.all()  # no reply yet: the whole prompt, its <|assistant|> included
    reply_start = int(np.flatnonzero(second == glm4.special_id("<|assistant|>"))[0])
    assert np.array_equal(np.flatnonzero(second_prefix), np.arange(reply_start + 1))  # as in training


def test_tools_load_from_a_file_and_a_file_without_tools_is_an_error(tmp_path):
    (tmp_path / "mine.py").write_text("import json\n\ndef shout(text: str) -> str:\n    '''Upper case.'''\n"
                                      "    return text.upper()\n\ndef _helper():\n    pass\n")
    box = load_tools(tmp_path / "mine.py")
    assert list(box.functions) == ["shout"] and box.call("shout", {"text": "hi"}).text == "HI"
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(ValueError, match="offers no tools"):
        load_tools(tmp_path / "empty.py")
    with pytest.raises(FileNotFoundError, match="tool module .*nothere.py does not exist"):
        load_tools(tmp_path / "nothere.py")


def test_sampling_seed_changes_per_reply(glm4):  # noqa: F811
    seeds = []

    class Recorder(ScriptedGenerator):
        def generate(self, batch, mode, max_new_tokens, sampling, seed, stop_ids=(), stream=None):
            seeds.append(seed)
            return super().generate(batch, mode, max_new_tokens, sampling, seed, stop_ids, stream)

    session = ChatSession(Recorder(glm4, ["\na", "\nb"]), glm4, "glm4", sampling=SamplingConfig(1.0), seed=7)
    session.send("x")
    session.send("y")
    assert seeds == [7, 8]

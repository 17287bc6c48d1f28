"""A conversation with a run: history, the prompt for each reply, streamed text, the tool loop.

    session = ChatSession(generator, tokenizer, "glm4", tools=load_tools("my_tools.py"))
    turn = session.send("What is 17 plus 25?", on_text=print_piece)

Every reply re-reads the whole history (one prefill) and decodes with the run's
compiled KV-cache loop: prompts are padded to a multiple of `length_bucket`, so
turns whose history fits the same bucket reuse one compiled program. A reply whose
first line names a tool is a call: it is parsed (ChatFormat.parse_reply), run by
the ToolBox, and its result goes back as an <|observation|>, after which the model
answers; a call that does not parse goes back as an error observation instead.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from glm_jax.chat.tools import ToolBox
from glm_jax.data.chat_format import (Conversation, Message, ToolCallError, chat_format, encode_conversation,
                                      prompt_prefix_length, stop_ids)
from glm_jax.infer.prompts import make_prompt_batch
from glm_jax.infer.sampling import SamplingConfig


@dataclasses.dataclass
class Turn:
    """What one user message led to: the final reply and the tool calls made on the way
    ({'name', 'arguments', 'result', 'ok'}; a call that did not parse has 'error' instead)."""

    reply: str
    tool_calls: list[dict]


class ChatSession:
    def __init__(self, generator, tokenizer, format_name: str = "glm4", *, system: str | None = None,
                 tools: ToolBox | None = None, prompt_attention: str = "causal", max_new_tokens: int = 256,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0, length_bucket: int = 64,
                 max_tool_rounds: int = 4):
        self.generator, self.tokenizer = generator, tokenizer
        self.format = chat_format(format_name)
        self.system, self.tools = system, tools
        self.prompt_attention = prompt_attention
        self.max_new_tokens, self.sampling, self.seed = max_new_tokens, sampling, seed
        self.length_bucket, self.max_tool_rounds = length_bucket, max_tool_rounds
        self.stops = stop_ids(tokenizer)
        self.replies = 0  # generations so far: each one samples with its own seed
        self.reset()

    def reset(self) -> None:
        """Forgets the conversation (the system prompt and tools stay)."""
        self.history: list[Message] = [Message("system", self.system)] if self.system else []

    @property
    def conversation(self) -> Conversation:
        return Conversation(tuple(self.history), self.tools.descriptions if self.tools else ())

    def send(self, text: str, on_text: Callable[[str], None] | None = None,
             on_tool: Callable[[dict], None] | None = None) -> Turn:
        """Adds a user message and runs the model until it answers in text (or max_tool_rounds calls).

        on_text receives the reply's text as it is generated; on_tool each tool call with its result.
        If generation fails (e.g. the history outgrew the model's positions) the history is left as
        it was before this message, and the error is raised.
        """
        before = len(self.history)
        try:
            return self._send(text, on_text, on_tool)
        except Exception:
            del self.history[before:]
            raise

    def _send(self, text: str, on_text, on_tool) -> Turn:
        self.history.append(Message("user", text))
        calls = []
        for _ in range(self.max_tool_rounds + 1):
            raw = self._generate(on_text)
            try:
                content, call = self.format.parse_reply(raw)
            except ToolCallError as error:  # tell the model, as its observation; the chat goes on
                name, _, body = raw.partition("\n")
                self.history += [Message("assistant", body, metadata=name.strip()),
                                 Message("observation", f"error: {error}")]
                calls.append({"name": name.strip(), "error": str(error)})
                _notify(on_tool, calls[-1])
                continue
            if call is None:
                self.history.append(Message("assistant", content))
                return Turn(content, calls)
            result = self.tools.call(call["name"], call["arguments"]) if self.tools else None
            observation = result.text if result else "error: no tools are available in this chat"
            self.history += [Message("assistant", tool_call=call), Message("observation", observation)]
            calls.append({**call, "result": observation, "ok": bool(result and result.ok)})
            _notify(on_tool, calls[-1])
        return Turn("", calls)  # the model kept calling tools; the history shows what it did

    # ------------------------------------------------------------------ internals
    def prompt_batch(self) -> dict:
        """The decoder's input for the next reply: the history + <|assistant|>, padded to the bucket."""
        ids, trained = encode_conversation(self.format, self.conversation, self.tokenizer, add_generation_prompt=True)
        batch = make_prompt_batch([ids], self.tokenizer.specials, "causal", self.length_bucket)
        if self.prompt_attention == "prefix":  # as the run was fine-tuned: the first turn is a GLM prefix
            batch["prefix_mask"][0, :prompt_prefix_length(trained)] = True
        return batch

    def _generate(self, on_text) -> str:
        stream = _ReplyStream(self.tokenizer, self.stops, on_text)
        out = self.generator.generate(self.prompt_batch(), "causal", self.max_new_tokens, self.sampling,
                                      self.seed + self.replies, stop_ids=self.stops, stream=stream)
        self.replies += 1
        ids = [int(i) for i in out["tokens"][0, :out["num_tokens"][0]] if int(i) not in self.stops]
        return self.tokenizer.decode(ids)


def _notify(callback, value) -> None:
    if callback is not None:
        callback(value)


class _ReplyStream:
    """Turns the decode loop's tokens into text for on_text: a plain reply is streamed as it grows;
    the metadata line (empty for a reply) and a tool call's body are held back."""

    def __init__(self, tokenizer, stops: tuple[int, ...], on_text):
        self.tokenizer, self.stops, self.on_text = tokenizer, stops, on_text
        self.ids: list[int] = []
        self.ended = self.started = False
        self.shown = None  # characters of the decoded text already passed on (None: metadata line not complete)

    def __call__(self, step: int, tokens: np.ndarray, live: np.ndarray) -> None:
        if self.on_text is None or self.ended or not live[0]:
            return
        if int(tokens[0]) in self.stops:
            self.ended = True
            return
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids)
        if self.shown is None:
            metadata, newline, _ = text.partition("\n")
            if not newline:
                return
            self.shown = len(metadata) + 1 if not metadata.strip() else -1  # -1: a tool call, not shown
        if self.shown >= 0 and not text.endswith("\ufffd"):  # hold back a character still being decoded
            piece = text[self.shown:] if self.started else text[self.shown:].lstrip()  # as parse_reply strips
            self.started = self.started or bool(piece)
            if piece:
                self.on_text(piece)
            self.shown = len(text)

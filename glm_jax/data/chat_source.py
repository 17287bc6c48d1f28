"""Supervised fine-tuning data: 'chat:GLOB' jsonl files of conversations -> packed training rows.

One conversation per line (glm_jax.data.chat_format.parse_conversation: ChatGLM3's
fine-tuning files work as they are). Each becomes one example in the model's chat
format: loss on the assistant messages and the token after each (docs/chat.md),
causal or with the prompt as a GLM prefix (DataConfig.chat_prompt_attention).
Conversations are packed several per row with the same segment isolation as
pre-training (segment ids, positions restarting at 0), shuffled and sharded by
glm_jax.data.packed_rows, and split train / eval by a stable hash of file:line.
A conversation longer than a row is cut at DataConfig.seq_len (THUDM's scripts
truncate the same way) and counted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


from glm_jax.data.chat_format import (CHAT_FORMATS, ROLE_TOKENS, Conversation, ConversationError, chat_format,
                                      parse_conversation, training_example)
from glm_jax.data.corpus import SKIP_HINT, SPLIT_HINT, content_id, in_eval_split, source_files
from glm_jax.data.packed_rows import PackedRows

KIND = "chat"


def is_chat_source(source: str) -> bool:
    return source.partition(":")[0] == KIND


def read_conversations(source: str, split: str, eval_fraction: float,
                       skip_bad_input: bool = False) -> list[Conversation]:
    """The conversations of one split ('train' | 'eval'), in file and line order.

    A line that is not JSON or not a valid conversation raises ValueError naming the file
    and line, unless skip_bad_input (then it is skipped and counted on stderr).
    """
    conversations, skipped = [], []
    for path in source_files(source):
        for number, line in enumerate(_lines(path), start=1):
            if not line.strip() or in_eval_split(content_id(line), eval_fraction) != (split == "eval"):
                continue
            try:
                conversation = parse_conversation(_json(line, f"{path}:{number}"), where=f"{path}:{number}",
                                                  needs_reply=True)
            except ConversationError as error:
                if not skip_bad_input:
                    raise ValueError(f"{error}; fix the line, {SKIP_HINT}") from None
                skipped.append(str(error))
                continue
            conversations.append(conversation)
    if skipped:
        print(f"data source {source!r}: skipped {len(skipped)} malformed conversations "
              f"(DataConfig.skip_bad_input), e.g.: {skipped[0]}", file=sys.stderr)
    return conversations


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); convert it to UTF-8") from None


def _json(line: str, where: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise ConversationError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None


def conversation_text(record: str) -> str:
    """The words of one jsonl line, for training a tokenizer on: its messages and calls as every
    format writes them (the tool prompts included, so their fixed text gets pieces of its own)."""
    try:
        conversation = parse_conversation(json.loads(record))
    except (json.JSONDecodeError, ConversationError):
        return ""
    texts = [fmt.render(conversation) for fmt in CHAT_FORMATS.values()]
    for special in ("[gMASK]<sop>", *ROLE_TOKENS.values()):  # ids of their own, never text
        texts = [text.replace(special, "\n") for text in texts]
    return "\n".join(texts)


class ChatDataset(PackedRows):
    """The packed rows of one split's conversations, for one data shard."""

    def __init__(self, config, tokenizer, examples: list[dict], shard_index: int = 0, shard_count: int = 1):
        super().__init__(config, tokenizer.specials.pad, shard_index, shard_count)
        self.encoded = examples
        if len(examples) < shard_count:
            raise ValueError(f"the {config.source!r} chat source has {len(examples)} conversations in this split, "
                             f"fewer than its {shard_count} data shards; add conversations or lower "
                             "DataConfig.num_shards / eval_fraction")

    @property
    def num_items(self) -> int:
        return len(self.encoded)

    def examples(self, epoch: int, item: int) -> list[dict]:
        return [self.encoded[item]]

    def no_examples_message(self) -> str:
        return f"the {self.config.source!r} chat source has no conversation in this split"


def encode_examples(config, tokenizer, conversations: list[Conversation]) -> tuple[list[dict], int]:
    """(training examples cut to seq_len, how many were cut)."""
    fmt = chat_format(config.chat_format)
    examples, cut = [], 0
    for conversation in conversations:
        example = training_example(fmt, conversation, tokenizer, config.chat_prompt_attention)
        if len(example["tokens"]) > config.seq_len:
            example = _truncated(example, config.seq_len)
            cut += 1
        examples.append(example)
    return examples, cut


def _truncated(example: dict, length: int) -> dict:
    return {"tokens": example["tokens"][:length], "targets": example["targets"][:length],
            "loss_mask": example["loss_mask"][:length], "positions": example["positions"][:, :length],
            "sep": min(example["sep"], length)}


def make_chat_datasets(config, tokenizer, split: str, shard_ids: range, shard_count: int) -> list[ChatDataset]:
    """This process's shards of one split (the conversations are read and encoded once)."""
    conversations = read_conversations(config.source, split, config.eval_fraction, config.skip_bad_input)
    if not conversations:
        raise ValueError(f"the {split} split of {config.source!r} has no conversations; {SPLIT_HINT}, so add "
                         f"distinct lines or {'raise' if split == 'eval' else 'lower'} DataConfig.eval_fraction")
    examples, cut = encode_examples(config, tokenizer, conversations)
    if cut:
        print(f"data source {config.source!r}: {cut} of {len(examples)} {split} conversations are longer than "
              f"DataConfig.seq_len = {config.seq_len} and were cut to it", file=sys.stderr)
    return [ChatDataset(config, tokenizer, examples, s, shard_count) for s in shard_ids]


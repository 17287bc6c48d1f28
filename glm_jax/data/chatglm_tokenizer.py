"""ChatGLM2 / ChatGLM3's tokenizer: a SentencePiece model with the GLM specials stacked above it.

THUDM's tokenization_chatglm.py (ChatGLM2-6B, ChatGLM3-6B) loads `tokenizer.model`
and then numbers its specials from the SentencePiece vocabulary size upwards:
[MASK] [gMASK] [sMASK] sop eop (ChatGLM2), followed by <|system|> <|user|>
<|assistant|> <|observation|> (ChatGLM3). The end of text is SentencePiece's </s>,
padding its <unk>, and every prompt starts with [gMASK] sop. The SentencePiece
model itself knows none of the specials, so they are recognised here: a special
written literally in a text ("def f(): [MASK]") encodes to its id, the rest of the
text goes through SentencePiece unchanged, as THUDM's `encode_special_tokens` does.

The ids come from the checkpoint: tokenizer_config.json's `added_tokens_decoder`
when it lists them (newer THUDM uploads, and every run directory glm_jax writes),
else THUDM's order above, with the role tokens when the checkpoint's own tokenizer
code or config names them (ChatGLM3) and without them otherwise (ChatGLM2).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

from glm_jax.data.tokenizer import (SpecialTokens, listed_specials, read_tokenizer_config,
                                    sentencepiece_sentence_ends)

TOKENIZER_CLASS = "ChatGLMTokenizer"
GLM_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLE_SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
# Files of a THUDM checkpoint that may name the role tokens (read as text, never run).
ROLE_EVIDENCE_FILES = ("tokenization_chatglm.py", "tokenizer_config.json", "special_tokens_map.json")


class ChatGLMTokenizer:
    """tokenizer.model (SentencePiece) + the specials above its vocabulary."""

    def __init__(self, model_proto: bytes, added: dict[str, int], settings: dict, source: str = "<bytes>"):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.added = dict(sorted(added.items(), key=lambda item: item[1]))
        self.settings = settings
        self._check_added(source)
        self.id_to_added = {i: text for text, i in self.added.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)) + ")")
        self.specials = SpecialTokens(
            pad=self.sp.unk_id(), eos=self.sp.eos_id(), cls=None, mask=self.added.get("[MASK]"),
            smask=self.added.get("[sMASK]"), gmask=self.added["[gMASK]"], sop=self.added["sop"],
            eop=self.added["eop"], dblock=None)
        self.sentence_end = np.concatenate([sentencepiece_sentence_ends(self.sp), np.zeros(len(self.added), bool)])
        self.sentence_end[list(self.specials.all_ids)] = False

    def _check_added(self, source: str) -> None:
        missing = [t for t in ("[gMASK]", "sop", "eop") if t not in self.added]
        if missing:
            raise ValueError(f"ChatGLM tokenizer {source} lacks the special tokens {missing} that GLM generation "
                             "and training need; its tokenizer_config.json's added_tokens_decoder does not list them")
        if self.sp.eos_id() < 0:
            raise ValueError(f"ChatGLM tokenizer {source}: the SentencePiece model has no </s> (eos) piece")
        expected = list(range(self.sp.get_piece_size(), self.sp.get_piece_size() + len(self.added)))
        if list(self.added.values()) != expected:
            raise ValueError(f"ChatGLM tokenizer {source}: the specials {list(self.added)} have ids "
                             f"{list(self.added.values())}, but they must follow the SentencePiece vocabulary "
                             f"({self.sp.get_piece_size()} pieces) without gaps: ids {expected}")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def load(cls, path: str | Path) -> "ChatGLMTokenizer":
        """tokenizer.model with its sibling tokenizer_config.json (and, for the ids, tokenization_chatglm.py)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} does not exist")
        settings = read_tokenizer_config(path.parent)
        proto = path.read_bytes()
        size = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
        added = listed_specials(settings, size) or _thudm_specials(path.parent, size)
        return cls(proto, added, settings, source=str(path))

    def save_into(self, directory: str | Path) -> None:
        """Writes tokenizer.model and a tokenizer_config.json that lists the specials with their ids."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        settings = {**self.settings, "tokenizer_class": TOKENIZER_CLASS,
                    "added_tokens_decoder": {str(i): {"content": text, "special": True}
                                             for text, i in self.added.items()}}
        for name, data in (("tokenizer.model", self.model_proto),
                           ("tokenizer_config.json", json.dumps(settings, indent=2, ensure_ascii=False).encode())):
            tmp = directory / f"{name}.tmp"
            tmp.write_bytes(data)
            shutil.move(tmp, directory / name)  # atomic: a crash never leaves a half-written file

    @property
    def fingerprint(self) -> bytes:
        """Bytes that change whenever tokenisation could (the tokenised-corpus cache key)."""
        return hashlib.sha256(self.model_proto + json.dumps(self.added).encode()).digest()

    # ------------------------------------------------------------- encoding
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + len(self.added)

    @property
    def prefix(self) -> tuple[int, ...]:
        """[gMASK] sop, THUDM's get_prefix_tokens."""
        return (self.specials.gmask, self.specials.sop)

    def encode(self, text: str) -> np.ndarray:
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self.added:
                ids.append(self.added[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return np.asarray(ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """SentencePiece decodes each run of ordinary ids; a special becomes its text."""
        text, run = [], []
        for i in (int(i) for i in ids):
            if i in self.id_to_added:
                text.append(self.sp.decode(run))
                text.append(self.id_to_added[i])
                run = []
            else:
                run.append(i)
        text.append(self.sp.decode(run))
        return "".join(text)

    def id_to_piece(self, i: int) -> str:
        return self.id_to_added.get(int(i)) or self.sp.id_to_piece(int(i))

    def encode_plain(self, text: str) -> np.ndarray:
        """Text as ordinary text (a special written in it is not its id): THUDM's chat messages."""
        return np.asarray(self.sp.encode(text), np.int32)

    def special_id(self, text: str) -> int | None:
        return self.added.get(text)

    def with_specials(self, texts: Iterable[str]) -> "ChatGLMTokenizer":
        """This tokenizer with the missing `texts` added after its last special (ChatGLM2 -> ChatGLM3's roles)."""
        added = dict(self.added)
        for text in texts:
            added.setdefault(text, self.sp.get_piece_size() + len(added))
        return self if added == self.added else ChatGLMTokenizer(self.model_proto, added, self.settings)


def is_chatglm_tokenizer(directory: Path) -> bool:
    """Does this directory's tokenizer_config.json name THUDM's ChatGLM2/3 tokenizer class?"""
    return read_tokenizer_config(directory).get("tokenizer_class") == TOKENIZER_CLASS


def _thudm_specials(directory: Path, sentencepiece_size: int) -> dict[str, int]:
    """THUDM's numbering: GLM specials, then the role tokens if the checkpoint's files name them (ChatGLM3)."""
    evidence = " ".join((directory / name).read_text(errors="replace")
                        for name in ROLE_EVIDENCE_FILES if (directory / name).is_file())
    names = GLM_SPECIALS + (ROLE_SPECIALS if "<|observation|>" in evidence else ())
    return {text: sentencepiece_size + k for k, text in enumerate(names)}

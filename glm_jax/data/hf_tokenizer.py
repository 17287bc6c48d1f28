"""A Hugging Face `tokenizer.json` (GLM-4's byte-level BPE) behind glm_jax's tokenizer interface.

Imported checkpoints keep their own tokenizer: the files are copied into the run
directory and read with the `tokenizers` library. Special-token ids come from
the tokenizer's own table (never assumed); [gMASK], <sop>, <eop> and the end of
text are required, [MASK] / [sMASK] / [CLS] / [dBLOCK] are used when present.
Documents and prompts start with [gMASK]<sop> (ChatGLM2 / GLM-4's prefix) when
the vocabulary has no [CLS].
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np
import tokenizers

from glm_jax.data.tokenizer import SENTENCE_END_CHARS, SpecialTokens, read_tokenizer_config

# Files beside tokenizer.json that travel with it unchanged (tokenizer_config.json is re-written
# from the settings read, so a converted tokenizer can carry its own).
EXTRA_FILES = ("special_tokens_map.json",)
REQUIRED = {"gmask": "[gMASK]", "sop": "<sop>", "eop": "<eop>"}
OPTIONAL = {"mask": "[MASK]", "smask": "[sMASK]", "cls": "[CLS]", "dblock": "[dBLOCK]"}
DEFAULT_EOS = "<|endoftext|>"


class HFTokenizer:
    """tokenizer.json (+ tokenizer_config.json for the eos / pad tokens) with the GLM specials."""

    def __init__(self, json_text: str, settings: dict, source: str = "<memory>",
                 extra_files: dict[str, bytes] | None = None):
        self.source = source
        self.json_bytes = json_text.encode("utf-8")
        self.tokenizer = tokenizers.Tokenizer.from_str(json_text)
        self.settings = settings
        self.extra_files = extra_files or {}
        self._plain = None  # the same tokenizer without its added tokens (encode_plain), made on first use
        self.specials = self._specials(settings)
        self.sentence_end = self._sentence_end_table()

    @classmethod
    def load(cls, path: str | Path) -> "HFTokenizer":
        """tokenizer.json with the tokenizer_config.json / special_tokens_map.json beside it."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        extra = {name: (path.parent / name).read_bytes() for name in EXTRA_FILES if (path.parent / name).is_file()}
        return cls(path.read_text(encoding="utf-8"), read_tokenizer_config(path.parent),
                   source=str(path), extra_files=extra)

    def _id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def _specials(self, settings: dict) -> SpecialTokens:
        eos_token = _token_text(settings.get("eos_token")) or DEFAULT_EOS
        pad_token = _token_text(settings.get("pad_token")) or eos_token
        required = {**REQUIRED, "eos": eos_token}
        ids = {name: self._id(token) for name, token in required.items()}
        missing = [token for name, token in required.items() if ids[name] is None]
        if missing:
            raise ValueError(f"tokenizer {self.source} lacks the special tokens {missing} that GLM generation and "
                             "training need ([gMASK], <sop>, <eop> and the end-of-text token named by "
                             "tokenizer_config.json's eos_token); is this a GLM tokenizer?")
        ids.update({name: self._id(token) for name, token in OPTIONAL.items()})
        pad = self._id(pad_token)
        ids["pad"] = ids["eos"] if pad is None else pad
        return SpecialTokens(**ids)

    # ------------------------------------------------------------------ I/O
    def save_into(self, directory: str | Path) -> None:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into a directory (a run)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = {"tokenizer.json": self.json_bytes, **self.extra_files}
        if self.settings:
            files["tokenizer_config.json"] = json.dumps(self.settings, indent=2, ensure_ascii=False).encode()
        for name, data in files.items():
            tmp = directory / f"{name}.tmp"
            tmp.write_bytes(data)
            tmp.replace(directory / name)  # atomic: a crash never leaves a half-written file

    @property
    def fingerprint(self) -> bytes:
        """Bytes that change whenever tokenisation could (the tokenised-corpus cache key)."""
        return hashlib.sha256(self.json_bytes).digest()

    # ------------------------------------------------------------- encoding
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def prefix(self) -> tuple[int, ...]:
        """Tokens every document and prompt starts with: [CLS] if the vocabulary has it, else [gMASK] <sop>."""
        if self.specials.cls is not None:
            return (self.specials.cls,)
        return (self.specials.gmask, self.specials.sop)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.tokenizer.id_to_token(int(i))

    def encode_plain(self, text: str) -> np.ndarray:
        """Text as ordinary text: the added (special) tokens are not matched, as GLM-4's chat messages
        are encoded (tiktoken's disallowed_special=())."""
        if self._plain is None:
            spec = json.loads(self.json_bytes)
            spec["added_tokens"] = []
            self._plain = tokenizers.Tokenizer.from_str(json.dumps(spec))
        return np.asarray(self._plain.encode(text, add_special_tokens=False).ids, np.int32)

    def special_id(self, text: str) -> int | None:
        return self._id(text)

    def with_specials(self, texts: Iterable[str]) -> "HFTokenizer":
        """This tokenizer with the missing `texts` added as special tokens (ids after the last one)."""
        missing = [t for t in texts if self._id(t) is None]
        if not missing:
            return self
        grown = tokenizers.Tokenizer.from_str(self.json_bytes.decode("utf-8"))
        grown.add_special_tokens(missing)
        return HFTokenizer(grown.to_str(), self.settings, self.source, self.extra_files)

    def _sentence_end_table(self) -> np.ndarray:
        """bool[vocab]: does this token's text end a sentence (punctuation or newline)?"""
        table = np.zeros(self.vocab_size, bool)
        texts = self.tokenizer.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
        for i, text in enumerate(texts):
            table[i] = any(c in text for c in SENTENCE_END_CHARS)
        table[list(self.specials.all_ids)] = False
        return table


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {'content': ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value

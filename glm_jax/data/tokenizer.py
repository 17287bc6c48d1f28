"""SentencePiece tokenizer with GLM's special tokens.

The specials are SentencePiece user-defined symbols, so they have stable ids
(1.. in the order of SPECIAL_PIECES; 0 is <unk>), are never split, and are
recognised when they appear literally in a prompt ("return [MASK]"). Models are
trained lossless for source code: identity normalisation, whitespace kept,
byte fallback for any character outside the vocabulary.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

# Name in SpecialTokens -> piece text. Order fixes the ids of trained models.
SPECIAL_PIECES = {
    "pad": "<pad>", "eos": "<eos>", "cls": "[CLS]", "mask": "[MASK]", "smask": "[sMASK]",
    "gmask": "[gMASK]", "sop": "<sop>", "eop": "<eop>", "dblock": "[dBLOCK]",
}
NUM_RESERVED = 8  # room for later specials without changing any existing id
RESERVED_PIECES = tuple(f"<|reserved_{i}|>" for i in range(NUM_RESERVED))

# A piece ends a sentence if its text contains one of these (docs/glm_objective.md).
SENTENCE_END_CHARS = tuple(".?!;:。？！；…\n")


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Integer ids of GLM's special tokens (the objectives and decoder use only these).

    Tokenizers trained here have all of them; an imported tokenizer may lack [CLS],
    [MASK], [sMASK] or [dBLOCK] (None).
    """

    pad: int
    eos: int
    cls: int | None
    mask: int | None
    smask: int | None
    gmask: int
    sop: int
    eop: int
    dblock: int | None

    @property
    def all_ids(self) -> tuple[int, ...]:
        return tuple(i for i in dataclasses.astuple(self) if i is not None)


class Tokenizer:
    """A loaded SentencePiece model that has every GLM special token."""

    def __init__(self, model_proto: bytes, source: str = "<bytes>"):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        missing = [p for p in SPECIAL_PIECES.values() if not self._has_piece(p)]
        if missing:
            raise ValueError(
                f"tokenizer {source} lacks the GLM special tokens {missing}; retrain it with "
                f"glm_jax.data.tokenizer.train_tokenizer (which adds them as user-defined symbols) "
                f"or add them to your SentencePiece model's user_defined_symbols")
        self.specials = SpecialTokens(**{name: self.sp.piece_to_id(p) for name, p in SPECIAL_PIECES.items()})
        self.sentence_end = self._sentence_end_table()

    # ------------------------------------------------------------------ I/O
    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} does not exist; train one with "
                                    "train_tokenizer(...) or point to an existing .model file")
        return cls(path.read_bytes(), source=str(path))

    def save_into(self, directory: str | Path) -> None:
        """Writes tokenizer.model into a directory (a run directory)."""
        self.save(Path(directory) / "tokenizer.model")

    def save(self, path: str | Path) -> Path:
        """Writes the .model file (e.g. into a run directory)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(self.model_proto)
        shutil.move(tmp, path)  # atomic: a crash never leaves a half-written model
        return path

    @property
    def fingerprint(self) -> bytes:
        """Bytes that change whenever tokenisation could (the tokenised-corpus cache key)."""
        return self.model_proto

    # ------------------------------------------------------------- encoding
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def prefix(self) -> tuple[int, ...]:
        """Tokens every document and prompt starts with."""
        return (self.specials.cls,)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text), np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Encodes many texts at once (SentencePiece parallelises internally)."""
        return [np.asarray(ids, np.int32) for ids in self.sp.encode(texts, num_threads=-1)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def encode_plain(self, text: str) -> np.ndarray:
        """Text as ordinary text. SentencePiece always matches user-defined symbols, so a special
        written in the text still becomes its id here (imported tokenizers do better)."""
        return self.encode(text)

    def special_id(self, text: str) -> int | None:
        """The id of a special token (a user-defined piece), or None."""
        return self.sp.piece_to_id(text) if self._has_piece(text) else None

    def with_specials(self, texts: Iterable[str]) -> "Tokenizer":
        """This tokenizer with `texts` as specials: each missing one takes the next free
        <|reserved_i|> piece (its id is unchanged, so the model's embedding table fits)."""
        missing = [t for t in texts if self.special_id(t) is None]
        free = [p for p in RESERVED_PIECES if self._has_piece(p)]
        if not missing:
            return self
        if len(missing) > len(free):
            raise ValueError(f"the tokenizer has {len(free)} free reserved pieces but needs {len(missing)} for "
                             f"{missing}; train a tokenizer with more reserved pieces (NUM_RESERVED)")
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.model_proto)
        for text, reserved in zip(missing, free):
            proto.pieces[self.sp.piece_to_id(reserved)].piece = text
        return Tokenizer(proto.SerializeToString(), source="<with specials>")

    # -------------------------------------------------------------- helpers
    def _has_piece(self, piece: str) -> bool:
        i = self.sp.piece_to_id(piece)
        return i != self.sp.unk_id() and self.sp.id_to_piece(i) == piece

    def _sentence_end_table(self) -> np.ndarray:
        """bool[vocab]: does this piece end a sentence (punctuation or newline)?"""
        table = sentencepiece_sentence_ends(self.sp)
        table[list(self.specials.all_ids)] = False
        return table


def sentencepiece_sentence_ends(sp: spm.SentencePieceProcessor) -> np.ndarray:
    """bool[pieces]: does each SentencePiece piece's text end a sentence (punctuation or newline)?"""
    table = np.zeros(sp.get_piece_size(), bool)
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            piece = bytes([int(piece[3:5], 16)]).decode("latin-1")
        table[i] = any(c in piece for c in SENTENCE_END_CHARS)
    return table


def read_tokenizer_config(directory: Path) -> dict:
    """A tokenizer directory's tokenizer_config.json (transformers' settings file); {} when absent."""
    path = directory / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def listed_specials(settings: dict, first_id: int) -> dict[str, int]:
    """text -> id of the tokens tokenizer_config.json's added_tokens_decoder lists at ids >= first_id
    (THUDM's specials sit above the base vocabulary)."""
    listed = settings.get("added_tokens_decoder") or {}
    return {entry["content"]: int(i) for i, entry in listed.items()
            if isinstance(entry, dict) and int(i) >= first_id}


def load_tokenizer_file(path: str | Path):
    """A tokenizer from its file: Hugging Face `tokenizer.json`, THUDM ChatGLM2/3's `tokenizer.model`
    (named so by the tokenizer_config.json beside it) or glm_jax's own SentencePiece `.model`."""
    path = Path(path).expanduser()
    if path.suffix == ".json":
        from glm_jax.data.hf_tokenizer import HFTokenizer

        return HFTokenizer.load(path)
    from glm_jax.data import chatglm_tokenizer

    if chatglm_tokenizer.is_chatglm_tokenizer(path.parent):
        return chatglm_tokenizer.ChatGLMTokenizer.load(path)
    return Tokenizer.load(path)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, *, max_texts: int = 20000,
                    seed_sentencepiece_size: int = 200000) -> Tokenizer:
    """Trains a lossless BPE SentencePiece model with the GLM specials on `texts`."""
    model = io.BytesIO()
    user_symbols = list(SPECIAL_PIECES.values()) + list(RESERVED_PIECES)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", user_defined_symbols=user_symbols,
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.9999,
            max_sentence_length=1 << 20, input_sentence_size=max_texts, shuffle_input_sentence=True,
            seed_sentencepiece_size=seed_sentencepiece_size, max_sentencepiece_length=16,
            num_threads=2, minloglevel=2)
    except RuntimeError as error:
        most = re.search(r"value <= (\d+)", str(error))
        if most:
            raise ValueError(f"the corpus is too small for a vocabulary of {vocab_size} pieces: SentencePiece can "
                             f"make at most {most.group(1)} from it; lower DataConfig.vocab_size to at most "
                             f"{most.group(1)} (and ModelConfig.vocab_size with it if you like) or add text") from error
        raise ValueError(f"SentencePiece training with vocab_size={vocab_size} failed ({error}). "
                         "vocab_size must exceed the 256 byte-fallback pieces plus the specials and the "
                         "corpus's characters: adjust DataConfig.vocab_size") from error
    return Tokenizer(model.getvalue(), source="<trained>")

"""GLM-4's tiktoken vocabulary (THUDM's original glm-4-9b-chat `tokenizer.model`) as a tokenizer.json.

The file holds one `base64(token bytes) rank` line per token; THUDM's
ChatGLM4Tokenizer runs it with tiktoken under GLM-4's split pattern and numbers
its specials from the vocabulary size upwards. tiktoken's algorithm (split the
text by the pattern; a piece that is a whole token is that token; otherwise
merge, again and again, the adjacent pair whose concatenation has the lowest
rank) is exactly a byte-level BPE whose merges are every split (a, b) of every
token, in the order of the token's rank. So the file converts losslessly into a
`tokenizers` BPE (the same construction transformers uses for tiktoken models),
and an imported GLM-4 run keeps a plain tokenizer.json, read like any other.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from glm_jax.data.hf_tokenizer import HFTokenizer
from glm_jax.data.tokenizer import listed_specials, read_tokenizer_config

# THUDM's ChatGLM4Tokenizer: the split pattern and the specials in id order above the ranks.
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GLM4_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                 "<|begin_of_video|>", "<|end_of_video|>")
_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+$")


def is_tiktoken_file(path: Path) -> bool:
    """Is the file a tiktoken vocabulary (text lines `base64 rank`) rather than a SentencePiece protobuf?"""
    with open(path, "rb") as f:
        first = f.readline().rstrip(b"\r\n")
    return bool(_LINE.match(first))


def read_ranks(path: Path) -> dict[bytes, int]:
    """token bytes -> rank; ranks must be 0..n-1, each once (the ids of the model's embedding rows)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error) as error:
                raise ValueError(f"{path} line {number} is not `base64-token rank`: {line[:60]!r}; "
                                 "is this a tiktoken vocabulary?") from error
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the ranks are not 0..{len(ranks) - 1} each once; the file is damaged")
    return ranks


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split (a, b) of every token into two tokens, ordered by the rank of the token they make."""
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def to_tokenizer(ranks: dict[bytes, int], specials: dict[str, int], pattern: str = GLM4_PATTERN) -> tokenizers.Tokenizer:
    """A `tokenizers` byte-level BPE that encodes exactly as tiktoken does with these ranks and pattern."""
    alphabet = byte_level_alphabet()
    text = lambda token: "".join(alphabet[b] for b in token)  # noqa: E731
    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(left), text(right)) for left, right in bpe_merges(ranks)]
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    for content, want in sorted(specials.items(), key=lambda item: item[1]):
        tokenizer.add_special_tokens([tokenizers.AddedToken(content, special=True, normalized=False)])
        if tokenizer.token_to_id(content) != want:
            raise ValueError(f"special token {content!r} must have id {want} but the vocabulary puts it at "
                             f"{tokenizer.token_to_id(content)}; the specials must follow the {len(ranks)} "
                             "ranks without gaps")
    return tokenizer


def glm4_specials(settings: dict, num_ranks: int) -> dict[str, int]:
    """tokenizer_config.json's added_tokens_decoder when it lists specials, else THUDM's order."""
    return listed_specials(settings, num_ranks) or {text: num_ranks + k for k, text in enumerate(GLM4_SPECIALS)}


def load_tiktoken(path: str | Path) -> HFTokenizer:
    """GLM-4's tokenizer.model (+ tokenizer_config.json beside it) as an HFTokenizer."""
    path = Path(path).expanduser()
    source_settings = read_tokenizer_config(path.parent)
    ranks = read_ranks(path)
    tokenizer = to_tokenizer(ranks, glm4_specials(source_settings, len(ranks)))
    eos = source_settings.get("eos_token") or "<|endoftext|>"
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                "eos_token": eos, "pad_token": source_settings.get("pad_token") or eos,
                "converted_from": f"tiktoken {path.name} ({len(ranks)} ranks)"}
    if "chat_template" in source_settings:
        settings["chat_template"] = source_settings["chat_template"]
    return HFTokenizer(tokenizer.to_str(), settings, source=str(path))

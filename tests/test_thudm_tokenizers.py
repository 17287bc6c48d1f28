"""THUDM's own tokenizer files: ChatGLM2/3's SentencePiece tokenizer.model with specials above its
vocabulary, and GLM-4's tiktoken tokenizer.model converted to a tokenizer.json.

References: the numbering rule of THUDM's tokenization_chatglm.py (written out in
docs/checkpoints.md) checked against SentencePiece itself, and tiktoken's algorithm
written naively below (with `regex`, as THUDM's tokenizer splits text) checked
against the converted `tokenizers` BPE.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("tokenizers")
regex = pytest.importorskip("regex")

import sentencepiece as spm  # noqa: E402

from glm_jax.convert.hf import CheckpointFormatError, import_hf  # noqa: E402
from glm_jax.data.chatglm_tokenizer import ChatGLMTokenizer  # noqa: E402
from glm_jax.data.hf_tokenizer import HFTokenizer  # noqa: E402
from glm_jax.data.tiktoken_file import GLM4_PATTERN, GLM4_SPECIALS, load_tiktoken, read_ranks  # noqa: E402
from glm_jax.data.tokenizer import load_tokenizer_file  # noqa: E402
from glm_jax.run_dir import RunDir  # noqa: E402
from glm_jax.model import ModelConfig  # noqa: E402
from hf_fixtures import (CHATGLM2_TINY, FIXTURES, TOKENIZER_TEXT, chatglm2_checkpoint, random_params,  # noqa: E402
                         write_chatglm_tokenizer, write_checkpoint)

# Texts without special tokens (a special written in a text encodes to its id, unlike tiktoken's
# disallowed_special=(); tested separately).
SAMPLES = ["def add(a, b):\n    return a + b\n", "The quick brown fox's den, 2024年 — naïve café!!\n\n\tx = 12345",
           "  leading spaces and trailing   ", "I'LL say it's done", "émoji 🙂 and \r\n windows lines"]


# ------------------------------------------------------------------ ChatGLM2/3 SentencePiece
@pytest.fixture(scope="module")
def chatglm3_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chatglm3")
    write_chatglm_tokenizer(directory, vocab_size=80, roles=True)
    return directory


def test_chatglm_specials_follow_the_sentencepiece_vocabulary_in_thudm_order(chatglm3_dir, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(chatglm3_dir / "tokenizer.model"))
    n = sp.get_piece_size()
    tokenizer = load_tokenizer_file(chatglm3_dir / "tokenizer.model")
    assert isinstance(tokenizer, ChatGLMTokenizer)
    s = tokenizer.specials
    assert (s.mask, s.gmask, s.smask, s.sop, s.eop) == (n, n + 1, n + 2, n + 3, n + 4)
    assert tokenizer.added["<|observation|>"] == n + 8 and tokenizer.vocab_size == n + 9
    assert (s.eos, s.pad, s.cls, s.dblock) == (sp.eos_id(), sp.unk_id(), None, None)
    assert tokenizer.prefix == (n + 1, n + 3)  # [gMASK] sop

    # ChatGLM2: the same files without anything naming the role tokens
    chatglm2 = tmp_path / "chatglm2"
    shutil.copytree(chatglm3_dir, chatglm2)
    (chatglm2 / "tokenization_chatglm.py").unlink()
    assert load_tokenizer_file(chatglm2 / "tokenizer.model").vocab_size == n + 5


def test_chatglm_encodes_text_with_sentencepiece_and_specials_by_id(chatglm3_dir):
    tokenizer = ChatGLMTokenizer.load(chatglm3_dir / "tokenizer.model")
    sp = tokenizer.sp
    text = "def add(a, b): [MASK] return<|user|>done."
    want = sp.encode("def add(a, b): ") + [tokenizer.specials.mask] + sp.encode(" return") + \
        [tokenizer.added["<|user|>"]] + sp.encode("done.")
    assert tokenizer.encode(text).tolist() == want
    assert tokenizer.decode(want) == sp.decode(sp.encode("def add(a, b): ")) + "[MASK]" + \
        sp.decode(sp.encode(" return")) + "<|user|>" + sp.decode(sp.encode("done."))
    for sample in SAMPLES:  # text without specials: exactly SentencePiece's ids
        assert tokenizer.encode(sample).tolist() == sp.encode(sample)
    assert tokenizer.sentence_end[sp.piece_to_id(".")] and not tokenizer.sentence_end[list(tokenizer.added.values())].any()


def test_chatglm_tokenizer_saved_into_a_run_lists_its_ids_and_reloads_identically(chatglm3_dir, tmp_path):
    tokenizer = ChatGLMTokenizer.load(chatglm3_dir / "tokenizer.model")
    tokenizer.save_into(tmp_path / "run")
    assert not (tmp_path / "run" / "tokenization_chatglm.py").exists()  # the ids no longer depend on it
    listed = json.loads((tmp_path / "run" / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {v["content"]: int(k) for k, v in listed.items()} == tokenizer.added
    again = RunDir(tmp_path / "run").tokenizer()
    assert again.added == tokenizer.added and again.specials == tokenizer.specials
    assert again.fingerprint == tokenizer.fingerprint


def test_chatglm_specials_with_a_gap_are_refused(chatglm3_dir, tmp_path):
    shutil.copytree(chatglm3_dir, tmp_path / "t")
    n = spm.SentencePieceProcessor(model_file=str(chatglm3_dir / "tokenizer.model")).get_piece_size()
    table = {str(n + k + (k > 1)): {"content": c} for k, c in enumerate(["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"])}
    (tmp_path / "t" / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "ChatGLMTokenizer", "added_tokens_decoder": table}))
    with pytest.raises(ValueError, match="must follow the SentencePiece vocabulary"):
        load_tokenizer_file(tmp_path / "t" / "tokenizer.model")


# ------------------------------------------------------------------ GLM-4 tiktoken
def tiktoken_reference(text: str, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's encoding, naively: split by the pattern; a whole-token piece is that token; else merge
    the adjacent pair whose concatenation has the lowest rank (leftmost on ties) until none is a token."""
    ids = []
    for piece in regex.findall(GLM4_PATTERN, text):
        data = piece.encode("utf-8")
        if data in ranks:
            ids.append(ranks[data])
            continue
        parts = [bytes([b]) for b in data]
        while True:
            pairs = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                     if parts[i] + parts[i + 1] in ranks]
            if not pairs:
                break
            _, i = min(pairs)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


# Texts the vocabulary was not learned on: few pieces are whole tokens, so the merge order decides.
HELD_OUT = ["reading the brownest foxes' dens; returning 9876543 ends", "fills spans and sentences: done!",
            "lazy quick addition of doggo braces {}"]


@pytest.fixture(scope="module")
def glm4_tiktoken_dir(tmp_path_factory):
    """A tiktoken vocabulary file: all 256 bytes, then merges learned here on code and prose by plain
    byte-pair counting within the pattern's pieces (no tokenizer library involved)."""
    words = [list(bytes([b]) for b in piece.encode()) for text in TOKENIZER_TEXT[:4] + SAMPLES
             for piece in regex.findall(GLM4_PATTERN, text)]
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < 400:
        pairs = Counter((w[i], w[i + 1]) for w in words for i in range(len(w) - 1))
        if not pairs:
            break
        (left, right), _ = max(pairs.items(), key=lambda item: (item[1], item[0]))
        ranks[left + right] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == (left, right):
                    w[i:i + 2] = [left + right]
                i += 1
    directory = tmp_path_factory.mktemp("glm4")
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in ranks.items()]
    (directory / "tokenizer.model").write_text("\n".join(lines) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "ChatGLM4Tokenizer", "eos_token": "<|endoftext|>", "chat_template": "{{ messages }}"}))
    return directory


def test_converted_tiktoken_vocabulary_encodes_exactly_as_tiktoken(glm4_tiktoken_dir):
    ranks = read_ranks(glm4_tiktoken_dir / "tokenizer.model")
    assert len(ranks) >= 300 and all(bytes([b]) in ranks for b in range(256))
    tokenizer = load_tiktoken(glm4_tiktoken_dir / "tokenizer.model")
    for text in SAMPLES + TOKENIZER_TEXT[:2] + HELD_OUT:
        want = tiktoken_reference(text, ranks)
        assert tokenizer.encode(text).tolist() == want, text
        assert tokenizer.decode(want) == text
    assert max(len(t) for t in ranks) > 3  # merges were exercised, not only bytes


def test_tiktoken_specials_follow_the_ranks_in_thudm_order_and_survive_a_run(glm4_tiktoken_dir, tmp_path):
    tokenizer = load_tiktoken(glm4_tiktoken_dir / "tokenizer.model")
    n = len(read_ranks(glm4_tiktoken_dir / "tokenizer.model"))
    s = tokenizer.specials
    assert (s.eos, s.mask, s.gmask, s.smask, s.sop, s.eop) == tuple(range(n, n + 6))
    assert tokenizer.vocab_size == n + len(GLM4_SPECIALS) and tokenizer.prefix == (n + 2, n + 4)
    assert tokenizer.encode("x[gMASK]<sop>").tolist()[-2:] == [n + 2, n + 4]
    tokenizer.save_into(tmp_path / "run")
    again = RunDir(tmp_path / "run").tokenizer()
    assert isinstance(again, HFTokenizer) and again.specials == s
    assert again.settings["chat_template"] == "{{ messages }}" and again.settings["eos_token"] == "<|endoftext|>"
    for text in SAMPLES:
        assert again.encode(text).tolist() == tokenizer.encode(text).tolist()


def test_damaged_tiktoken_file_is_named(glm4_tiktoken_dir, tmp_path):
    shutil.copytree(glm4_tiktoken_dir, tmp_path / "t")
    path = tmp_path / "t" / "tokenizer.model"
    path.write_text(path.read_text().replace(" 7\n", " 70000\n", 1))
    with pytest.raises(ValueError, match="not 0..* each once"):
        read_ranks(path)


def test_live_tiktoken_agrees(glm4_tiktoken_dir):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = read_ranks(glm4_tiktoken_dir / "tokenizer.model")
    reference = tiktoken.Encoding(name="glm4-test", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens={})
    tokenizer = load_tiktoken(glm4_tiktoken_dir / "tokenizer.model")
    for text in SAMPLES + TOKENIZER_TEXT[:2] + HELD_OUT:
        assert tokenizer.encode(text).tolist() == reference.encode(text, disallowed_special=())


# ------------------------------------------------------------------ import-hf with THUDM tokenizer files
def _fixture_without_tokenizer(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(FIXTURES / "glm_mha_rot50", source)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).unlink()
    return source


def test_import_of_a_glm4_chat_checkpoint_converts_its_tiktoken_tokenizer(glm4_tiktoken_dir, tmp_path):
    """THUDM's original glm-4-9b-chat layout: chatglm tensors + a tiktoken tokenizer.model."""
    n = len(read_ranks(glm4_tiktoken_dir / "tokenizer.model"))
    model = ModelConfig(**{**CHATGLM2_TINY, "vocab_size": 448}, num_kv_heads=2)  # padded like padded_vocab_size
    config, tensors = chatglm2_checkpoint(model, random_params(model, seed=3))
    write_checkpoint(tmp_path / "glm4", config, tensors)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "glm4" / name).unlink()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(glm4_tiktoken_dir / name, tmp_path / "glm4" / name)
    import_hf(tmp_path / "glm4", tmp_path / "run")
    run = RunDir(tmp_path / "run")
    assert run.tokenizer_path.name == "tokenizer.json" and not (run.path / "tokenizer.model").exists()
    tokenizer = run.tokenizer()
    assert tokenizer.specials.gmask == n + 2 and tokenizer.vocab_size == n + len(GLM4_SPECIALS)
    ranks = read_ranks(glm4_tiktoken_dir / "tokenizer.model")
    assert tokenizer.encode(SAMPLES[1]).tolist() == tiktoken_reference(SAMPLES[1], ranks)

    # The same tokenizer with weights whose embedding is too small: refused, naming both sizes.
    source = _fixture_without_tokenizer(tmp_path)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(glm4_tiktoken_dir / name, source / name)
    with pytest.raises(CheckpointFormatError, match=r"tokenizer has \d+ tokens but the model's embedding only 96"):
        import_hf(source, tmp_path / "small")
    assert not (tmp_path / "small").exists()


def test_import_reads_a_chatglm3_tokenizer_model(chatglm3_dir, tmp_path):
    source = _fixture_without_tokenizer(tmp_path)
    for name in ("tokenizer.model", "tokenizer_config.json", "tokenization_chatglm.py"):
        shutil.copyfile(chatglm3_dir / name, source / name)
    import_hf(source, tmp_path / "run")
    run = RunDir(tmp_path / "run")
    assert run.tokenizer_path.name == "tokenizer.model"
    tokenizer = run.tokenizer()
    assert isinstance(tokenizer, ChatGLMTokenizer)
    assert tokenizer.added == ChatGLMTokenizer.load(chatglm3_dir / "tokenizer.model").added
    assert f"DataConfig.tokenizer_path = '{run.path / 'tokenizer.model'}'" in (run.path / "config.gin").read_text()
    text = "print(sum([1, 2, 3]))"
    assert np.array_equal(tokenizer.encode(text), ChatGLMTokenizer.load(chatglm3_dir / "tokenizer.model").encode(text))


def test_sentencepiece_file_without_chatglm_class_is_refused(chatglm3_dir, tmp_path):
    source = _fixture_without_tokenizer(tmp_path)
    shutil.copyfile(chatglm3_dir / "tokenizer.model", source / "tokenizer.model")
    with pytest.raises(CheckpointFormatError, match="does not name tokenizer_class 'ChatGLMTokenizer'"):
        import_hf(source, tmp_path / "run")


def test_chatglm6b_icetk_tokenizer_is_refused_with_the_reason(tmp_path):
    source = _fixture_without_tokenizer(tmp_path)
    (source / "ice_text.model").write_bytes(b"\x00")
    with pytest.raises(CheckpointFormatError, match="icetk tokenizer .* is not supported"):
        import_hf(source, tmp_path / "run")

"""SentencePiece tokenizer: training with GLM specials, stable ids, round trip, errors."""

import io
import time

import numpy as np
import pytest
import sentencepiece as spm

from data_fixtures import generated_documents, small_tokenizer
from glm_jax.data.tokenizer import SPECIAL_PIECES, Tokenizer, train_tokenizer


def test_trains_fast_with_specials_at_stable_ids():
    start = time.perf_counter()
    tokenizer = train_tokenizer(generated_documents(200, seed=5), vocab_size=420)
    assert time.perf_counter() - start < 10
    # <unk> is 0; specials follow in SPECIAL_PIECES order, whatever the corpus.
    expected = {name: i for i, name in enumerate(SPECIAL_PIECES, start=1)}
    assert {name: getattr(tokenizer.specials, name) for name in SPECIAL_PIECES} == expected
    assert small_tokenizer().specials == tokenizer.specials


def test_round_trip_including_code_whitespace_and_unseen_characters(tmp_path):
    tokenizer = small_tokenizer()
    text = "def f(x):\n    return x  [MASK] ünïcødé ✓\n\n\tend"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.specials.mask in ids.tolist()  # a literal [MASK] is the special token
    path = tokenizer.save(tmp_path / "run" / "tokenizer.model")
    loaded = Tokenizer.load(path)
    assert loaded.encode(text).tolist() == ids.tolist()


def test_sentence_end_table():
    tokenizer = small_tokenizer()
    ends = {tokenizer.id_to_piece(i) for i in np.flatnonzero(tokenizer.sentence_end)}
    assert ends and all(any(c in p for c in ".?!;:\n") or p.startswith("<0x") for p in ends)
    assert not tokenizer.sentence_end[list(tokenizer.specials.all_ids)].any()


def test_missing_specials_are_named(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(generated_documents(100)), model_writer=model,
                                   vocab_size=60, user_defined_symbols=["[MASK]"], minloglevel=2)
    (tmp_path / "plain.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match=r"\[gMASK\].*<sop>") as error:
        Tokenizer.load(tmp_path / "plain.model")
    assert "[MASK]'" not in str(error.value).split("lacks")[1].split("]")[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.load(tmp_path / "absent.model")

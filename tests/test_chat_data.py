"""Chat fine-tuning data: role tokens added to tokenizers that lack them, the 'chat:' source (errors
with file and line, packing with segment isolation, the prefix switch, truncation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_fixtures import small_tokenizer
from glm_jax.data import chat_format as cf
from glm_jax.data import corpus
from glm_jax.data.chat_source import encode_examples, read_conversations
from glm_jax.data.objectives import Objective
from glm_jax.data.pipeline import DataConfig, load_tokenizer, make_batches
from glm_jax.data.tokenizer import RESERVED_PIECES, load_tokenizer_file
from hf_fixtures import write_chatglm_tokenizer

QA = [{"role": "user", "content": "alpha beta?"}, {"role": "assistant", "content": "gamma delta."}]


def conversation_line(k: int) -> str:
    words = " ".join(["alpha", "beta", "gamma", "delta"][: 1 + k % 4])
    return json.dumps({"conversations": [{"role": "user", "content": f"{words} {k}?"},
                                         {"role": "assistant", "content": f"theta {k} {words}."}]})


# ------------------------------------------------------------------ role tokens
def test_glm_jax_tokenizer_gets_role_tokens_in_its_reserved_pieces_ids_unchanged():
    tokenizer = small_tokenizer()
    reserved = [tokenizer.sp.piece_to_id(p) for p in RESERVED_PIECES[:4]]
    chat = cf.with_role_tokens(tokenizer, model_vocab_size=tokenizer.vocab_size)
    assert chat.vocab_size == tokenizer.vocab_size
    assert [chat.special_id(t) for t in cf.ROLE_TOKENS.values()] == reserved
    assert chat.specials == tokenizer.specials
    text = "alpha beta: gamma.\n"
    assert chat.encode(text).tolist() == tokenizer.encode(text).tolist()
    assert cf.with_role_tokens(chat) is chat  # idempotent


def test_a_tokenizer_without_room_for_role_tokens_is_a_clear_error(tmp_path):
    tokenizer = small_tokenizer().with_specials([f"<|tool_{i}|>" for i in range(6)])
    with pytest.raises(ValueError, match="2 free reserved pieces but needs 4"):
        cf.with_role_tokens(tokenizer)
    write_chatglm_tokenizer(tmp_path, roles=False)  # ChatGLM2: specials end at n + 5
    chatglm2 = load_tokenizer_file(tmp_path / "tokenizer.model")
    n = chatglm2.sp.get_piece_size()
    grown = cf.with_role_tokens(chatglm2, model_vocab_size=n + 16)
    assert [grown.special_id(t) for t in cf.ROLE_TOKENS.values()] == [n + 5, n + 6, n + 7, n + 8]
    with pytest.raises(ValueError, match=f"{n + 9} ids long, but the model's embedding table has {n + 5} rows"):
        cf.with_role_tokens(chatglm2, model_vocab_size=n + 5)


def test_role_ids_of_a_tokenizer_without_them_name_the_fix():
    with pytest.raises(ValueError, match=r"no \['<\|system\|>'.*'chat:' data source adds them"):
        cf.role_ids(small_tokenizer())


# ------------------------------------------------------------------ the chat source
def _config(tmp_path, **changes) -> DataConfig:
    tokenizer_path = tmp_path / "tokenizer.model"
    if not tokenizer_path.exists():
        small_tokenizer().save(tokenizer_path)
    return DataConfig(**{"source": f"chat:{tmp_path}/*.jsonl", "seq_len": 64, "batch_size": 2, "group_size": 8,
                         "eval_fraction": 0.0, "tokenizer_path": str(tokenizer_path), "chat_format": "glm4",
                         "cache_dir": str(tmp_path / "cache"), **changes})


def test_the_split_and_its_tokenizer_do_not_depend_on_where_the_file_lives(tmp_path, monkeypatch):
    """One file spelled relative, absolute, or copied elsewhere: the same train / eval conversations and the
    same tokenizer (trained on the train side); copies of a conversation are all on one side."""
    lines = [conversation_line(k) for k in range(300)]
    lines += lines[:40]
    for folder in ("a", "b/c"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "chats.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path / "a")
    sources = ("chat:chats.jsonl", f"chat:{tmp_path}/a/chats.jsonl", f"chat:{tmp_path}/b/c/chats.jsonl")
    splits = [{split: [repr(c) for c in read_conversations(source, split, 0.2)] for split in ("train", "eval")}
              for source in sources]
    assert splits[0] == splits[1] == splits[2]
    train, evaluation = splits[0]["train"], splits[0]["eval"]
    assert len(train) + len(evaluation) == 340 and 0.1 < len(evaluation) / 340 < 0.3
    assert not set(train) & set(evaluation)  # each of the 40 copied conversations lands beside its original
    models = [corpus.default_tokenizer(source, 300, eval_fraction=0.2, cache_dir=tmp_path / f"cache{i}")
              for i, source in enumerate(sources)]
    assert models[0].sp.serialized_model_proto() == models[1].sp.serialized_model_proto() \
        == models[2].sp.serialized_model_proto()


def test_malformed_lines_are_named_by_file_and_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    for bad, why in (("{not json", "not valid JSON"), (json.dumps({"conversations": [QA[1]]}), "needs a user turn"),
                     (json.dumps({"conversations": [QA[0]]}), "assistant turn is missing"),
                     (json.dumps({"conversations": [QA[0], {"role": "tool_result", "content": "x"}]}),
                      "unknown role 'tool_result'")):
        path.write_text(conversation_line(0) + "\n\n" + bad + "\n")
        with pytest.raises(ValueError, match=f"{path}:3.*{why}.*skip_bad_input"):
            read_conversations(f"chat:{path}", "train", 0.0)
    assert len(read_conversations(f"chat:{path}", "train", 0.0, skip_bad_input=True)) == 1


def test_conversations_pack_into_isolated_segments_with_the_chat_loss(tmp_path):
    (tmp_path / "chats.jsonl").write_text("".join(conversation_line(k) + "\n" for k in range(12)))
    config = _config(tmp_path)
    tokenizer = load_tokenizer(config)
    assert tokenizer.special_id("<|assistant|>") is not None  # a chat source's tokenizer has the role tokens
    examples, cut = encode_examples(config, tokenizer, read_conversations(config.source, "train", 0.0))
    assert cut == 0
    by_tokens = {tuple(e["tokens"].tolist()): e for e in examples}
    batches = make_batches(config, Objective(), "train", 0, 1, tokenizer=tokenizer)
    seen = 0
    for _ in range(3):
        batch = next(batches)
        for row in range(2):
            segments = batch["segment_ids"][row]
            assert segments.max() >= 2  # several conversations share a row
            for s in range(1, segments.max() + 1):
                span = np.flatnonzero(segments == s)
                example = by_tokens[tuple(batch["tokens"][row, span].tolist())]
                assert np.array_equal(batch["loss_mask"][row, span], example["loss_mask"])
                assert np.array_equal(batch["targets"][row, span], example["targets"])
                assert np.array_equal(batch["positions"][row, 0, span], np.arange(len(span)))
                assert not batch["prefix_mask"][row, span].any()  # causal (the reference models)
                seen += 1
    assert seen >= 6


def test_prefix_switch_makes_each_conversations_prompt_bidirectional(tmp_path):
    (tmp_path / "chats.jsonl").write_text("".join(conversation_line(k) + "\n" for k in range(8)))
    config = _config(tmp_path, chat_prompt_attention="prefix")
    tokenizer = load_tokenizer(config)
    batch = next(make_batches(config, Objective(), "train", 0, 1, tokenizer=tokenizer))
    assistant = tokenizer.special_id("<|assistant|>")
    for row in range(2):
        for s in range(1, batch["segment_ids"][row].max() + 1):
            span = np.flatnonzero(batch["segment_ids"][row] == s)
            first_reply = span[0] + int(np.flatnonzero(batch["tokens"][row, span] == assistant)[0])
            assert np.array_equal(np.flatnonzero(batch["prefix_mask"][row, span]) + span[0],
                                  np.arange(span[0], first_reply + 1))


def test_a_conversation_longer_than_a_row_is_cut_and_counted(tmp_path, capsys):
    long_reply = " ".join(["gamma"] * 200)
    (tmp_path / "chats.jsonl").write_text(json.dumps({"conversations": [QA[0], {"role": "assistant",
                                                                                 "content": long_reply}]}) + "\n"
                                          + conversation_line(1) + "\n")
    config = _config(tmp_path, batch_size=1)
    batch = next(make_batches(config, Objective(), "train", 0, 1))
    assert batch["tokens"].shape == (1, 64)
    assert "1 of 2 train conversations are longer than DataConfig.seq_len = 64" in capsys.readouterr().err


def test_chat_settings_are_checked():
    with pytest.raises(ValueError, match="chat_format 'chatglm4' is unknown"):
        DataConfig(chat_format="chatglm4")
    with pytest.raises(ValueError, match="chat_prompt_attention 'full' is unknown"):
        DataConfig(chat_prompt_attention="full")


@pytest.mark.parametrize("name, fmt, base, adapters", [
    ("sft_glm4_9b", "glm4", "runs/glm4_chat", None), ("sft_chatglm3_6b", "chatglm3", "runs/chatglm3", None),
    ("sft_tiny_tools", "glm4", None, None)])
def test_the_shipped_sft_configs_build_chat_experiments(name, fmt, base, adapters):
    from glm_jax import experiment as experiment_lib
    from train_fixtures import REPO

    experiment = experiment_lib.from_gin([REPO / "experiments" / "configs" / f"{name}.gin"], [])
    assert experiment.data.source.startswith("chat:") and experiment.data.chat_format == fmt
    assert experiment.data.chat_prompt_attention == "causal"
    assert experiment.train.init_from == base
    assert (experiment.adapters.targets if experiment.adapters else None) == adapters

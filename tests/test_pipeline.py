"""The data pipeline: batch contract, determinism, exact resume, process sharding, errors."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from data_fixtures import small_tokenizer, write_text_corpus
from glm_jax.data import corpus
from glm_jax.data.objectives import Objective
from glm_jax.data.pipeline import DataConfig, make_batches, make_dataset
from glm_jax.kernels import masks

MIX = Objective(token=0.5, sentence=0.3, document=0.2)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_text_corpus(tmp_path_factory.mktemp("corpus"))


def dataset(source, tmp_path, index=0, count=1, seed=0, split="train", objective=MIX, **changes):
    options = {**dict(seq_len=128, batch_size=4, eval_fraction=0.1, group_size=8), **changes}
    config = DataConfig(source=source, seed=seed, cache_dir=str(tmp_path), **options)
    return make_dataset(config, objective, split, index, count, tokenizer=small_tokenizer())


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batches_follow_the_contract(source, tmp_path):
    batch = next(dataset(source, tmp_path).iterator())
    shapes = {k: (v.shape, v.dtype.name) for k, v in batch.items()}
    assert shapes == {"tokens": ((4, 128), "int32"), "targets": ((4, 128), "int32"),
                      "loss_mask": ((4, 128), "float32"), "positions": ((4, 2, 128), "int32"),
                      "segment_ids": ((4, 128), "int32"), "prefix_mask": ((4, 128), "bool")}
    ks, ke = masks.key_ranges(batch["segment_ids"], batch["prefix_mask"])  # contiguity holds
    np.testing.assert_array_equal(masks.mask_from_key_ranges(ks, ke),
                                  masks.dense_mask(batch["segment_ids"], batch["prefix_mask"]))
    assert batch["loss_mask"].sum() > 0


def test_same_seed_same_batches_and_other_seed_differs(source, tmp_path):
    first = take(dataset(source, tmp_path).iterator(), 6)
    assert_same_batches(first, take(dataset(source, tmp_path).iterator(), 6))
    other = take(dataset(source, tmp_path, seed=1).iterator(), 1)
    assert not np.array_equal(other[0]["tokens"], first[0]["tokens"])


def test_restore_in_a_fresh_process_yields_the_same_batches(source, tmp_path):
    iterator = dataset(source, tmp_path).iterator()
    take(iterator, 5)
    state = iterator.get_state()
    expected = take(iterator, 80)  # crosses group and epoch boundaries
    out = tmp_path / "resumed.npz"
    script = textwrap.dedent(f"""
        import json, sys, numpy as np
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from test_pipeline import dataset, take
        it = dataset({source!r}, __import__('pathlib').Path({str(tmp_path)!r})).iterator(json.loads({json.dumps(json.dumps(state))}))
        batches = take(it, 80)
        np.savez({str(out)!r}, **{{f"{{i}}_{{k}}": v for i, b in enumerate(batches) for k, v in b.items()}})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    saved = np.load(out)
    resumed = [{k: saved[f"{i}_{k}"] for k in expected[0]} for i in range(80)]
    assert_same_batches(expected, resumed)
    assert iterator.get_state()["epoch"] >= 1


def test_global_batch_does_not_depend_on_the_process_count(source, tmp_path):
    config = DataConfig(source=source, seq_len=128, batch_size=4, cache_dir=str(tmp_path), eval_fraction=0.1,
                        group_size=8, num_shards=2)
    one = make_batches(config, MIX, "train", 0, 1, tokenizer=small_tokenizer())
    two = [make_batches(config, MIX, "train", p, 2, tokenizer=small_tokenizer()) for p in range(2)]
    for _ in range(3):
        whole, halves = next(one), [next(b) for b in two]
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))
    with pytest.raises(ValueError, match="num_shards"):
        one.set_state(two[0].get_state())


def test_processes_see_disjoint_shards_whose_union_is_the_epoch(source, tmp_path):
    single = dataset(source, tmp_path)
    shards = [dataset(source, tmp_path, index=i, count=2) for i in range(2)]
    ids = [set(s.epoch_windows(0).tolist()) for s in shards]
    assert not ids[0] & ids[1]
    assert ids[0] | ids[1] == set(single.epoch_windows(0).tolist()) == set(range(len(single.windows)))
    for w in list(ids[1])[:10]:  # an example does not depend on who produces it
        for a, b in zip(shards[1].examples(0, w), single.examples(0, w)):
            np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert shards[0].local_batch == 2
    assert single.epoch_windows(1).tolist() != single.epoch_windows(0).tolist()  # reshuffled per epoch


def test_train_and_eval_splits_are_disjoint_and_stable(source, tmp_path):
    train = dataset(source, tmp_path)
    evaluation = dataset(source, tmp_path, split="eval")
    assert evaluation.corpus.num_documents > 0
    train_docs = {bytes(train.corpus.document(i)) for i in range(train.corpus.num_documents)}
    assert not any(bytes(evaluation.corpus.document(i)) in train_docs for i in range(evaluation.corpus.num_documents))


def test_jsonl_source_and_counted_skips(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join([json.dumps({"text": "alpha beta. gamma delta! " * 20})] * 5
                                                + ["not json", json.dumps({"title": "no text"})]))
    (tmp_path / "b.jsonl").write_bytes(b"\xff\xfe\x00bad")
    stats = corpus.CorpusStats()
    docs = list(corpus.read_documents(f"jsonl:{tmp_path}/*.jsonl", stats=stats, skip_bad_input=True))
    assert len(docs) == 5 and stats.skipped_bad_json == 2 and stats.skipped_non_utf8 == 1


def test_too_short_documents_are_counted(tmp_path):
    (tmp_path / "t.txt").write_text("\n\n".join(["alpha beta gamma delta. epsilon zeta eta theta!"] * 30 + ["x"] * 5))
    ds = dataset(f"text:{tmp_path}/t.txt", tmp_path, eval_fraction=0.0, objective=Objective(token=0, document=1.0))
    take(ds.iterator(), 3)
    assert ds.counts["skipped_too_short"] > 0


def test_user_errors_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="no files match"):
        dataset(f"text:{tmp_path}/missing/*.txt", tmp_path)
    (tmp_path / "empty.txt").write_text("\n\n \n")
    with pytest.raises(ValueError, match="no training documents"):
        dataset(f"text:{tmp_path}/empty.txt", tmp_path)
    with pytest.raises(ValueError, match="seq_len"):
        DataConfig(seq_len=8)
    with pytest.raises(ValueError, match="not understood"):
        corpus.source_files("hub:wikipedia")
    with pytest.raises(ValueError, match="divisible"):
        dataset(write_text_corpus(tmp_path), tmp_path, index=0, count=3)
    (tmp_path / "copies.txt").write_text("alpha beta gamma delta epsilon.\n\n" * 50)  # one document, 50 copies
    with pytest.raises(ValueError, match="eval split .* is empty; documents are assigned .* hash of their text .*"
                                         "every copy .* raise DataConfig.eval_fraction or add distinct documents"):
        dataset(f"text:{tmp_path}/copies.txt", tmp_path, split="eval")


def test_stdlib_corpus_packs_at_least_90_percent(tmp_path):
    config = DataConfig(seq_len=512, batch_size=8, cache_dir=str(tmp_path))
    ds = make_dataset(config, MIX, "train", 0, 1)
    assert ds.corpus.stats["files"] > 500 and ds.corpus.num_documents > 500
    iterator = ds.iterator()
    take(iterator, 40)
    assert iterator.packing_efficiency >= 0.90, iterator.packing_efficiency

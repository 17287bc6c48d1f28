"""experiments/long_context.py: its passkey documents and scored spans, and `--quick` end to end."""

import json
import subprocess
import sys

import numpy as np
import pytest

from train_fixtures import REPO, subprocess_env

sys.path.insert(0, str(REPO / "experiments"))
import long_context  # noqa: E402

from glm_jax.data.tokenizer import train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def maker():
    rng = np.random.default_rng(0)
    texts = ["".join(long_context.passkey_text(rng, 8)) + "." for _ in range(300)]
    texts += ["def f(x):\n    return x + 1\n", "Numbers like 12, 345 and 6789 appear in code."] * 20
    return long_context.PasskeyMaker(train_tokenizer(texts, 400))


def test_passkey_document_hides_one_key_at_a_random_depth_and_asks_for_it():
    prompt, answer = long_context.passkey_text(np.random.default_rng(3), fillers=12)
    key = answer.strip()
    assert len(key) == 5 and key.isdigit()
    assert prompt.startswith(long_context.INTRO) and prompt.endswith(long_context.QUESTION)
    assert prompt.count(key) == 2  # the needle says it twice; the answer is not in the prompt
    depths = {long_context.passkey_text(np.random.default_rng(s), 12)[0].index("The pass key is") for s in range(20)}
    assert len(depths) > 5


def test_documents_fit_their_token_bounds(maker):
    rng = np.random.default_rng(1)
    for low, high in ((70, 90), (120, 160), (230, 256)):
        for _ in range(5):
            prompt, answer, tokens = maker.document(rng, low, high)
            assert low - 2 * maker.per_filler <= len(tokens) <= high
            assert tokens[0] == maker.tokenizer.prefix[0]
    with pytest.raises(ValueError, match="raise LongContext.train_length"):
        maker.document(rng, 8, 10)


def test_scored_span_of_the_passkey_batch_is_exactly_the_key(maker):
    study = long_context.LongContext(eval_passkeys=3)
    batch = long_context.passkey_batch(maker, study, 128)
    assert batch["tokens"].shape == (3, 128) and batch["positions"].shape == (3, 2, 128)
    for row in range(3):
        scored = batch["targets"][row][batch["loss_mask"][row] > 0]
        key = maker.tokenizer.decode(scored.tolist()).strip()
        assert len(key) == 5 and key.isdigit()
        prompt = maker.tokenizer.decode(batch["tokens"][row][batch["segment_ids"][row] > 0].tolist())
        assert prompt.count(key) == 2 and prompt.endswith("The pass key is " + key[:-1])
        # the causal row: targets are the tokens shifted by one, positions count up from 0
        n = int((batch["segment_ids"][row] > 0).sum())
        np.testing.assert_array_equal(batch["targets"][row][:n - 1], batch["tokens"][row][1:n])
        np.testing.assert_array_equal(batch["positions"][row, 0, :n], np.arange(n))


def test_parallel_context_windows_keep_every_position_below_T_and_the_key_in_the_task(maker):
    study = long_context.LongContext(eval_passkeys=3)
    T, task = 128, study.window_task_tokens
    batch = long_context.passkey_batch(maker, study, 4 * T)
    windows = long_context.as_context_windows(batch, T - task, task)
    for row in range(3):
        n = int((batch["segment_ids"][row] > 0).sum())
        ids, positions = windows["context_windows"][row, :n], windows["positions"][row, 0, :n]
        assert positions.max() < T and (ids[-task:] == 0).all() and (ids[:-task] > 0).all()
        assert ids.max() == -(-(n - task) // (T - task))  # windows of T - task tokens, the last one shorter
        assert (windows["loss_mask"][row, n - task:n].sum() == batch["loss_mask"][row].sum())  # the key: task tokens
        starts = np.flatnonzero(np.diff(np.r_[0, ids[:-task]]) != 0)
        assert (positions[starts] == 0).all()  # every window restarts at position 0
        np.testing.assert_array_equal(windows["tokens"][row], batch["tokens"][row])


def test_quick_study_trains_fine_tunes_with_each_scaling_and_reports(tmp_path):
    results = tmp_path / "results"
    command = [sys.executable, "experiments/long_context.py", "--quick", f"--out_dir={tmp_path / 'runs'}",
               f"--results={results}", f"--gin.DataConfig.cache_dir='{tmp_path / 'cache'}'"]
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(1), cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    report = (results / "long_context.md").read_text()
    for row in ("| none | no |", "| none | yes |", "| yarn | no |", "| yarn | yes |", "| lambda | no |",
                "| windows | no |"):
        assert report.count(row) == 3, f"{row!r} should be in each of the three tables:\n{report}"
    rows = json.loads((results / "long_context.json").read_text())["rows"]
    assert {(r["method"], r["finetuned"], r["length"]) for r in rows} == {
        ("none", False, 64), ("none", False, 128), ("none", True, 128), ("yarn", False, 128), ("yarn", True, 128),
        ("lambda", False, 128), ("windows", False, 128)}
    for r in rows:
        assert 0.0 <= r["passkey_accuracy"] <= 1.0 and np.isfinite(r["loss"])
    from glm_jax.run_dir import RunDir

    tuned = RunDir(tmp_path / "runs" / "finetune_yarn_2x").read_experiment()
    assert (tuned.model.rope_scaling, tuned.model.rope_scaling_factor, tuned.model.rope_original_context) == (
        "yarn", 2.0, 64)
    assert tuned.data.seq_len == 128 and tuned.train.init_from.endswith("base")
    assert (results / "long_context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

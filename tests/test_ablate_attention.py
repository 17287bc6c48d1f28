"""`experiments/ablate_attention.py --quick --seeds 2` runs the whole multi-seed study end to end and writes
its report."""

import json
import subprocess
import sys

import numpy as np

from data_fixtures import write_text_corpus
from train_fixtures import REPO, subprocess_env


def test_quick_study_writes_tables_and_plots(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_text_corpus(corpus, count=150)
    results = tmp_path / "results"
    command = [sys.executable, "experiments/ablate_attention.py", "--quick", "--seeds=2", f"--out_dir={tmp_path / 'runs'}",
               f"--results={results}", f"--gin.DataConfig.source='text:{corpus}/*.txt'",
               f"--gin.DataConfig.cache_dir='{tmp_path / 'cache'}'"]
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(1), cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    report = (results / "attention_ablation.md").read_text()
    for row in ("| MHA |", "| GQA-2 (scratch) |", "| MQA (scratch) |", "| GQA-2 (mean, uptrained a=0.1) |",
                "| MQA (mean, uptrained a=0.1) |", "| GQA2 | mean |", "| MQA | similarity-aligned |",
                "| MHA (control) | identity |"):
        assert row in report, f"missing {row!r} in\n{report}"
    assert "| mqa_mean_a0.1 |" in report  # paired differences
    saved = json.loads((results / "attention_ablation.json").read_text())
    rows = {r["name"]: r for r in saved["rows"] if r["seed"] == 0}
    other = {r["name"]: r for r in saved["rows"] if r["seed"] == 1}
    assert rows.keys() == other.keys()
    assert rows["mha"]["eval_loss"] != other["mha"]["eval_loss"]  # the seed changes initialisation and data
    # The summary is the mean and sample standard deviation of the two seeds' scores.
    for name, record in saved["summary"].items():
        losses = [rows[name]["eval_loss"], other[name]["eval_loss"]]
        np.testing.assert_allclose(record["eval_loss"], np.mean(losses), rtol=1e-12)
        np.testing.assert_allclose(record["eval_loss_std"], np.std(losses, ddof=1), rtol=1e-9)
        assert f"{record['eval_loss']:.4f} ± {record['eval_loss_std']:.4f}" in report
    difference = np.mean([rows["gqa2_mean_a0.1"]["eval_loss"] - rows["mha_continued_a0.1"]["eval_loss"],
                          other["gqa2_mean_a0.1"]["eval_loss"] - other["mha_continued_a0.1"]["eval_loss"]])
    row = next(line for line in report.splitlines() if line.startswith("| gqa2_mean_a0.1 |"))
    assert row.split("|")[3].strip().startswith(f"{difference:+.4f} ± "), row  # minus the control, same seed
    # The layouts' measured cache bytes per token are in the ratio of their KV heads (4 : 2 : 1).
    assert rows["mha"]["kv_bytes_per_token"] == 2 * rows["gqa2_scratch"]["kv_bytes_per_token"] \
        == 4 * rows["mqa_scratch"]["kv_bytes_per_token"]
    assert rows["gqa2_mean_a0"]["step"] == 0 and rows["gqa2_mean_a0.1"]["step"] == 2
    # Beyond mean pooling: the similarity-grouped, aligned conversion minus mean pooling, paired per seed.
    beyond = np.mean([r["mqa_similarity-aligned_a0"]["eval_loss"] - r["mqa_mean_a0"]["eval_loss"] for r in (rows, other)])
    row = next(line for line in report.splitlines() if line.startswith("| MQA | similarity-aligned |")
               and "/2" in line)
    assert row.split("|")[3].strip().startswith(f"{beyond:+.4f} ± "), row
    for png in ("attention_quality_vs_time.png", "attention_alpha.png", "attention_training_curves.png"):
        assert (results / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_method_order_is_counted_per_seed():
    sys.path.insert(0, str(REPO / "experiments"))
    from ablate_attention import ordering_counts

    loss = {("mqa_mean_a0.1", 0): 5.0, ("mqa_first_a0.1", 0): 5.2, ("mqa_random_a0.1", 0): 5.1,
            ("mqa_mean_a0.1", 1): 5.0, ("mqa_first_a0.1", 1): 5.1, ("mqa_random_a0.1", 1): 5.3}
    assert ordering_counts(loss, "mqa", ("mean", "first", "random"), 0.1, 2) == (
        "mean < first in 2/2; first < random in 1/2; the whole order mean < first < random in 1/2")

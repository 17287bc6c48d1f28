"""experiments/peft_study.py: the methods' gin bindings give matched trainable budgets, the report, and
`--quick` end to end (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from train_fixtures import REPO, subprocess_env

sys.path.insert(0, str(REPO / "experiments"))
import peft_study  # noqa: E402

from glm_jax import experiment as experiment_lib  # noqa: E402
from glm_jax.model.adapters import count_adapter_params, init_adapters  # noqa: E402


def test_the_default_sizes_give_every_adapter_about_the_same_trainable_parameters():
    import jax

    study = peft_study.PeftStudy()
    counts = {}
    for method in study.methods[1:]:
        experiment = experiment_lib.from_gin([str(REPO / "experiments" / "configs" / "sft_tiny_tools.gin")], [
            *peft_study.method_bindings(study, method), "train.init_from = 'unused'"])
        adapters = jax.eval_shape(lambda e=experiment: init_adapters(e.model, e.adapters, jax.random.key(0)))
        counts[method] = count_adapter_params(adapters)
    assert counts == {"lora": 8192, "prefix": 8192, "prompt": 8192, "bottleneck": 8736}


def test_the_report_lists_every_method_with_its_budget_and_scores():
    results = {"base": {"method": "base (other tools)", "exact_calls": 0.0, "exact_answers": 0.0},
               "full": {"method": "full fine-tuning", "trainable": 527872, "optimizer_state_bytes": 4222984,
                        "step_seconds": 0.2, "eval_loss": 0.002, "exact_calls": 1.0, "exact_answers": 0.99},
               "lora": {"method": "LoRA (query, value)", "trainable": 8192, "optimizer_state_bytes": 65544,
                        "step_seconds": 0.15, "eval_loss": 0.08, "exact_calls": 0.99, "exact_answers": 0.79}}
    table = peft_study.report(results, peft_study.PeftStudy())
    assert "| base (other tools) | - | - | - | - | 0% | 0% |" in table
    assert "| LoRA (query, value) | 8,192 | 64 KiB | 150 ms (0.75x) | 0.080 | 99% | 79% |" in table


@pytest.mark.slow
def test_quick_study_trains_every_method_and_reports(tmp_path):
    results = tmp_path / "results"
    command = [sys.executable, "experiments/peft_study.py", "--quick", f"--out_dir={tmp_path / 'runs'}",
               f"--results={results}"]
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(1), cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    saved = json.loads((results / "peft_study.json").read_text())["results"]
    assert list(saved) == ["base", *peft_study.METHODS]
    assert saved["full"]["trainable"] > 50 * saved["lora"]["trainable"]
    assert all(saved[m]["step_seconds"] > 0 for m in peft_study.METHODS)
    assert (results / "peft_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""From a trained run directory: the generate CLI, load_run and the teacher-forced evaluation."""

import subprocess
import sys

import numpy as np
import pytest

from glm_jax.evaluation import evaluate_run
from glm_jax.infer.generate import Generator, fill_blanks
from glm_jax.run_dir import load_run
from train_fixtures import shared_run, subprocess_env, summary


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return shared_run(tmp_path_factory, "generate", 6, ["train.checkpoint_every = 6", "train.eval_batches = 2"]) / "run"


def test_generate_cli_fills_the_mask(run_dir):
    result = subprocess.run(
        [sys.executable, "-m", "glm_jax", "generate", f"--run_dir={run_dir.name}",  # relative, as users type it
         "--prompt=def add(a, b):\\n    return [MASK]", "--max_new_tokens=6"],
        capture_output=True, text=True, env=subprocess_env(1), cwd=run_dir.parent, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout.rstrip("\n")
    assert text.startswith("def add(a, b):\n    return ") and "[MASK]" not in text, text
    assert "step 6" in result.stderr


def test_fill_blanks_matches_cli_and_eval_matches_training(run_dir):
    run = load_run(run_dir)
    assert run.step == 6 and run.experiment.model.hidden_size == 32
    generator = Generator(run.experiment.model, run.params, run.tokenizer.specials)
    texts = fill_blanks(generator, run.tokenizer, ["x = [MASK] + 1", "import [MASK]"], max_new_tokens=6)
    assert len(texts) == 2 and texts[1].startswith("import ") and "[MASK]" not in texts[1]
    # The teacher-forced eval over the training loop's eval batches gives its eval loss.
    trained = summary(run_dir)["eval"][-1]
    scores = evaluate_run(run, num_batches=2)
    np.testing.assert_allclose(scores["loss"], trained["loss"], rtol=1e-5)
    np.testing.assert_allclose(scores["perplexity"], np.exp(trained["loss"]), rtol=1e-5)
    np.testing.assert_allclose(scores["accuracy"], trained["accuracy"], rtol=1e-5)


def test_load_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.gin"):
        load_run(tmp_path)

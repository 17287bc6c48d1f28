"""Everyday mistakes and faults give clear answers and lose nothing: damaged checkpoints, full disks,
gin typos and wrong types, bad data lines, relative and ~ paths, and no noise a user cannot act on.
(A save killed half-way is tests/test_train.py::test_sigkill_after_checkpoint_resumes_bitwise_...)"""

import errno
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_fixtures import write_text_corpus
from glm_jax import cli
from glm_jax import checkpoint as checkpoint_lib
from glm_jax import experiment as experiment_lib
from glm_jax.checkpoint import CheckpointSaveError, DamagedCheckpoint
from glm_jax.data import corpus
from glm_jax.data.objectives import Objective
from glm_jax.data.pipeline import DataConfig, make_batches
from glm_jax.parallel.batch import check_batch_fits_mesh
from glm_jax.parallel.mesh import MeshConfig, make_mesh
from glm_jax.run_dir import RunDir, load_run
from train_fixtures import REPO, TINY_BINDINGS, experiment, shared_run, subprocess_env, summary, train_in_process


# ------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4, and its own losses (read-only: tests copy it)."""
    return shared_run(tmp_path_factory, "reliability", 4, ["train.checkpoint_every = 2"])


def _params(run_dir: Path, step: int):
    run = RunDir(run_dir)
    return run.restore_params(run.read_experiment().model, step)[0]


def _truncate_an_array(step_dir: Path) -> str:
    files = (step_dir / "params" / "ocdbt.process_0" / "d").iterdir()
    data = max(files, key=lambda f: f.stat().st_size)  # the array data (the others are small index nodes)
    data.write_bytes(data.read_bytes()[:10])
    return "OUT_OF_RANGE"


def _delete_metadata(step_dir: Path) -> str:
    (step_dir / "params" / "_METADATA").unlink()
    return "_METADATA is missing"


def _delete_commit_marker(step_dir: Path) -> str:
    (step_dir / ocp.path.atomicity_types.COMMIT_SUCCESS_FILE).unlink()
    return "commit_success.txt is missing"


@pytest.mark.parametrize("damage", [_truncate_an_array, _delete_metadata, _delete_commit_marker])
def test_a_damaged_checkpoint_is_named_with_its_file_and_the_earlier_one_still_restores(trained, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "run", run_dir)
    expected_message = damage(run_dir / "checkpoints" / "4")
    # Reading it (generate, evaluate, convert) names the step, the file and the earlier step to use.
    with pytest.raises(DamagedCheckpoint, match=rf"step 4 .*{expected_message}.*use an earlier step: \[2\]"):
        load_run(run_dir)
    jax.tree_util.tree_map(np.testing.assert_array_equal, _params(run_dir, 2), _params(trained / "run", 2))


def test_changed_bits_in_a_saved_array_are_found_on_restore(trained, tmp_path):
    """An array that still decodes but holds other bits than were saved (what a flipped bit on disk does
    when the storage layer does not notice) is the damaged-checkpoint path: the step and the array are named."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "run", run_dir)
    params = _params(run_dir, 4)
    path, leaf = jax.tree_util.tree_flatten_with_path(params)[0][0]
    flipped = np.asarray(leaf).copy()
    flipped.reshape(-1).view(np.uint32)[7] ^= 1 << 12  # one bit of one element
    changed = jax.tree_util.tree_map_with_path(lambda p, x: flipped if p == path else x, params)
    other = checkpoint_lib.Checkpointer(tmp_path / "other", async_save=False)
    other.save(4, changed, None, [None], "")
    other.close()
    item = run_dir / "checkpoints" / "4" / "params"
    shutil.rmtree(item)
    shutil.copytree(tmp_path / "other" / "4" / "params", item)  # step 4's meta keeps the checksums of what it saved
    with pytest.raises(DamagedCheckpoint, match=rf"step 4 .*array params{re.escape(jax.tree_util.keystr(path))} "
                                                r"reads back different from what was saved"):
        _params(run_dir, 4)
    np.testing.assert_array_equal(jax.tree_util.tree_leaves(_params(run_dir, 2))[0],
                                  jax.tree_util.tree_leaves(_params(trained / "run", 2))[0])


def test_checksums_see_one_flipped_bit_and_a_swap_of_two_values():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 8)), jnp.bfloat16)
    flipped = np.asarray(x).copy()
    flipped.reshape(-1).view(np.uint16)[100] ^= 1
    swapped = np.asarray(x).copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    sums = [checkpoint_lib.array_checksums({"x": v})["['x']"] for v in (x, np.asarray(x), flipped, swapped)]
    assert sums[0] == sums[1]  # the same bits give the same sum on device and on the host
    assert checkpoint_lib._host_bit_sum(np.asarray(x).T.copy().T, chunk_elements=20) == sums[0]  # in chunks, any layout
    assert len({sums[0], sums[2], sums[3]}) == 3


def test_training_moves_a_damaged_checkpoint_aside_and_resumes_exactly_from_the_previous(trained, tmp_path, capfd):
    run_dir = tmp_path / "run"
    shutil.copytree(trained / "run", run_dir)
    _truncate_an_array(run_dir / "checkpoints" / "4")
    assert cli.main(["generate", f"--run_dir={run_dir}", "--prompt=alpha [MASK]"]) == 2
    assert "checkpoint step 4" in capfd.readouterr().err
    # Training moves it aside (never deletes it), says so, and resumes exactly from step 2.
    resumed = train_in_process(experiment(trained, "run", 4, ["train.checkpoint_every = 2", f"RUN_DIR = '{run_dir}'"]))
    err = capfd.readouterr().err
    assert f"checkpoint step 4 in {run_dir / 'checkpoints'} is damaged" in err and "checkpoints_damaged" in err
    assert (run_dir / "checkpoints_damaged" / "4").is_dir()
    assert resumed["losses"] == summary(trained / "run")["losses"][2:]  # bitwise
    jax.tree_util.tree_map(np.testing.assert_array_equal, _params(run_dir, 4), _params(trained / "run", 4))


def _mount_tmpfs(directory: Path, size: str) -> bool:
    directory.mkdir()
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                              capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def _fail_saves_of(step_to_fail: int, monkeypatch):
    """Makes Orbax's save of `step_to_fail` fail as a full disk does (where no small disk can be mounted)."""
    original = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == step_to_fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)


def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(trained, tmp_path, monkeypatch, capfd):
    """A real full disk (a small tmpfs, where this process may mount one), else an injected ENOSPC."""
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "8m")
    try:
        run_dir = disk / "run"
        shutil.copytree(trained / "run", run_dir, ignore=shutil.ignore_patterns("4"))  # trained to step 2
        if mounted:
            free = shutil.disk_usage(disk).free
            (disk / "filler").write_bytes(b"\0" * (free - 64 * 1024))  # what another job on the disk might do
        else:
            _fail_saves_of(4, monkeypatch)
        with pytest.raises(CheckpointSaveError, match=r"step 4 .*(No space left on device|RESOURCE_EXHAUSTED).*"
                                                      r"newest complete checkpoint is step 2, which is unchanged"):
            train_in_process(experiment(trained, "run", 4, ["train.checkpoint_every = 2", f"RUN_DIR = '{run_dir}'"]))
        assert "Traceback" not in capfd.readouterr().err  # no background thread's traceback beside the one message
        jax.tree_util.tree_map(np.testing.assert_array_equal, _params(run_dir, 2), _params(trained / "run", 2))
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(disk)], check=False)  # writer threads may still hold files


def test_a_read_only_checkpoint_directory_is_named_before_training(trained, tmp_path, monkeypatch):
    """A real read-only file system (a tmpfs remounted read-only, where this process may mount one),
    else a directory whose writes fail with EROFS: one message at start-up, in seconds, nothing changed."""
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "64m")
    try:
        run_dir = disk / "run"
        shutil.copytree(trained / "run", run_dir, ignore=shutil.ignore_patterns("4"))  # trained to step 2
        before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        if not (mounted and subprocess.run(["mount", "-o", "remount,ro", str(disk)]).returncode == 0):
            def read_only(*args, **kwargs):
                raise OSError(errno.EROFS, "Read-only file system")
            monkeypatch.setattr(checkpoint_lib.tempfile, "mkstemp", read_only)
        start = time.time()
        with pytest.raises(CheckpointSaveError, match=r"cannot write checkpoints to .*checkpoints \(Read-only file "
                                                      r"system\); make it writable .* Nothing was trained"):
            train_in_process(experiment(trained, "run", 4, ["train.checkpoint_every = 2", f"RUN_DIR = '{run_dir}'"]))
        assert time.time() - start < 60
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(disk)], check=False)


def test_streamed_write_holds_two_groups_at_most_and_a_failing_producer_leaves_no_step(tmp_path):
    produced, consumed = [], []

    def groups(fail_at=None):
        for i in range(5):
            if i == fail_at:
                raise ValueError("tensor model.layers.3 is unreadable")
            produced.append(i)
            yield {f"layers_{i}": {"w": np.full((4, 4), i, np.float32)}}

    for i, group in enumerate(checkpoint_lib._produced_ahead(groups())):
        assert len(produced) - len(consumed) <= 2  # the one being consumed and at most one made ahead
        assert float(group[f"layers_{i}"]["w"][0, 0]) == i
        consumed.append(i)
    assert consumed == list(range(5))

    with pytest.raises(ValueError, match="model.layers.3 is unreadable"):
        checkpoint_lib.write_streamed(tmp_path / "checkpoints", 0, groups(fail_at=3), [None], "")
    assert not (tmp_path / "checkpoints" / "0").exists()
    assert not any(t.name == "glm_jax-produce-ahead" and t.is_alive() for t in threading.enumerate())

    stream = checkpoint_lib._produced_ahead(groups())  # a consumer that stops early (its write failed)
    next(stream)
    stream.close()
    for thread in [t for t in threading.enumerate() if t.name == "glm_jax-produce-ahead"]:
        thread.join(timeout=10)
        assert not thread.is_alive()  # released, not parked holding a group


# ------------------------------------------------------------------ gin
@pytest.mark.parametrize("binding,message", [
    ("STEP = 50", "sets macro STEP but nothing in the config reads it; did you mean STEPS?"),
    ("NO_SUCH = 1", "sets macro NO_SUCH but nothing in the config reads it; known: RUN_DIR, STEPS"),
    ("train.stepz = 3", "doesn't have a parameter named 'stepz'; did you mean train.steps?"),
    ("Modelconfig.hidden_size = 3", "No configurable matching 'Modelconfig'; did you mean ModelConfig?"),
    ("STEPS = 'abc'", "train.steps = 'abc' (str) must be int"),
    ("ModelConfig.norm = 3", "ModelConfig.norm = 3 (int) must be one of 'layernorm', 'rmsnorm'"),
    ("MeshConfig.num_devices = 2.5", "MeshConfig.num_devices = 2.5 (float) must be int | None"),
    ("STEPS = -5", "train.steps (STEPS) is -5; it must be a whole number >= 0"),
    # each valid alone, wrong together: named before anything compiles (used to train to "loss is nan")
    ("DataConfig.seq_len = 2048", "DataConfig.seq_len = 2048 exceeds ModelConfig.max_position = 1024"),
    ("DataConfig.vocab_size = 9000", "DataConfig.vocab_size = 9000 (the tokenizer trained for this run) exceeds "
                                     "ModelConfig.vocab_size = 8192"),
])
def test_gin_overrides_are_checked(binding, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        experiment_lib.from_gin([REPO / "experiments/configs/glm_tiny_stdlib.gin"], [binding])


@pytest.mark.parametrize("override,message", [
    ("--gin.STEP=50", "gin override 'STEP = 50' sets macro STEP but nothing in the config reads it; did you mean STEPS?"),
    ("--gin.STEPS=-5", "train.steps (STEPS) is -5; it must be a whole number >= 0"),
])
def test_train_command_reports_a_bad_override_in_one_line(capsys, override, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["train", f"--gin_file={REPO / 'experiments/configs/glm_tiny_stdlib.gin'}", override])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"glm_jax train: {message}") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2 and not any(tmp_path.iterdir())  # the message + the traceback hint


def test_a_batch_that_does_not_fit_the_mesh_is_named_before_anything_is_created(tmp_path, capsys):
    run = tmp_path / "run"
    code = cli.main(["train", f"--gin_file={REPO / 'experiments/configs/glm_tiny_stdlib.gin'}",
                     f"--gin.RUN_DIR='{run}'", "--gin.DataConfig.batch_size=2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert ("DataConfig.batch_size = 2 rows cannot be spread over the 8 devices of the mesh's data x fsdp axes "
            "(data=1, stage=1, fsdp=8, sequence=1, tensor=1); use a batch size that is a multiple of 8") in err
    assert not run.exists()
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    with pytest.raises(ValueError, match=r"batch_size = 12 rows cannot be spread over the 8 devices .*\(data=2, stage=1, fsdp=4"):
        check_batch_fits_mesh(12, 1, mesh)
    with pytest.raises(ValueError, match="does not split into OptimizerConfig.grad_accum_steps 3"):
        check_batch_fits_mesh(8, 3, mesh)
    check_batch_fits_mesh(8, 4, mesh)  # 2-row micro-batches on 8 devices: allowed (XLA lays them out)


# ------------------------------------------------------------------ data
def _jsonl(tmp_path: Path, lines: list[str]) -> str:
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    return f"jsonl:{tmp_path}/*.jsonl"


GOOD = json.dumps({"text": "alpha beta. gamma delta! " * 20})


@pytest.mark.parametrize("bad,problem", [
    ("not json", r"a.jsonl:3: not valid JSON"),
    (json.dumps({"title": "no text"}), r"a.jsonl:3: not a JSON object with a string 'text' field"),
    (json.dumps({"text": 5}), r"a.jsonl:3: not a JSON object with a string 'text' field"),
])
def test_bad_jsonl_lines_name_the_file_and_line(tmp_path, bad, problem):
    source = _jsonl(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(ValueError, match=problem + r".*DataConfig.skip_bad_input"):
        list(corpus.read_documents(source))


def test_skipping_bad_input_counts_and_reports_it(tmp_path, capsys):
    source = _jsonl(tmp_path, [GOOD] * 5 + ["not json", json.dumps({"title": "no text"})])
    (tmp_path / "b.jsonl").write_bytes(b"\xff\xfe\x00bad")
    stats = corpus.CorpusStats()
    assert len(list(corpus.read_documents(source, stats=stats, skip_bad_input=True))) == 5
    assert stats.skipped_bad_json == 2 and stats.skipped_non_utf8 == 1
    corpus.report_skipped(source, stats)
    report = capsys.readouterr().err
    assert "skipped 2 malformed jsonl lines and 1 non-UTF-8 files" in report
    assert "a.jsonl:6: not valid JSON" in report and "a.jsonl:7: not a JSON object with a string 'text'" in report
    assert "b.jsonl: not UTF-8" in report


def test_a_directory_as_source_says_which_glob_to_give(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("alpha beta.")
    with pytest.raises(ValueError, match=rf"text:{tmp_path}/docs is a directory; give a glob of its files, "
                                         rf"e.g. 'text:{tmp_path}/docs/\*\*/\*.txt'"):
        corpus.source_files(f"text:{tmp_path}/docs")
    assert corpus.source_files(f"text:{tmp_path}/docs/*") == [tmp_path / "docs" / "a.txt"]  # sub/ is left out


def test_undecodable_text_file_is_named(tmp_path):
    (tmp_path / "good.txt").write_text("alpha beta gamma.")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt is not UTF-8 text \(invalid continuation byte at byte 3\)"):
        list(corpus.read_documents(f"text:{tmp_path}/*.txt"))


def test_too_small_corpus_says_which_setting_to_lower_and_to_what(tmp_path):
    (tmp_path / "t.txt").write_text("\n\n".join(["alpha beta gamma delta. epsilon zeta eta!"] * 20))
    config = DataConfig(source=f"text:{tmp_path}/t.txt", cache_dir=str(tmp_path / "cache"), vocab_size=4000,
                        seq_len=64, batch_size=4)
    with pytest.raises(ValueError, match=r"lower DataConfig.vocab_size to at most \d+"):
        make_batches(config, Objective(), process_index=0, process_count=1)
    small_vocab = DataConfig(**{**config.__dict__, "vocab_size": 300, "num_shards": 4, "eval_fraction": 0.0,
                                "text_split": "line"})
    (tmp_path / "t.txt").write_text("alpha beta gamma delta.\nepsilon zeta eta theta!\n")
    with pytest.raises(ValueError, match=r"set DataConfig.num_shards to at most 2"):
        make_batches(small_vocab, Objective(), process_index=0, process_count=1)


def test_documents_too_short_for_every_example_stop_with_a_message_instead_of_hanging(tmp_path):
    from data_fixtures import small_tokenizer

    (tmp_path / "t.txt").write_text("\n".join(["a."] * 300) + "\n")
    tokenizer = small_tokenizer().save(tmp_path / "tok.model")
    config = DataConfig(source=f"text:{tmp_path}/t.txt", cache_dir=str(tmp_path / "cache"), tokenizer_path=str(tokenizer),
                        seq_len=64, batch_size=4, text_split="line", eval_fraction=0.0, group_size=8)
    one_sentence_each = Objective(token=0.0, sentence=1.0)  # sentence infilling needs two sentences
    batches = make_batches(config, one_sentence_each, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="every one is too short for the objective"):
        next(batches)


# ------------------------------------------------------------------ paths and noise
def test_home_relative_paths_work(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(trained / "run", tmp_path / "myrun")
    run = load_run("~/myrun")
    assert run.directory == tmp_path / "myrun" and run.step == 4
    (tmp_path / "exp.gin").write_text("include 'base.gin'\nRUN_DIR = '~/r'\nSTEPS = 1\n")
    assert experiment_lib.from_gin(["~/exp.gin"]).train.steps == 1


def test_readme_commands_as_written_from_a_fresh_directory(trained, tmp_path):
    """The README's train -> generate -> quantize -> convert -> uptrain chain, typed with relative paths in a new directory
    (a small corpus and model where the README's would be slow)."""
    work = tmp_path / "fresh"
    work.mkdir()
    write_text_corpus(work, count=150)
    env = subprocess_env(2)
    (work / "small.gin").write_text("\n".join(
        TINY_BINDINGS + ["DataConfig.source = 'text:part*.txt'", "DataConfig.cache_dir = 'cache'", "DataConfig.num_shards = None",
           "RUN_DIR = 'runs/mha'", "STEPS = 4", "ModelConfig.num_kv_heads = 4"]) + "\n")

    def run(*argv):
        result = subprocess.run([sys.executable, "-m", "glm_jax", *argv], cwd=work, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    run("train", "--gin_file=small.gin")
    del env["JAX_PLATFORMS"]  # the package pins the CPU itself, as launch.sh does: no libtpu start-up noise
    generated = run("generate", "--run_dir", "runs/mha", "--prompt", "alpha [MASK] gamma", "--max_new_tokens", "4")
    assert generated.stdout.startswith("alpha ") and "Given directory is read only" not in generated.stderr
    assert "TPU" not in generated.stderr and "libtpu" not in generated.stderr
    run("convert", "quantize", "--from", "runs/mha", "--bits", "4", "--group_size", "16", "--out", "runs/mha_int4")
    quantized = run("generate", "--run_dir", "runs/mha_int4", "--prompt", "alpha [MASK] gamma", "--max_new_tokens", "4")
    assert quantized.stdout.startswith("alpha ")
    run("convert", "uptrain", "--from", "runs/mha", "--num_kv_heads", "1", "--method", "mean", "--out", "runs/mqa")
    # Beyond mean pooling: calibrated on the source's own data, whose paths are relative to this directory.
    aligned = run("convert", "uptrain", "--from", "runs/mha", "--num_kv_heads", "2", "--grouping", "similarity",
                  "--method", "aligned", "--out", "runs/gqa2_aligned")
    assert json.loads(aligned.stdout)["calibration_tokens"] > 0
    run("train", "--gin_file=runs/mqa/config.gin")
    assert RunDir(work / "runs" / "mqa").summary()["losses"] and (work / "runs/mqa/checkpoints/1").is_dir()
    # One way to extend any run (the README's), and a copied run trains where it is, not where it was made.
    shutil.copytree(work / "runs" / "mqa", work / "runs" / "copy")
    run("train", "--gin_file=runs/copy/config.gin", "--gin.STEPS=2")
    assert (work / "runs/copy/checkpoints/2").is_dir() and not (work / "runs/mqa/checkpoints/2").exists()


def test_causal_mode_on_a_blank_infilling_model_says_why_and_what_to_use(trained, capsys):
    assert cli.main(["generate", "--run_dir", str(trained / "run"), "--mode", "causal", "--prompt", "alpha beta",
                     "--max_new_tokens", "2"]) == 0
    note = capsys.readouterr().err
    assert "was trained only with blank infilling (Objective: token 1.0" in note and "Use --mode blank" in note
    from glm_jax.cli.generate import causal_mode_hint
    assert causal_mode_hint(Objective(token=0.5, causal=0.5)) is None


# ------------------------------------------------------------------ any input
DOCUMENT = st.one_of(st.binary(max_size=300), st.text(max_size=400), st.just(""), st.just("x" * 30_000),
                     st.text(alphabet="ab .\n", min_size=2000, max_size=6000))


def _write_source(directory: Path, documents: list, kind: str) -> str:
    for i, doc in enumerate(documents):
        if kind == "jsonl" and isinstance(doc, str):
            doc = json.dumps({"text": doc})
        (directory / f"f{i}.{kind}").write_bytes(doc if isinstance(doc, bytes) else doc.encode())
    return f"{kind}:{directory}/*.{kind}"


@hypothesis.settings(max_examples=60, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large])
@hypothesis.given(documents=st.lists(DOCUMENT, min_size=1, max_size=4), kind=st.sampled_from(["text", "jsonl"]),
                  mode=st.sampled_from(["token", "sentence", "document", "causal"]))
def test_any_input_yields_valid_batches_or_a_value_error(documents, kind, mode):
    """Random bytes, unicode, empty and huge documents through the readers, the tokenizer, every objective
    and packing: valid batches that satisfy the mask rule, or a ValueError with a message. Nothing else."""
    import tempfile

    from data_fixtures import small_tokenizer
    from glm_jax.kernels import masks

    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        source = _write_source(directory, documents, kind)
        config = DataConfig(source=source, cache_dir=str(directory / "cache"), seq_len=128, batch_size=2,
                            eval_fraction=0.0, group_size=4)
        try:
            batches = make_batches(config, Objective(**{m: float(m == mode) for m in ("token", "sentence",
                                                                                      "document", "causal")}),
                                   process_index=0, process_count=1, tokenizer=small_tokenizer())
            batch = next(batches)
        except ValueError as error:
            assert str(error).strip()
            return
    segments, prefix = batch["segment_ids"], batch["prefix_mask"]
    assert batch["tokens"].shape == (2, 128) and batch["tokens"].max() < small_tokenizer().vocab_size
    rows = np.arange(128)
    for b in range(2):
        for s in np.unique(segments[b]):
            where = np.flatnonzero(segments[b] == s)
            assert (np.diff(where) == 1).all()  # contiguous segments
            in_prefix = prefix[b, where]
            sep = int(in_prefix.sum())
            assert (in_prefix == (np.arange(len(where)) < sep)).all()  # the prefix opens its segment
            positions = batch["positions"][b, 0, where]
            assert positions[0] == 0 and (positions[:sep] == np.arange(sep)).all()  # positions restart
            assert not (batch["loss_mask"][b, where] * in_prefix).any()  # no loss on Part A
    expected = ((segments[:, :, None] == segments[:, None, :])
                & ((rows[None, None, :] <= rows[None, :, None]) | prefix[:, None, :]))
    np.testing.assert_array_equal(np.asarray(masks.dense_mask(segments, prefix)), expected)
    assert expected.any(axis=-1).all()  # no empty row

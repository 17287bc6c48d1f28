"""Sharded training: mesh equivalence, multi-process, exact resume, resharding, errors, the main command."""

import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from train_fixtures import REPO, experiment, subprocess_env, summary, train_command, train_in_process
from glm_jax import experiment as experiment_lib
from glm_jax.model import ModelConfig, abstract_params
from glm_jax.checkpoint import Checkpointer, CheckpointShapeError, restore_params
from glm_jax.train.loop import TrainingDiverged


def mesh_bindings(data, fsdp, tensor, devices, sharding="fsdp_tp"):
    return [f"MeshConfig.data = {data}", f"MeshConfig.fsdp = {fsdp}", f"MeshConfig.tensor = {tensor}",
            f"MeshConfig.num_devices = {devices}", f"train.sharding = '{sharding}'"]


def test_eight_device_mesh_equals_one_device_and_params_are_sharded(tmp_path):
    sharded = train_in_process(experiment(tmp_path, "mesh8", 5, mesh_bindings(2, 2, 2, 8)))
    single = train_in_process(experiment(tmp_path, "mesh1", 5, mesh_bindings(1, 1, 1, 1)))
    np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-5)
    assert sharded["losses"][-1] < sharded["losses"][0]
    # The parameters really are split: restore them onto the 8-device shardings and look.
    from glm_jax.parallel.mesh import MeshConfig, make_mesh
    from glm_jax.parallel.rules import logical_axis_rules
    from glm_jax.train.state import param_shardings

    config = ModelConfig(vocab_size=512, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                         max_position=128)
    shardings = param_shardings(config, make_mesh(MeshConfig(2, 2, 2)), logical_axis_rules("fsdp_tp"))
    params, step = restore_params(tmp_path / "mesh8", jax.tree_util.tree_map(
        lambda x: x, _unboxed_abstract(config)), shardings=shardings)
    query = params["layers"]["attention"]["query"]["kernel"]
    assert step == 5 and query.sharding.spec == PartitionSpec("stage", ("fsdp", "sequence"), "tensor", None)
    assert len({str(s.index) for s in query.addressable_shards}) == 4  # 2 fsdp x 2 tensor pieces


def _unboxed_abstract(config):
    import flax.linen as nn
    return nn.meta.unbox(abstract_params(config))


def test_multiprocess_run_equals_single_process(tmp_path):
    bindings = experiment(tmp_path, "single", 3)
    subprocess.run(train_command(bindings), check=True, env=subprocess_env(4), capture_output=True)
    bindings = experiment(tmp_path, "multi", 3)
    overrides = [f"--gin_param={b}" for b in bindings if not b.startswith("include")]
    env = subprocess_env(4)
    env["DEVICES_PER_PROCESS"] = "2"
    subprocess.run([str(REPO / "launch.sh"), "multiprocess", "2", str(REPO / "glm_jax/configs/base.gin"),
                    *overrides], check=True, env=env, capture_output=True, timeout=300)
    np.testing.assert_allclose(summary(tmp_path / "multi")["losses"], summary(tmp_path / "single")["losses"],
                               rtol=1e-5)


def two_processes_equal_one(tmp_path, mesh: list[str]) -> None:
    """3 steps on `mesh` over 2 processes x 2 devices (launch.sh multiprocess) give the losses of 1 device."""
    single = train_in_process(experiment(tmp_path, "single", 3, mesh_bindings(1, 1, 1, 1, "fsdp")))
    bindings = experiment(tmp_path, "multi", 3, ["MeshConfig.data = 1", *mesh, "train.sharding = 'fsdp'"])
    overrides = [f"--gin_param={b}" for b in bindings if not b.startswith("include")]
    env = subprocess_env(4)
    env["DEVICES_PER_PROCESS"] = "2"
    done = subprocess.run([str(REPO / "launch.sh"), "multiprocess", "2", str(REPO / "glm_jax/configs/base.gin"),
                           *overrides], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    np.testing.assert_allclose(summary(tmp_path / "multi")["losses"], single["losses"], rtol=1e-5)


@pytest.mark.slow  # 2 processes x 3 steps, about 95 s; the in-process 8-device test covers the split itself
def test_sequence_split_across_two_processes_equals_one_process(tmp_path):
    """MeshConfig.sequence = 4 over 2 processes x 2 devices: both processes load the same rows and each
    places its half of every sequence (parallel.batch.row_shard / global_batch); losses equal 1 device."""
    two_processes_equal_one(tmp_path, ["MeshConfig.fsdp = 1", "MeshConfig.sequence = 4"])


@pytest.mark.slow  # 2 processes x 3 steps, about 90 s; the in-process 8-device test covers the stages themselves
def test_pipeline_stages_across_two_processes_equal_one_process(tmp_path):
    """MeshConfig.stage = 2 over 2 processes x 2 devices: each process holds one stage (the activations cross
    processes at every pipeline shift) and both load the same rows; losses equal 1 device."""
    two_processes_equal_one(tmp_path, ["MeshConfig.fsdp = -1", "MeshConfig.stage = 2"])


def test_sigkill_after_checkpoint_resumes_bitwise_and_partial_saves_are_ignored(tmp_path):
    reference = train_in_process(experiment(tmp_path, "whole", 20, ["train.checkpoint_every = 10"]))
    run_dir = tmp_path / "killed"
    command = train_command(experiment(tmp_path, "killed", 20, ["train.checkpoint_every = 10"]))
    process = subprocess.Popen(command, env=subprocess_env(8), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "10").is_dir() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (run_dir / "checkpoints" / "10").is_dir() and not (run_dir / "checkpoints" / "20").is_dir()
    # What an interrupted async save leaves behind: a temporary step directory.
    partial = run_dir / "checkpoints" / "15.orbax-checkpoint-tmp-1"
    partial.mkdir()
    (partial / "params").mkdir()
    resumed = train_in_process(experiment(tmp_path, "killed", 20, ["train.checkpoint_every = 10"]))
    assert resumed["losses"] == reference["losses"][10:]  # bitwise, data included
    assert not partial.exists()


@pytest.mark.slow  # 40 s; the default run's pipeline test restores onto another mesh (4 x 2 -> 2 x 2 x 2) the same way
def test_restore_onto_a_smaller_mesh(tmp_path):
    big = experiment(tmp_path, "big", 3, mesh_bindings(2, 2, 2, 8) + ["train.checkpoint_every = 3"])
    train_in_process(big)
    shutil.copytree(tmp_path / "big", tmp_path / "small")
    continued_big = train_in_process(experiment(tmp_path, "big", 4, mesh_bindings(2, 2, 2, 8)))
    continued_small = train_in_process(experiment(tmp_path, "small", 4, mesh_bindings(1, 2, 1, 2, "fsdp")))
    np.testing.assert_allclose(continued_small["losses"], continued_big["losses"], rtol=1e-5)
    config = ModelConfig(vocab_size=512, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                         max_position=128)
    a, _ = restore_params(tmp_path / "big", _unboxed_abstract(config), step=3)
    b, _ = restore_params(tmp_path / "small", _unboxed_abstract(config), step=3)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_context_parallel_training_equals_one_device_and_resumes_on_one(tmp_path):
    """4-way sequence x 2 data (every sequence split over 4 devices, glm_jax/kernels/context_parallel.py) trains
    like one device, and its checkpoint continues on a mesh without the split to the same next loss."""
    one = train_in_process(experiment(tmp_path, "one", 4, mesh_bindings(1, 1, 1, 1, "fsdp")))
    split = experiment(tmp_path, "split", 3, mesh_bindings(2, 1, 1, 8, "fsdp") + ["MeshConfig.sequence = 4"])
    np.testing.assert_allclose(train_in_process(split)["losses"], one["losses"][:3], rtol=1e-5)
    resumed = train_in_process(experiment(tmp_path, "split", 4, mesh_bindings(1, 1, 1, 1, "fsdp")))
    np.testing.assert_allclose(resumed["losses"], one["losses"][3:], rtol=1e-5)
    # The run decodes like any other (decoding never splits sequences): greedy tokens as one device's.
    from glm_jax.infer import prompts
    from glm_jax.infer.generate import Generator
    from glm_jax.run_dir import load_run

    outputs = []
    for name in ("split", "one"):
        run = load_run(tmp_path / name)
        batch = prompts.make_prompt_batch([np.arange(5, 25, dtype=np.int32)] * 2, run.tokenizer.specials, "causal")
        outputs.append(Generator(run.model, run.params, run.tokenizer.specials).generate(batch, "causal", 6)["tokens"])
    np.testing.assert_array_equal(*outputs)


def test_pipeline_stages_train_like_one_device_and_resume_on_fewer_stages(tmp_path):
    """4 stages x 2 data, then 2 stages x 2 fsdp x 2 tensor (glm_jax/model/pipeline_parallel.py) train like one
    device; the 4-stage checkpoint continues on 2 stages with the same parameters and the same next loss."""
    layers = ["ModelConfig.num_layers = 4", "ModelConfig.pipeline_microbatches = 2"]
    one = train_in_process(experiment(tmp_path, "one", 4, mesh_bindings(1, 1, 1, 1) + layers))
    four = train_in_process(experiment(tmp_path, "staged", 3, mesh_bindings(2, 1, 1, 8) + layers + [
        "MeshConfig.stage = 4"]))
    np.testing.assert_allclose(four["losses"], one["losses"][:3], rtol=1e-5)
    two = train_in_process(experiment(tmp_path, "staged", 4, mesh_bindings(1, 2, 2, 8) + layers + [
        "MeshConfig.stage = 2"]))
    np.testing.assert_allclose(two["losses"], one["losses"][3:], rtol=1e-5)
    # The step-3 parameters read onto the 2-stage layout are the saved ones, bit for bit.
    from glm_jax.parallel.mesh import MeshConfig, make_mesh
    from glm_jax.parallel.rules import logical_axis_rules
    from glm_jax.train.state import param_shardings

    config = ModelConfig(vocab_size=512, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=64,
                         max_position=128)
    shardings = param_shardings(config, make_mesh(MeshConfig(1, 2, 2, stage=2)), logical_axis_rules("fsdp_tp"))
    staged, _ = restore_params(tmp_path / "staged", _unboxed_abstract(config), step=3, shardings=shardings)
    whole, _ = restore_params(tmp_path / "staged", _unboxed_abstract(config), step=3)
    jax.tree_util.tree_map(np.testing.assert_array_equal, staged, whole)
    assert staged["layers"]["mlp"]["wi"]["kernel"].sharding.spec[0] == "stage"


def test_shape_mismatch_names_the_parameter(tmp_path):
    train_in_process(experiment(tmp_path, "run", 1))
    wrong = ModelConfig(vocab_size=512, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                        max_position=128)
    with pytest.raises(CheckpointShapeError, match=r"\['block_position_embedding'\] has shape \(128, 32\).*\(128, 48\)"):
        restore_params(tmp_path / "run", _unboxed_abstract(wrong))
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        restore_params(tmp_path / "absent", _unboxed_abstract(wrong))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    train_in_process(experiment(tmp_path, "nan", 2))
    # Steps 3..6 are one metrics window (train.log_every = 10): the NaN is found at its exact step.
    with pytest.raises(TrainingDiverged, match=r"at step 4; stopped without saving \(steps 3\.\.6 ran.*"
                                               r"last good checkpoint is step 2"):
        train_in_process(experiment(tmp_path, "nan", 6, ["OptimizerConfig.learning_rate = 1e30",
                                                         "OptimizerConfig.grad_clip = 1e30"]))
    assert Checkpointer(tmp_path / "nan" / "checkpoints").latest_step() == 2


def test_steps_between_metric_fetches_read_nothing_from_the_device(tmp_path, monkeypatch):
    """Every host read of a jax.Array goes through ArrayImpl._value; within a window of
    train.log_every steps the loop must not make one (it would serialise host and device)."""
    from jax._src import array as jax_array
    from glm_jax.train import loop

    reads, at_step = [0], {}
    value = jax_array.ArrayImpl._value

    def counted(self):
        reads[0] += 1
        return value.fget(self)

    add = loop._MetricsWindow.add

    def add_and_record(self, step, *args):
        at_step[step] = reads[0]
        return add(self, step, *args)

    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(counted))
    monkeypatch.setattr(loop._MetricsWindow, "add", add_and_record)
    result = train_in_process(experiment(tmp_path, "windows", 8, ["train.log_every = 4"]))
    assert len(result["losses"]) == 8 and all(np.isfinite(result["losses"]))
    assert at_step[1] == at_step[2] == at_step[3] == at_step[4]  # steps 1..4: one window, no reads
    assert at_step[5] == at_step[6] == at_step[7] == at_step[8]
    assert at_step[5] > at_step[4]  # the fetch after step 4 (a control: the counter sees reads)


def test_unknown_gin_binding_fails_fast_with_the_file(tmp_path):
    bad = tmp_path / "typo.gin"
    bad.write_text("include 'base.gin'\nModelConfig.hiden_size = 12\n")
    with pytest.raises(ValueError, match=r"typo\.gin.*hiden_size"):
        experiment_lib.from_gin([bad], [])
    result = subprocess.run(train_command(["train.stepz = 3"]), env=subprocess_env(1), capture_output=True, text=True)
    assert result.returncode != 0 and "stepz" in result.stderr


def test_main_command_trains_on_stdlib(tmp_path):
    run_dir = tmp_path / "main"
    result = subprocess.run([str(REPO / "launch.sh"), "train", "experiments/configs/glm_tiny_stdlib.gin",
                             "--gin.STEPS=8", f"--gin.RUN_DIR='{run_dir}'", "--gin.train.eval_every=8",
                             "--gin.DataConfig.seq_len=128"],
                            cwd=REPO, env=subprocess_env(8), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = summary(run_dir)["losses"]
    assert np.mean(losses[-3:]) < losses[0] - 0.5  # visibly falling
    assert (run_dir / "checkpoints" / "8").is_dir() and (run_dir / "tokenizer.model").is_file()
    assert "ModelConfig.hidden_size = 256" in (run_dir / "config.gin").read_text()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "done: train loss" in result.stdout


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    whole = train_in_process(experiment(tmp_path, "accum1", 3))
    accumulated = train_in_process(experiment(tmp_path, "accum4", 3, ["OptimizerConfig.grad_accum_steps = 4"]))
    np.testing.assert_allclose(accumulated["losses"], whole["losses"], rtol=1e-5)


def start_and_wait_for_steps(tmp_path, name: str, extra=()) -> subprocess.Popen:
    """A long tiny run in a subprocess, returned once it has written its first checkpoint."""
    run_dir = tmp_path / name
    process = subprocess.Popen(train_command(experiment(tmp_path, name, 10_000, extra)), env=subprocess_env(2),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not any(p.name.isdigit() for p in (run_dir / "checkpoints").glob("*")) and time.time() < deadline:
        time.sleep(0.1)  # compiled, and saving every step from now on (temporary step directories do not count)
    return process


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 0, "preempted"), (signal.SIGINT, 130, "interrupted")])
def test_sigterm_and_ctrl_c_save_and_exit_cleanly(tmp_path, sig, code, word):
    # A save every step, so one is in flight when the signal arrives: it must complete.
    process = start_and_wait_for_steps(tmp_path, "stopped", ["train.checkpoint_every = 1"])
    process.send_signal(sig)
    out, err = process.communicate(timeout=240)
    assert process.returncode == code and word in out, err
    assert "Traceback" not in err
    done = summary(tmp_path / "stopped")
    assert done["stopped_by"] == sig.name
    checkpoints = Checkpointer(tmp_path / "stopped" / "checkpoints")
    assert checkpoints.latest_step() == len(done["losses"])


def test_a_second_ctrl_c_exits_at_once_and_keeps_the_newest_complete_checkpoint(tmp_path):
    process = start_and_wait_for_steps(tmp_path, "twice", ["train.checkpoint_every = 1"])
    process.send_signal(signal.SIGINT)
    # The second goes out as soon as the first is handled (its message is printed), while the run
    # is still finishing its step and saving: a fixed wait raced a tiny run's quick clean exit.
    seen = []
    while not any("Ctrl-C again exits at once" in line for line in seen):
        line = process.stderr.readline()  # text mode: tqdm's \r ends a line too
        assert line, f"the run ended before handling the first Ctrl-C: {''.join(seen)[-2000:]}"
        seen.append(line)
    process.send_signal(signal.SIGINT)
    start = time.time()
    _, rest = process.communicate(timeout=60)
    err = "".join(seen) + rest
    assert process.returncode == -signal.SIGINT and time.time() - start < 10, err[-2000:]  # a shell reports 130
    assert "Traceback" not in err
    config = experiment_lib.from_gin([], experiment(tmp_path, "twice", 10_000)).model
    _, step = restore_params(tmp_path / "twice", _unboxed_abstract(config))  # the newest complete step restores
    assert step >= 1


def test_launcher_usage_and_dry_runs():
    launch = str(REPO / "launch.sh")
    bad = subprocess.run([launch, "fly"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage:" in bad.stderr
    missing = subprocess.run([launch, "train"], capture_output=True, text=True)
    assert missing.returncode == 2 and "usage:" in missing.stderr
    tpu = subprocess.run([launch, "tpu", "pod", "us-central2-b", "experiments/configs/glm_tiny_stdlib.gin",
                          "--gin.STEPS=5", "--dry-run"], capture_output=True, text=True, cwd=REPO)
    assert tpu.returncode == 0 and "--worker=all" in tpu.stdout and "GLM_JAX_DISTRIBUTED=auto" in tpu.stdout
    slurm = subprocess.run([launch, "slurm", "experiments/configs/glm_tiny_stdlib.gin", "--dry-run"],
                           capture_output=True, text=True, cwd=REPO)
    assert slurm.returncode == 0 and slurm.stdout.startswith("srun")

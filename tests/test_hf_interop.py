"""Hugging Face / THUDM checkpoints in and out (glm_jax/convert/hf.py), without torch.

Golden parity: the committed fixtures (tests/fixtures/make_hf_fixtures.py) are small random
transformers GlmForCausalLM / Glm4ForCausalLM models with their own float32 logits; the THUDM
layouts are written out by hand in tests/hf_fixtures.py from the reference code's naming and fusing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
from safetensors.numpy import load_file  # noqa: E402

from glm_jax.convert.hf import CheckpointFormatError, export_hf, import_hf  # noqa: E402
from glm_jax.convert.hf_layouts import LayoutError  # noqa: E402
from glm_jax.model import ModelConfig  # noqa: E402
from glm_jax.run_dir import load_run  # noqa: E402
from hf_fixtures import (CHATGLM2_TINY, CHATGLM6B_TINY, FIXTURE_NAMES, FIXTURES, causal_inputs,  # noqa: E402
                         chatglm2_checkpoint, chatglm6b_checkpoint, glm_inputs, logits, random_params,
                         write_chatglm_tokenizer, write_checkpoint)

REPO = Path(__file__).resolve().parents[1]


def tensors_of(directory: Path) -> dict:
    out = {}
    for f in sorted(directory.glob("model*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_trees_equal(a, b):
    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8))  # bit for bit


# ------------------------------------------------------------------ golden parity (layouts a, b)
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_imported_logits_equal_transformers_logits(name, tmp_path):
    import_hf(FIXTURES / name, tmp_path / "run")
    run = load_run(tmp_path / "run")
    reference = load_file(str(FIXTURES / name / "reference_logits.safetensors"))
    ours = logits(run.experiment.model, run.params, causal_inputs(reference["input_ids"]))
    np.testing.assert_allclose(ours, reference["logits"], atol=1e-5, rtol=0)
    source = json.loads((FIXTURES / name / "config.json").read_text())
    assert run.experiment.model.num_kv_heads == source["num_key_value_heads"]
    assert run.experiment.model.residual == ("sandwich" if source["model_type"] == "glm4" else "pre")


def test_fixtures_cover_attention_kinds_rotary_fractions_and_sharding():
    configs = [json.loads((FIXTURES / n / "config.json").read_text()) for n in FIXTURE_NAMES]
    kinds = {(c["model_type"], c["num_key_value_heads"], c["rope_parameters"]["partial_rotary_factor"])
             for c in configs}
    assert kinds == {(t, g, r) for t in ("glm", "glm4") for g in (4, 2, 1) for r in (0.5, 1.0)}
    assert any((FIXTURES / n / "model.safetensors.index.json").is_file() for n in FIXTURE_NAMES)


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name", ["glm_gqa_rot50", "glm4_mqa_rot100"])
def test_export_reproduces_the_source_tensors_bit_for_bit(name, tmp_path):
    import_hf(FIXTURES / name, tmp_path / "run")
    summary = export_hf(tmp_path / "run", tmp_path / "hf", max_shard_size="30KB")
    assert len(summary["files"]) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    source, exported = tensors_of(FIXTURES / name), tensors_of(tmp_path / "hf")
    assert source.keys() == exported.keys()
    for key in source:
        assert np.array_equal(source[key], exported[key]), key
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == json.loads((FIXTURES / name / "config.json").read_text())["architectures"]
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (FIXTURES / name / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_import_of_export_is_the_identity(dtype, tmp_path):
    import_hf(FIXTURES / "glm4_gqa_rot50", tmp_path / "a", dtype=dtype)
    export_hf(tmp_path / "a", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "b")
    first, second = load_run(tmp_path / "a"), load_run(tmp_path / "b")
    assert second.experiment.model == first.experiment.model
    assert_trees_equal(first.params, second.params)
    assert jax.tree_util.tree_leaves(second.params)[0].dtype == np.dtype(dtype)
    if dtype == "bfloat16":  # bf16 is stored as bf16 on disk, not widened
        assert {v.dtype for v in tensors_of(tmp_path / "hf").values()} == {np.dtype(ml_dtypes.bfloat16)}


# ------------------------------------------------------------------ THUDM layouts (c, d)
@pytest.mark.parametrize("num_kv_heads", [2, 4], ids=["multi_query_groups", "per_head_fused"])
def test_chatglm2_layout_imports_to_the_same_model_and_exports_back(num_kv_heads, tmp_path):
    model = ModelConfig(**CHATGLM2_TINY, num_kv_heads=num_kv_heads)
    params = random_params(model, seed=num_kv_heads)
    config, tensors = chatglm2_checkpoint(model, params)
    write_checkpoint(tmp_path / "thudm", config, tensors)
    (tmp_path / "thudm" / "tokenizer.json").unlink()  # THUDM ships a SentencePiece tokenizer.model instead
    write_chatglm_tokenizer(tmp_path / "thudm", roles=num_kv_heads == 2)
    import_hf(tmp_path / "thudm", tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert run.experiment.model == model.replace(param_dtype="float32")
    assert run.tokenizer.vocab_size == run.tokenizer.sp.get_piece_size() + (9 if num_kv_heads == 2 else 5)
    ids = np.random.default_rng(0).integers(0, 96, (2, 12))
    np.testing.assert_allclose(logits(run.experiment.model, run.params, causal_inputs(ids)),
                               logits(model.replace(scan_layers=False), params, causal_inputs(ids)), atol=1e-6, rtol=0)
    export_hf(tmp_path / "run", tmp_path / "back")
    exported = tensors_of(tmp_path / "back")
    assert exported.keys() == tensors.keys()
    for key, value in tensors.items():
        assert np.array_equal(exported[key], value), key
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert {k: back[k] for k in config} == config
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == (tmp_path / "thudm" / "tokenizer.model").read_bytes()


def test_chatglm6b_layout_imports_to_the_same_model_and_exports_back(tmp_path):
    model = ModelConfig(**CHATGLM6B_TINY)
    params = random_params(model, seed=7)
    config, tensors = chatglm6b_checkpoint(model, params)
    write_checkpoint(tmp_path / "thudm", config, tensors)
    import_hf(tmp_path / "thudm", tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert run.experiment.model == model
    ids = np.random.default_rng(1).integers(0, 96, (2, 12))
    inputs = glm_inputs(ids, prefix=7)  # 2D positions: block positions exercise both halves of the 2D RoPE
    np.testing.assert_allclose(logits(run.experiment.model, run.params, inputs),
                               logits(model.replace(scan_layers=False), params, inputs), atol=1e-6, rtol=0)
    export_hf(tmp_path / "run", tmp_path / "back")
    exported = tensors_of(tmp_path / "back")
    assert exported.keys() == tensors.keys()
    for key, value in tensors.items():
        assert np.array_equal(exported[key], value), key


def test_export_refuses_a_layout_that_cannot_hold_the_model(tmp_path):
    import_hf(FIXTURES / "glm_gqa_rot50", tmp_path / "run")
    with pytest.raises(LayoutError, match="cannot be written in the 'chatglm6b' layout"):
        export_hf(tmp_path / "run", tmp_path / "hf", layout_name="chatglm6b")
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------ tokenizer
def test_imported_tokenizer_takes_special_ids_from_the_checkpoint(tmp_path):
    import_hf(FIXTURES / "glm_mha_rot50", tmp_path / "run")
    tokenizer = load_run(tmp_path / "run").tokenizer
    table = json.loads((FIXTURES / "glm_mha_rot50" / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in table}
    s = tokenizer.specials
    assert (s.gmask, s.sop, s.eop, s.eos, s.mask, s.smask) == (
        ids["[gMASK]"], ids["<sop>"], ids["<eop>"], ids["<|endoftext|>"], ids["[MASK]"], ids["[sMASK]"])
    assert s.cls is None and tokenizer.prefix == (s.gmask, s.sop)
    text = "def add(a, b):\n    return a + b\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.sentence_end[tokenizer.encode(".")].all()


# ------------------------------------------------------------------ bad input: a clear error, nothing written
def _copy_fixture(name: str, destination: Path) -> Path:
    shutil.copytree(FIXTURES / name, destination)
    return destination


def _expect_error(source: Path, out: Path, error, match: str):
    with pytest.raises(error, match=match):
        import_hf(source, out)
    assert not out.exists() and not out.with_name(out.name + ".importing").exists()


def test_unknown_architecture_names_what_was_found_and_what_is_supported(tmp_path):
    source = _copy_fixture("glm_mha_rot50", tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (source / "config.json").write_text(json.dumps(config))
    _expect_error(source, tmp_path / "out", LayoutError, r"model_type 'llama'.*LlamaForCausalLM.*Supported: glm")


def test_missing_shard_is_named(tmp_path):
    source = _copy_fixture("glm_gqa_rot50", tmp_path / "src")
    (source / "model-00002-of-00005.safetensors").unlink()
    _expect_error(source, tmp_path / "out", CheckpointFormatError, "shard model-00002-of-00005.safetensors")


def test_tensor_of_the_wrong_shape_names_the_tensor_and_both_shapes(tmp_path):
    source = _copy_fixture("glm_mha_rot50", tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    config["intermediate_size"] = 44
    (source / "config.json").write_text(json.dumps(config))
    _expect_error(source, tmp_path / "out", CheckpointFormatError,
                  r"model.layers.0.mlp.gate_up_proj.weight has shape \(80, 32\).*implies \(88, 32\)")


def test_missing_tokenizer_is_an_error(tmp_path):
    source = _copy_fixture("glm_mha_rot50", tmp_path / "src")
    (source / "tokenizer.json").unlink()
    _expect_error(source, tmp_path / "out", CheckpointFormatError, "no tokenizer.json")


def test_pickle_only_checkpoint_is_refused_without_being_opened(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    shutil.copyfile(FIXTURES / "glm_mha_rot50" / "config.json", source / "config.json")
    (source / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be read")
    _expect_error(source, tmp_path / "out", CheckpointFormatError, r"pickle.*safe_serialization=True")


def test_existing_output_is_refused_unless_forced(tmp_path):
    import_hf(FIXTURES / "glm_mha_rot50", tmp_path / "run")
    before = (tmp_path / "run" / "config.gin").read_text()
    with pytest.raises(FileExistsError, match="--force"):
        import_hf(FIXTURES / "glm4_mha_rot50", tmp_path / "run")
    assert (tmp_path / "run" / "config.gin").read_text() == before
    import_hf(FIXTURES / "glm4_mha_rot50", tmp_path / "run", force=True)
    assert load_run(tmp_path / "run").experiment.model.residual == "sandwich"
    assert not (tmp_path / "run.replaced").exists()


# ------------------------------------------------------------------ the README workflow, as typed
def _cli(cwd: Path, *args: str, timeout: int = 300) -> str:
    result = subprocess.run([sys.executable, "-m", "glm_jax", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_readme_workflow_import_generate_uptrain_train_export(tmp_path):
    """import -> generate -> convert uptrain --num_kv_heads 1 -> train -> export, relative paths from a fresh dir."""
    shutil.copytree(FIXTURES / "glm_mha_rot50", tmp_path / "glm-4-tiny-hf")
    (tmp_path / "notes.txt").write_text("".join(f"def add_{k}(a, b):\n    return a + b + {k}\n\n" for k in range(200)))
    _cli(tmp_path, "convert", "import-hf", "--from", "glm-4-tiny-hf", "--out", "runs/glm4")
    out = _cli(tmp_path, "generate", "--run_dir", "runs/glm4", "--mode", "causal", "--prompt", "def add",
               "--max_new_tokens", "4")
    assert out.strip()
    _cli(tmp_path, "convert", "uptrain", "--from", "runs/glm4", "--num_kv_heads", "1", "--out", "runs/glm4_mqa")
    _cli(tmp_path, "train", "--gin_file=runs/glm4_mqa/config.gin", "--gin.STEPS=2",
         "--gin.DataConfig.source='text:notes.txt'", "--gin.DataConfig.seq_len=32", "--gin.DataConfig.batch_size=8",
         "--gin.train.eval_every=2", "--gin.train.eval_batches=1", "--gin.train.checkpoint_every=2", "--gin.DataConfig.num_shards=1")
    _cli(tmp_path, "convert", "export-hf", "--from", "runs/glm4_mqa", "--out", "glm-4-tiny-mqa-hf")
    config = json.loads((tmp_path / "glm-4-tiny-mqa-hf" / "config.json").read_text())
    assert config["num_key_value_heads"] == 1 and config["architectures"] == ["GlmForCausalLM"]
    exported = tensors_of(tmp_path / "glm-4-tiny-mqa-hf")
    assert exported["model.layers.0.self_attn.k_proj.weight"].shape == (8, 32)


# ------------------------------------------------------------------ streaming: memory stays a layer, not a model
def test_streaming_import_peak_memory_stays_well_under_the_checkpoint_size(tmp_path):
    """The benchmark's small case (experiments/benchmarks/import_hf.py --size small): 0.6 GB bf16 in 3 shards."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("import_hf_bench", REPO / "experiments/benchmarks/import_hf.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure("small", tmp_path)
    growth = result["peak_rss_bytes"] - result["baseline_rss_bytes"]
    assert growth < 0.5 * result["checkpoint_bytes"], result


def test_rope_scaling_of_a_config_json_maps_onto_the_model_config_or_is_refused():
    from glm_jax.convert import hf_layouts

    base = dict(model_type="glm", vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                num_attention_heads=4, head_dim=8, max_position_embeddings=64)
    glm = hf_layouts.LAYOUTS["glm"]
    yarn = glm.model_config({**base, "rope_parameters": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 5e5,
                                                          "original_max_position_embeddings": 8192}})
    assert (yarn.rope_scaling, yarn.rope_scaling_factor, yarn.rope_original_context, yarn.rope_theta) == \
        ("yarn", 8.0, 8192, 5e5)
    legacy = glm.model_config({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})  # transformers 4 field
    assert (legacy.rope_scaling, legacy.rope_scaling_factor) == ("linear", 2.0)
    with pytest.raises(hf_layouts.LayoutError, match="rope_type 'dynamic', which glm_jax does not compute"):
        glm.model_config({**base, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(hf_layouts.LayoutError, match="sets {'beta_fast': 16}"):
        glm.model_config({**base, "rope_parameters": {"rope_type": "yarn", "factor": 2.0, "beta_fast": 16}})
    ntk = yarn.replace(rope_scaling="ntk")
    with pytest.raises(hf_layouts.LayoutError, match="rope_scaling is 'ntk'"):
        glm.hf_config(ntk, None)
    theta = yarn.replace(rope_scaling="theta", rope_scaling_factor=4.0)  # exported as the scaled base
    assert glm.hf_config(theta, None)["rope_parameters"] == {"rope_theta": 2e6, "partial_rotary_factor": 0.5,
                                                             "rope_type": "default"}

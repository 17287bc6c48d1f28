"""Live parity against transformers in-process (marked `hf`; skipped where torch / transformers are absent).

    .venv/bin/pip install torch==2.13.0 transformers && ./launch.sh test -m hf

import -> glm_jax logits == transformers logits; export -> from_pretrained -> the same logits;
and a model converted to MQA by `convert uptrain` exports with num_key_value_heads = 1 and
transformers reproduces glm_jax's logits of the converted model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from glm_jax.convert.hf import export_hf, import_hf  # noqa: E402
from glm_jax.convert.uptrain import convert_run  # noqa: E402
from glm_jax.run_dir import load_run  # noqa: E402
from hf_fixtures import causal_inputs, copy_tokenizer, logits  # noqa: E402

pytestmark = pytest.mark.hf
IDS = np.random.default_rng(0).integers(0, 96, (2, 11))


def make_model(architecture: str, kv_heads: int, rotary: float, directory, scaling: dict | None = None):
    config_class, model_class = {"glm": (transformers.GlmConfig, transformers.GlmForCausalLM),
                                 "glm4": (transformers.Glm4Config, transformers.Glm4ForCausalLM)}[architecture]
    torch.manual_seed(kv_heads)
    config = config_class(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8,
                          max_position_embeddings=64, rms_norm_eps=1e-5, attention_bias=True,
                          tie_word_embeddings=False, pad_token_id=86, eos_token_id=86,
                          rope_parameters={"rope_type": "default", "rope_theta": 5000.0,
                                           "partial_rotary_factor": rotary, **(scaling or {})})
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn_like(param))
    model.save_pretrained(directory, safe_serialization=True)
    copy_tokenizer(directory)
    return model


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(IDS).long()).logits.float().numpy()


@pytest.mark.parametrize("architecture", ["glm", "glm4"])
@pytest.mark.parametrize("kv_heads,rotary", [(4, 0.5), (2, 1.0), (1, 0.5)], ids=["mha", "gqa", "mqa"])
def test_transformers_parity_both_ways(architecture, kv_heads, rotary, tmp_path):
    reference = make_model(architecture, kv_heads, rotary, tmp_path / "hf")
    expected = torch_logits(reference)
    import_hf(tmp_path / "hf", tmp_path / "run")
    run = load_run(tmp_path / "run")
    np.testing.assert_allclose(logits(run.experiment.model, run.params, causal_inputs(IDS)), expected, atol=1e-5)
    export_hf(tmp_path / "run", tmp_path / "back")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(reloaded) is type(reference)
    np.testing.assert_array_equal(torch_logits(reloaded), expected)


@pytest.mark.parametrize("architecture", ["glm", "glm4"])
def test_uptrained_mqa_model_loads_in_transformers_with_the_same_logits(architecture, tmp_path):
    make_model(architecture, 4, 0.5, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    convert_run(tmp_path / "run", 1, "mean", tmp_path / "mqa")
    converted = load_run(tmp_path / "mqa")
    ours = logits(converted.experiment.model, converted.params, causal_inputs(IDS))
    export_hf(tmp_path / "mqa", tmp_path / "mqa_hf")
    assert json.loads((tmp_path / "mqa_hf" / "config.json").read_text())["num_key_value_heads"] == 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mqa_hf").eval()
    np.testing.assert_allclose(torch_logits(reloaded), ours, atol=1e-5)


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}],
                         ids=["linear", "yarn"])
def test_rope_scaling_imports_and_exports_with_transformers_logits(scaling, tmp_path):
    """transformers' own linear and YaRN RoPE (modeling_rope_utils) is the reference for ours."""
    reference = make_model("glm", 2, 0.5, tmp_path / "hf", scaling)
    expected = torch_logits(reference)
    import_hf(tmp_path / "hf", tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert (run.experiment.model.rope_scaling, run.experiment.model.rope_scaling_factor) == (scaling["rope_type"], 4.0)
    np.testing.assert_allclose(logits(run.experiment.model, run.params, causal_inputs(IDS)), expected, atol=1e-5)
    unscaled = make_model("glm", 2, 0.5, tmp_path / "plain")
    assert np.abs(torch_logits(unscaled) - expected).max() > 1e-4  # the scaling changes the function (1e-5 above)
    export_hf(tmp_path / "run", tmp_path / "back")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    np.testing.assert_allclose(torch_logits(reloaded), expected, atol=1e-6)

"""Weight-only INT8 / INT4 quantization: the scheme against numpy, packing, quantized == dequantized
float model, cached decoding, the convert command, memory of the compiled decoder, bad input."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.infer.generate import Generator
from glm_jax.infer.prompts import prompt_batch_shapes
from glm_jax.infer.sampling import SamplingConfig
from glm_jax.model import (GLM, ModelConfig, abstract_params, example_inputs, init_params, param_bytes,
                           quantize_params)
from glm_jax.model import quantization as q
from test_generate import (SPECIALS, check_blank_decode_matches_full_forward, check_causal_decode_matches_full_forward,
                           tiny_config)
from train_fixtures import shared_run

SCHEMES = [(8, None), (8, 16), (4, None), (4, 16)]


def numpy_quantize(kernel: np.ndarray, num_in_axes: int, bits: int, group_size):
    """GLM-130B's scheme written out in float64 numpy: w [out, in] (torch's layout), per output
    row or per group of inputs: scale = absmax / (2^(bits-1) - 1), q = round(w / scale)."""
    in_features = int(np.prod(kernel.shape[:num_in_axes]))
    out_shape = kernel.shape[num_in_axes:]
    w = kernel.astype(np.float64).reshape(in_features, -1).T.reshape(*out_shape, in_features)
    group = group_size or in_features
    grouped = w.reshape(*out_shape, in_features // group, group)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(grouped).max(axis=-1) / qmax
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    values = np.clip(np.round(grouped / safe), -qmax, qmax)
    return values.reshape(*out_shape, in_features).astype(np.int8), scale


@pytest.mark.parametrize("bits,group_size", SCHEMES)
@pytest.mark.parametrize("shape,num_in_axes", [((64, 4, 8), 1), ((4, 8, 48), 2)])
def test_quantize_matches_numpy_and_the_round_trip_error_is_half_a_step(bits, group_size, shape, num_in_axes):
    rng = np.random.default_rng(bits + (group_size or 0))
    kernel = rng.normal(0, 0.02, shape).astype(np.float32)
    kernel.reshape(-1)[:5] = [0.5, -0.7, 0.0, 1e-6, -1e-6]  # outliers and near-zeros in the first rows
    qkernel, scale = q.quantize_kernel(jnp.asarray(kernel), num_in_axes, bits, group_size)
    expected_q, expected_scale = numpy_quantize(kernel, num_in_axes, bits, group_size)
    values = q.unpack_int4(qkernel) if bits == 4 else qkernel
    np.testing.assert_allclose(np.asarray(scale), expected_scale, rtol=1e-6)
    # float32 vs float64 division may round an exact .5 differently: at most one step, rarely
    mismatch = np.asarray(values) != expected_q
    assert mismatch.mean() < 1e-3 and np.all(np.abs(np.asarray(values, np.int32) - expected_q)[mismatch] == 1)
    assert np.abs(expected_q).max() <= 2 ** (bits - 1) - 1

    w = np.asarray(q.dequantize(qkernel, scale, bits))  # [*out, in]
    reference = expected_q * np.repeat(expected_scale, (expected_q.shape[-1] // expected_scale.shape[-1]), axis=-1)
    np.testing.assert_allclose(w, reference, rtol=1e-6, atol=1e-9)
    original = kernel.reshape(w.shape[-1], -1).T.reshape(w.shape)
    step = np.repeat(np.asarray(scale), w.shape[-1] // scale.shape[-1], axis=-1)
    assert np.all(np.abs(w - original) <= step / 2 + 1e-7)  # absmax rounding never clips


def test_int4_packing_is_exact_for_every_byte_and_matches_a_bitcast():
    every_byte = jnp.arange(256, dtype=jnp.uint8).reshape(16, 16)
    nibbles = q.unpack_int4(every_byte)
    low = ((np.arange(256) & 0xF) ^ 8) - 8  # two's complement of the low nibble
    high = ((np.arange(256) >> 4) ^ 8) - 8
    np.testing.assert_array_equal(np.asarray(nibbles).reshape(256, 2), np.stack([low, high], axis=1))
    np.testing.assert_array_equal(np.asarray(q.pack_int4(nibbles)), np.asarray(every_byte))
    # the layout an accelerator's uint8 -> int4 bitcast reads (low nibble first)
    bitcast = jax.lax.bitcast_convert_type(every_byte, jnp.int4).reshape(16, 32)
    np.testing.assert_array_equal(np.asarray(bitcast, np.int8), np.asarray(nibbles))


def dequantized_float_params(params_q, config_q: ModelConfig):
    """The float parameters whose kernels are exactly the quantized model's dequantized weights."""
    float_like = nn.unbox(abstract_params(config_q.replace(quant_bits=None, quant_group_size=None)))

    def convert(tree, target, stacked):
        if "qkernel" in tree:
            kernel_shape = target["kernel"].shape[stacked:]

            def dequantize(qkernel, scale):  # [*out, in] -> the float layout [*in, *out]
                w = q.dequantize(qkernel, scale, config_q.quant_bits)
                return w.reshape(-1, w.shape[-1]).T.reshape(kernel_shape)

            kernel = (jax.vmap(dequantize) if stacked else dequantize)(tree["qkernel"], tree["scale"])
            return {**{k: v for k, v in tree.items() if k not in ("qkernel", "scale")}, "kernel": kernel}
        return {k: convert(v, target[k], stacked) if isinstance(v, dict) else v for k, v in tree.items()}

    return {k: convert(v, float_like[k], k == "layers") if isinstance(v, dict) else v for k, v in params_q.items()}


MODELS = {  # every projection layout: gated MLP, GQA, biases; DeepNorm with the GeLU MLP; unscanned
    "swiglu_gqa": dict(position="rope", mlp_activation="swiglu", num_kv_heads=2, norm="rmsnorm"),
    "deepnorm_gelu_unscanned": dict(position="rope_2d", residual="deepnorm", scan_layers=False),
}


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 16)])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_quantized_logits_equal_the_float_model_with_dequantized_weights(bits, group_size, model):
    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, **MODELS[model])
    params = nn.unbox(init_params(config, jax.random.key(0)))
    config_q = config.replace(quant_bits=bits, quant_group_size=group_size)
    params_q = quantize_params(params, config_q)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    inputs = (tokens, *example_inputs(2, 12)[1:])
    quantized = GLM(config_q).apply({"params": params_q}, *inputs)
    reference = GLM(config).apply({"params": dequantized_float_params(params_q, config_q)}, *inputs)
    np.testing.assert_allclose(np.asarray(quantized), np.asarray(reference), rtol=1e-5, atol=1e-5)
    float_logits = GLM(config).apply({"params": params}, *inputs)
    assert 0 < float(jnp.abs(quantized - float_logits).max()) < (0.01 if bits == 8 else 0.1)


def test_quantized_parameters_are_integers_and_only_the_projections_change():
    config = tiny_config("gqa2", "rope")
    params = nn.unbox(init_params(config, jax.random.key(0)))
    config_q = config.replace(quant_bits=4, quant_group_size=16)
    params_q = quantize_params(params, config_q)
    layers = params_q["layers"]
    for module in (layers["attention"]["query"], layers["attention"]["out"], layers["mlp"]["wo"]):
        assert "kernel" not in module and module["qkernel"].dtype == jnp.uint8 and module["scale"].dtype == jnp.float32
    np.testing.assert_array_equal(params_q["embedding"], params["embedding"])  # the embedding / head stay float
    np.testing.assert_array_equal(layers["attention"]["query"]["bias"], params["layers"]["attention"]["query"]["bias"])


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 16)])
def test_quantized_cached_decoding_equals_the_full_forward(bits, group_size):
    config = tiny_config("gqa2", "rope")
    params = nn.unbox(init_params(config, jax.random.key(0)))
    generator = Generator(config, params, SPECIALS, quant_bits=bits, quant_group_size=group_size)
    assert generator.config.quant_bits == bits and "qkernel" in generator.params["layers_0"]["attention"]["query"]
    check_causal_decode_matches_full_forward(config, generator)
    check_blank_decode_matches_full_forward(config, generator)


def parameter_bytes_of_the_decoder(config: ModelConfig) -> int:
    """Argument bytes of the Generator's compiled program that are parameters (memory analysis)."""
    generator = Generator(config, nn.unbox(abstract_params(config)), SPECIALS)
    batch = {name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in prompt_batch_shapes(1, 8).items()}
    compiled = generator.lower(batch, "causal", 4).compile()
    key_bytes = 8  # a threefry key: two uint32
    inputs = param_bytes(batch) + param_bytes(SamplingConfig().as_arrays()) + key_bytes
    return compiled.memory_analysis().argument_size_in_bytes - inputs


def test_the_compiled_decoder_holds_int8_and_int4_weights():
    """Parameter bytes of the Generator's program vs bfloat16 for a model whose projections dominate."""
    bf16 = ModelConfig(vocab_size=256, hidden_size=256, num_layers=2, num_heads=4, mlp_dim=1024, position="rope",
                       param_dtype="bfloat16", dtype="float32", scan_layers=False)
    sizes = {name: parameter_bytes_of_the_decoder(bf16.replace(quant_bits=bits, quant_group_size=group))
             for name, bits, group in (("bf16", None, None), ("int8", 8, None), ("int4_g128", 4, 128))}
    assert sizes["int8"] <= 0.55 * sizes["bf16"], sizes
    assert sizes["int4_g128"] <= 0.30 * sizes["bf16"], sizes


# ------------------------------------------------------------------ runs and the command line
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return shared_run(tmp_path_factory, "text_tiny", steps=2) / "run"


def quantize_command(*args):
    return subprocess.run([sys.executable, "-m", "glm_jax", "convert", "quantize", *args], capture_output=True,
                          text=True)


def test_quantize_command_writes_the_generator_options_parameters_and_int8_evaluates_within_half_a_percent(
        trained, tmp_path):
    from glm_jax.evaluation import evaluate_run
    from glm_jax.run_dir import load_run

    out = tmp_path / "int8"
    result = quantize_command("--from", str(trained), "--bits", "8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["bits"] == 8 and provenance["param_bytes"] < provenance["source_param_bytes"]
    run, source = load_run(out), load_run(trained)
    assert run.model.quant_bits == 8 and run.step == source.step
    # the run's parameters are those the Generator option makes from the float run
    direct = Generator(source.model, source.params, source.tokenizer.specials, quant_bits=8)
    loaded = Generator(run.model, run.params, run.tokenizer.specials)
    for a, b in zip(jax.tree.leaves(direct.params), jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    quantized_loss, float_loss = evaluate_run(run, num_batches=1)["loss"], evaluate_run(source, num_batches=1)["loss"]
    assert abs(quantized_loss / float_loss - 1) < 0.005, (quantized_loss, float_loss)
    # generate / chat from the command line: tests/test_reliability.py's README chain


def test_quantize_refuses_bad_input_with_the_reason(trained, tmp_path):
    from glm_jax.convert.hf import export_hf
    from glm_jax.convert.quantize import quantize_run
    from glm_jax.convert.uptrain import ConversionError, convert_run

    result = quantize_command("--from", str(trained), "--bits", "3", "--out", str(tmp_path / "x"))
    assert result.returncode != 0 and "choose 8 (INT8) or 4 (INT4)" in result.stderr
    with pytest.raises(ValueError, match="group size 24 does not divide the input dimension 32"):
        quantize_run(trained, tmp_path / "g24", 4, 24)
    quantized = tmp_path / "int4"
    quantize_run(trained, quantized, 4, 16)
    with pytest.raises(ValueError, match="already INT4-quantized"):
        quantize_run(quantized, tmp_path / "again", 8)
    with pytest.raises(FileExistsError, match="choose a new --out"):
        quantize_run(trained, quantized, 8)
    with pytest.raises(ValueError, match="export the float run it was quantized from"):
        export_hf(quantized, tmp_path / "hf")
    with pytest.raises(ConversionError, match="convert the float run it was quantized from"):
        convert_run(quantized, 1, "mean", tmp_path / "mqa")
    from glm_jax import experiment as experiment_lib
    from glm_jax.train.loop import train

    with pytest.raises(ValueError, match="integer weights cannot train"):
        train(experiment_lib.from_gin([quantized / "config.gin"], [f"RUN_DIR = '{tmp_path / 'retrain'}'"]))

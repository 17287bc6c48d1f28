"""KV-cache generation: cached decoding equals the full forward, sampling, cache bytes, compilation."""

import itertools

import flax.linen as nn
import jax
import numpy as np
import pytest

from glm_jax.data.tokenizer import SpecialTokens
from glm_jax.infer import prompts as prompt_lib
from glm_jax.infer.cache import init_cache, kv_bytes, kv_bytes_per_token
from glm_jax.infer.generate import Generator
from glm_jax.infer.sampling import SamplingConfig, filter_logits, greedy_token
from glm_jax.model import GLM, ModelConfig, example_inputs, init_params

SPECIALS = SpecialTokens(pad=1, eos=2, cls=3, mask=4, smask=5, gmask=6, sop=7, eop=8, dblock=9)
VOCAB = 16  # small, so a flat (high-temperature) model often emits <eop> and moves to the next mask

POSITION_MODES = {
    "learned_2d": dict(position="learned_2d"),
    "rope": dict(position="rope", rope_style="half"),
    "rope_2d": dict(position="rope_2d", rope_style="half"),
    "partial_interleaved": dict(position="rope", rope_style="interleaved", rotary_fraction=0.5),
}
HEADS = {"mha": 4, "gqa2": 2, "mqa": 1}
# The default run covers every head layout and every position mode once (and both
# cache layouts); the slow run covers the whole product.
FAST_CASES = [("mha", "learned_2d", True), ("gqa2", "rope_2d", False), ("mqa", "partial_interleaved", True),
              ("gqa2", "rope", True)]
ALL_CASES = [(h, p, True) for h, p in itertools.product(HEADS, POSITION_MODES) if (h, p, True) not in FAST_CASES
             and (h, p, False) not in FAST_CASES]


def tiny_config(heads="gqa2", position="rope", scan=True, **overrides):
    return ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=HEADS[heads],
                       mlp_dim=64, max_position=64, scan_layers=scan, **POSITION_MODES[position], **overrides)


def make_generator(config, seed=0):
    return Generator(config, nn.unbox(init_params(config, jax.random.key(seed))), SPECIALS)


BLANK_PROMPTS = [np.array([3, 10, 11, 4, 12, 13, 5, 14, 15], np.int32),  # two masks
                 np.array([3, 12, 13, 14, 6], np.int32)]                 # [gMASK] at the end
CAUSAL_PROMPTS = [np.array([3, 10, 11, 12, 13, 14], np.int32), np.array([3, 15, 14], np.int32)]


def fed_blank_inputs(prompt, generated, specials):
    """What a GLM decoder feeds after the context (glm_objective.md, Generation): <sop> at the
    first mask's position with block position 1, then each generated token with the next block
    position; after <eop> a fresh <sop> at the next mask. Returns (tokens, positions, blocks)."""
    masks = list(np.flatnonzero(np.isin(prompt, [specials.mask, specials.smask, specials.gmask])))
    span, token, pos, block = 0, specials.sop, masks[0], 1
    tokens, positions, blocks = [], [], []
    for y in generated:
        tokens.append(token), positions.append(pos), blocks.append(block)
        if y in (specials.eop, specials.eos):
            span += 1
            token, pos, block = specials.sop, masks[min(span, len(masks) - 1)], 1
        else:
            token, block = y, block + 1
    return np.asarray(tokens), np.asarray(positions), np.asarray(blocks)


def full_forward(config, params, tokens, positions, blocks, prefix_len):
    n = len(tokens)
    prefix = np.arange(n) < prefix_len
    return np.asarray(GLM(config).apply({"params": params}, tokens[None].astype(np.int32),
                                        np.stack([positions, blocks])[None].astype(np.int32),
                                        np.ones((1, n), np.int32), prefix[None]))[0]


def check_blank_decode_matches_full_forward(config, generator=None):
    generator = generator or make_generator(config)
    batch = prompt_lib.make_prompt_batch(BLANK_PROMPTS, SPECIALS, "blank", length_bucket=16)
    out = generator.generate(batch, "blank", 14, SamplingConfig(temperature=4.0), seed=3, record_logits=True)
    switched = 0
    for row, prompt in enumerate(BLANK_PROMPTS):
        n = out["num_tokens"][row]
        generated = out["tokens"][row, :n]
        switched += int(np.isin(generated[:-1], [SPECIALS.eop]).sum())
        fed, pos, blk = fed_blank_inputs(prompt, generated, SPECIALS)
        L = len(prompt)
        tokens = np.concatenate([prompt, fed])
        positions = np.concatenate([np.arange(L), pos])
        blocks = np.concatenate([np.zeros(L, np.int64), blk])
        reference = full_forward(generator.config, generator.params, tokens, positions, blocks, prefix_len=L)
        np.testing.assert_allclose(out["logits"][row, :n], reference[L:L + n], rtol=1e-5, atol=1e-5)
    assert switched >= 1, "the sample never moved to a second mask; pick another seed"


def check_causal_decode_matches_full_forward(config, generator=None):
    generator = generator or make_generator(config)
    batch = prompt_lib.make_prompt_batch(CAUSAL_PROMPTS, SPECIALS, "causal", length_bucket=16)
    out = generator.generate(batch, "causal", 10, SamplingConfig(temperature=1.0), seed=1, record_logits=True)
    for row, prompt in enumerate(CAUSAL_PROMPTS):
        n = out["num_tokens"][row]
        tokens = np.concatenate([prompt, out["tokens"][row, :n - 1]])
        L = len(prompt)
        reference = full_forward(generator.config, generator.params, tokens, np.arange(len(tokens)),
                                 np.zeros(len(tokens), np.int64), prefix_len=0)
        np.testing.assert_allclose(out["logits"][row, :n], reference[L - 1:L - 1 + n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,position,scan", FAST_CASES)
def test_blank_decode_equals_full_forward(heads, position, scan):
    check_blank_decode_matches_full_forward(tiny_config(heads, position, scan))


@pytest.mark.slow
@pytest.mark.parametrize("heads,position,scan", ALL_CASES)
def test_blank_decode_equals_full_forward_all(heads, position, scan):
    check_blank_decode_matches_full_forward(tiny_config(heads, position, scan))


@pytest.mark.parametrize("heads,position", [("mqa", "partial_interleaved"), ("mha", "learned_2d")])
def test_causal_decode_equals_full_forward(heads, position):
    check_causal_decode_matches_full_forward(tiny_config(heads, position, residual="pre"))


# ------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def sampler():
    generator = make_generator(tiny_config("gqa2", "rope"))
    batch = prompt_lib.make_prompt_batch(BLANK_PROMPTS, SPECIALS, "blank", length_bucket=16)
    return lambda sampling, seed=0: generator.generate(batch, "blank", 12, sampling, seed)


def test_greedy_is_deterministic_and_top_k1_top_p_tiny_equal_greedy(sampler):
    greedy = sampler(SamplingConfig())
    np.testing.assert_array_equal(sampler(SamplingConfig(), seed=5)["tokens"], greedy["tokens"])
    np.testing.assert_array_equal(sampler(SamplingConfig(temperature=1.0, top_k=1), seed=7)["tokens"],
                                  greedy["tokens"])
    np.testing.assert_array_equal(sampler(SamplingConfig(temperature=1.0, top_p=1e-6), seed=9)["tokens"],
                                  greedy["tokens"])


def test_same_seed_same_samples_and_seeds_differ(sampler):
    hot = SamplingConfig(temperature=2.0)
    a, b, c = sampler(hot, seed=11), sampler(hot, seed=11), sampler(hot, seed=12)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], c["tokens"])


def test_filter_logits_equals_numpy(rng):
    logits = rng.normal(size=(6, 40)).astype(np.float32)
    for top_k, top_p in [(0, 1.0), (5, 1.0), (0, 0.5), (7, 0.3), (40, 0.9), (1, 1.0)]:
        got = np.isfinite(np.asarray(filter_logits(logits, np.int32(top_k), np.float32(top_p))))
        for row in range(6):
            order = np.argsort(-logits[row])
            probs = np.exp(logits[row] - logits[row].max())
            probs /= probs.sum()
            keep_p = np.searchsorted(np.cumsum(probs[order]), top_p) + 1  # smallest set reaching top_p
            keep = min(top_k or 40, min(keep_p, 40))
            want = np.zeros(40, bool)
            want[order[:keep]] = True
            np.testing.assert_array_equal(got[row], want, err_msg=f"top_k={top_k} top_p={top_p}")


def test_greedy_token_equals_numpy_argmax(rng):
    logits = rng.integers(-3, 4, size=(7, 50)).astype(np.float32)  # small integers: many tied maxima
    logits[1, [4, 9]] = np.nan  # argmax semantics: the first NaN wins
    logits[2] = -np.inf
    logits[3, 17] = np.inf
    logits[4, -1] = 10.0  # the last column
    np.testing.assert_array_equal(np.asarray(jax.jit(greedy_token)(logits)), np.argmax(logits, axis=-1))
    assert np.argmax(logits, axis=-1)[1] == 4


def test_sampling_config_errors():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    for bad in (-1.0, float("nan"), float("inf")):  # nan used to pass `< 0` and decode greedily
        with pytest.raises(ValueError, match="temperature is .*finite positive value"):
            SamplingConfig(temperature=bad)
    with pytest.raises(ValueError, match="top_p is nan"):
        SamplingConfig(temperature=1.0, top_p=float("nan"))


# --------------------------------------------------------------- cache and compiles
def test_kv_cache_bytes_scale_exactly_with_kv_heads():
    sizes = {}
    for kv_heads in (8, 2, 1):
        config = ModelConfig(vocab_size=64, hidden_size=64, num_layers=3, num_heads=8, num_kv_heads=kv_heads,
                             mlp_dim=64)
        cache = init_cache(config, batch=2, context=32, new=8)
        sizes[kv_heads] = kv_bytes(cache)
        assert sizes[kv_heads] == kv_bytes_per_token(config) * 2 * 40 == 2 * 3 * 2 * 40 * kv_heads * 8 * 4
    assert sizes[8] == 4 * sizes[2] == 8 * sizes[1]


def test_no_recompilation_across_steps_and_prompt_lengths():
    generator = make_generator(tiny_config("gqa2", "rope_2d"))
    first = prompt_lib.make_prompt_batch([np.array([3, 10, 4, 11], np.int32)], SPECIALS, "blank", 16)
    second = prompt_lib.make_prompt_batch([np.array([3, 10, 11, 12, 13, 4, 14, 15, 5], np.int32)], SPECIALS,
                                          "blank", 16)
    assert first["tokens"].shape == second["tokens"].shape  # one bucket
    generator.generate(first, "blank", 20, SamplingConfig(), seed=0, ignore_stop=True)
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        out = generator.generate(second, "blank", 20, SamplingConfig(temperature=0.7, top_k=3), seed=4,
                                 ignore_stop=True)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert out["num_tokens"][0] == 20  # 20 decode steps ran inside the one program
    assert compiles == [], f"recompiled: {compiles}"
    assert generator.compilations() == 1


def test_prompt_errors():
    with pytest.raises(ValueError, match="no \\[MASK\\]"):
        prompt_lib.make_prompt_batch([np.array([3, 10, 11], np.int32)], SPECIALS, "blank")
    generator = make_generator(tiny_config("mha", "learned_2d"))
    batch = prompt_lib.make_prompt_batch([np.array([3, 4], np.int32)], SPECIALS, "causal", length_bucket=32)
    with pytest.raises(ValueError, match="max_position=64"):
        generator.generate(batch, "causal", 40)
    config = tiny_config()
    params = nn.unbox(init_params(config, jax.random.key(0)))
    with pytest.raises(ValueError, match="init_cache"):
        GLM(config).apply({"params": params}, *[np.asarray(a) for a in _one_token()], cache_index=0,
                          mutable=["cache"])


def _one_token():
    return example_inputs(1, 1)


def test_split_spans_and_fill_in():
    generated = np.array([20, 21, SPECIALS.eop, 22, SPECIALS.eop], np.int32)
    spans = prompt_lib.split_spans(generated, SPECIALS)
    assert [s.tolist() for s in spans] == [[20, 21], [22]]
    prompt = np.array([3, 10, SPECIALS.mask, 11, SPECIALS.smask], np.int32)
    assert prompt_lib.fill_in(prompt, spans, SPECIALS).tolist() == [3, 10, 20, 21, 11, 22]


def test_scanned_cache_layout_decodes_like_the_full_forward():
    """The model's scanned stack also decodes from a cache (one [L, B, G, S, D] buffer)."""
    config = tiny_config("gqa2", "rope_2d", scan=True)
    params = nn.unbox(init_params(config, jax.random.key(1)))
    prompt, fed = np.array([[3, 10, 4, 11, 12]], np.int32), np.array([[7, 13, 14]], np.int32)
    tokens = np.concatenate([prompt, fed], axis=1)
    positions = np.array([[[0, 1, 2, 3, 4, 2, 2, 2], [0, 0, 0, 0, 0, 1, 2, 3]]], np.int32)
    prefix = np.arange(8)[None] < 5
    full = GLM(config).apply({"params": params}, tokens, positions, np.ones((1, 8), np.int32), prefix)
    cache = init_cache(config, 1, 5, 5)
    _, variables = GLM(config).apply({"params": params, "cache": cache}, prompt, positions[:, :, :5],
                                     np.ones((1, 5), np.int32), prefix[:, :5], cache_index=0, prefill=True,
                                     mutable=["cache"])
    for i in range(5, 8):
        logits, variables = GLM(config).apply({"params": params, "cache": variables["cache"]}, tokens[:, i:i + 1],
                                              positions[:, :, i:i + 1], np.ones((1, 1), np.int32),
                                              np.zeros((1, 1), bool), cache_index=i, mutable=["cache"])
        np.testing.assert_allclose(logits[:, 0], full[:, i], rtol=1e-5, atol=1e-5)


def test_unscanned_params_give_the_same_logits():
    from glm_jax.model.scan_layout import scan_params, unscan_params

    config = tiny_config("mqa", "learned_2d", scan=True)
    params = nn.unbox(init_params(config, jax.random.key(2)))
    unscanned = unscan_params(params, config.num_layers)
    assert "layers" not in unscanned and "layers_1" in unscanned
    inputs = example_inputs(2, 6)
    np.testing.assert_allclose(GLM(config.replace(scan_layers=False)).apply({"params": unscanned}, *inputs),
                               GLM(config).apply({"params": params}, *inputs), rtol=1e-6, atol=1e-6)
    jax.tree_util.tree_map(np.testing.assert_array_equal, scan_params(unscanned, config.num_layers), params)


def test_sharded_generation_on_the_training_mesh_equals_one_device():
    """The decoder runs on the training mesh (fsdp_tp rules: rows over data x fsdp, KV heads over tensor)."""
    from glm_jax.parallel.mesh import MeshConfig, make_mesh
    from glm_jax.parallel.rules import logical_axis_rules
    from glm_jax.train.state import param_shardings

    config = tiny_config("gqa2", "rope")
    params = nn.unbox(init_params(config, jax.random.key(0)))
    prompts = [BLANK_PROMPTS[0], BLANK_PROMPTS[1], BLANK_PROMPTS[1][1:], BLANK_PROMPTS[0][:6]]
    batch = prompt_lib.make_prompt_batch(prompts, SPECIALS, "blank", length_bucket=16)
    single = Generator(config, params, SPECIALS).generate(batch, "blank", 8, record_logits=True)

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = logical_axis_rules("fsdp_tp")
    sharded_params = jax.device_put(params, param_shardings(config, mesh, rules))
    generator = Generator(config, sharded_params, SPECIALS, mesh=mesh, rules=rules)
    sharded = generator.generate(batch, "blank", 8, record_logits=True)
    np.testing.assert_array_equal(sharded["tokens"], single["tokens"])
    np.testing.assert_allclose(sharded["logits"], single["logits"], rtol=1e-5, atol=1e-5)
    assert generator.params["layers_0"]["attention"]["key"]["kernel"].sharding.spec[1] == "tensor"

"""Shared helpers of the Hugging Face interop tests: fixture paths, logits, hand-built THUDM checkpoints."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from glm_jax.model import GLM, ModelConfig, init_params
from glm_jax.model.scan_layout import unscan_params

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
FIXTURE_NAMES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@functools.lru_cache(maxsize=None)
def _apply(config: ModelConfig):
    return jax.jit(lambda params, *inputs: GLM(config).apply({"params": params}, *inputs))


def causal_inputs(ids: np.ndarray):
    B, T = ids.shape
    positions = np.stack([np.broadcast_to(np.arange(T), (B, T)), np.zeros((B, T), int)], 1).astype(np.int32)
    return ids.astype(np.int32), positions, np.ones((B, T), np.int32), np.zeros((B, T), bool)


def glm_inputs(ids: np.ndarray, prefix: int):
    """GLM blank-infilling inputs: a bidirectional prefix, then a block with block positions 1, 2, ..."""
    B, T = ids.shape
    position = np.where(np.arange(T) < prefix, np.arange(T), prefix - 1)
    block = np.where(np.arange(T) < prefix, 0, np.arange(T) - prefix + 1)
    positions = np.broadcast_to(np.stack([position, block]), (B, 2, T)).astype(np.int32)
    prefix_mask = np.broadcast_to(np.arange(T) < prefix, (B, T))
    return ids.astype(np.int32), positions, np.ones((B, T), np.int32), prefix_mask


def logits(config: ModelConfig, params, inputs) -> np.ndarray:
    return np.asarray(_apply(config.replace(attention_impl="xla"))(params, *inputs))


def random_params(config: ModelConfig, seed: int) -> dict:
    """Unscanned random parameters with non-trivial norm scales and biases (so every mapping matters)."""
    params = unscan_params(nn.unbox(init_params(config, jax.random.key(seed))), config.num_layers)
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        names = [getattr(p, "key", "") for p in path]
        leaf = np.asarray(leaf)
        if names[-1] == "scale":
            return (1.0 + 0.2 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        if names[-1] == "bias":
            return (0.2 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(perturb, params)


def copy_tokenizer(directory: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copyfile(FIXTURES / FIXTURE_NAMES[0] / name, directory / name)


TOKENIZER_TEXT = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
                  "Blank infilling fills [MASK] spans; sentences end with a full stop.", "print(sum([1, 2, 3]))"] * 20


def write_chatglm_tokenizer(directory: Path, vocab_size: int = 80, roles: bool = True) -> None:
    """A THUDM-style ChatGLM2/3 tokenizer directory: a SentencePiece tokenizer.model with <unk> <s> </s> at
    0, 1, 2 and no GLM specials, tokenizer_config.json naming ChatGLMTokenizer, and (ChatGLM3) a
    tokenization_chatglm.py stand-in that names the role tokens (its text is read, never run)."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TOKENIZER_TEXT), model_writer=model,
                                   vocab_size=vocab_size, model_type="bpe", unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLMTokenizer"}))
    if roles:
        (directory / "tokenization_chatglm.py").write_text(
            '# stand-in for THUDM\'s file\nrole_special_tokens = ["<|system|>", "<|user|>", "<|assistant|>", '
            '"<|observation|>"]\n')


def write_checkpoint(directory: Path, config: dict, tensors: dict) -> None:
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    copy_tokenizer(directory)


# ---------------------------------------------------- THUDM layouts, written out by hand from the reference code
def _rows(kernel):  # [E, heads, D] -> torch Linear rows [heads * D, E]
    return kernel.reshape(kernel.shape[0], -1).T


def _per_head_fused(attention: dict, part: str, heads: int):
    """THUDM's per-head fused QKV: for each head h the rows [q_h | k_h | v_h] (weights [.., E] or biases)."""
    q, k, v = (attention[n][part] for n in ("query", "key", "value"))
    if part == "bias":
        return np.concatenate([np.concatenate([q[h], k[h], v[h]]) for h in range(heads)])
    return np.concatenate([np.concatenate([q[:, h].T, k[:, h].T, v[:, h].T]) for h in range(heads)])


def chatglm2_checkpoint(model: ModelConfig, params: dict) -> tuple[dict, dict]:
    """(config.json, tensors) as THUDM's ChatGLM2/3 modeling_chatglm.py names and fuses them.

    QKV: one Linear whose rows are [all query heads | key groups | value groups] with
    multi_query_attention, else grouped per head [q_h | k_h | v_h]. MLP: dense_h_to_4h rows
    [gate | up] (swiglu chunks the output in two, the first half through SiLU).
    """
    H, G, D, E = model.num_heads, model.num_kv_heads, model.head_dim, model.hidden_size
    multi_query = G != H
    config = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "padded_vocab_size": model.vocab_size,
              "hidden_size": E, "ffn_hidden_size": model.mlp_dim, "num_layers": model.num_layers,
              "num_attention_heads": H, "kv_channels": D, "multi_query_attention": multi_query,
              "multi_query_group_num": G, "add_qkv_bias": True, "add_bias_linear": False, "rmsnorm": True,
              "layernorm_epsilon": model.norm_eps, "apply_residual_connection_post_layernorm": False,
              "post_layer_norm": True, "rope_ratio": model.rope_theta / 10000.0, "seq_length": model.max_position,
              "original_rope": True, "torch_dtype": "float32"}
    tensors = {"transformer.embedding.word_embeddings.weight": params["embedding"],
               "transformer.encoder.final_layernorm.weight": params["final_norm"]["scale"],
               "transformer.output_layer.weight": params["lm_head"]["kernel"].T}
    for i in range(model.num_layers):
        layer, prefix = params[f"layers_{i}"], f"transformer.encoder.layers.{i}."
        a = layer["attention"]
        if multi_query:
            weight = np.concatenate([_rows(a[n]["kernel"]) for n in ("query", "key", "value")])
            bias = np.concatenate([a[n]["bias"].reshape(-1) for n in ("query", "key", "value")])
        else:
            weight, bias = _per_head_fused(a, "kernel", H), _per_head_fused(a, "bias", H)
        wi = layer["mlp"]["wi"]["kernel"]  # [E, 2, F]
        tensors.update({
            prefix + "input_layernorm.weight": layer["input_norm"]["scale"],
            prefix + "self_attention.query_key_value.weight": weight,
            prefix + "self_attention.query_key_value.bias": bias,
            prefix + "self_attention.dense.weight": a["out"]["kernel"].reshape(H * D, E).T,
            prefix + "post_attention_layernorm.weight": layer["post_attention_norm"]["scale"],
            prefix + "mlp.dense_h_to_4h.weight": np.concatenate([wi[:, 0].T, wi[:, 1].T]),
            prefix + "mlp.dense_4h_to_h.weight": layer["mlp"]["wo"]["kernel"].T})
    return config, tensors


def chatglm6b_checkpoint(model: ModelConfig, params: dict) -> tuple[dict, dict]:
    """(config.json, tensors) as THUDM's ChatGLM-6B modeling_chatglm.py names them: `transformer.layers.N`,
    QKV fused per head ([q_h | k_h | v_h] rows for each head h), LayerNorms with biases, biased Linears."""
    H, D, E = model.num_heads, model.head_dim, model.hidden_size
    config = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "vocab_size": model.vocab_size,
              "hidden_size": E, "num_layers": model.num_layers, "num_attention_heads": H,
              "inner_hidden_size": model.mlp_dim, "layernorm_epsilon": model.norm_eps,
              "position_encoding_2d": True, "max_sequence_length": model.max_position, "torch_dtype": "float32"}
    tensors = {"transformer.word_embeddings.weight": params["embedding"],
               "transformer.final_layernorm.weight": params["final_norm"]["scale"],
               "transformer.final_layernorm.bias": params["final_norm"]["bias"],
               "lm_head.weight": params["lm_head"]["kernel"].T}
    for i in range(model.num_layers):
        layer, prefix = params[f"layers_{i}"], f"transformer.layers.{i}."
        a = layer["attention"]
        tensors.update({
            prefix + "input_layernorm.weight": layer["input_norm"]["scale"],
            prefix + "input_layernorm.bias": layer["input_norm"]["bias"],
            prefix + "attention.query_key_value.weight": _per_head_fused(a, "kernel", H),
            prefix + "attention.query_key_value.bias": _per_head_fused(a, "bias", H),
            prefix + "attention.dense.weight": a["out"]["kernel"].reshape(H * D, E).T,
            prefix + "attention.dense.bias": a["out"]["bias"],
            prefix + "post_attention_layernorm.weight": layer["post_attention_norm"]["scale"],
            prefix + "post_attention_layernorm.bias": layer["post_attention_norm"]["bias"],
            prefix + "mlp.dense_h_to_4h.weight": layer["mlp"]["wi"]["kernel"].T,
            prefix + "mlp.dense_h_to_4h.bias": layer["mlp"]["wi"]["bias"],
            prefix + "mlp.dense_4h_to_h.weight": layer["mlp"]["wo"]["kernel"].T,
            prefix + "mlp.dense_4h_to_h.bias": layer["mlp"]["wo"]["bias"]})
    return config, tensors


CHATGLM2_TINY = dict(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, head_dim=8, mlp_dim=40,
                     mlp_activation="swiglu", norm="rmsnorm", norm_eps=1e-5, residual="pre", position="rope",
                     rotary_fraction=0.5, rope_style="interleaved", rope_theta=20000.0, qkv_bias=True,
                     out_bias=False, mlp_bias=False, tie_embeddings=False, max_position=64)
CHATGLM6B_TINY = dict(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
                      mlp_dim=64, mlp_activation="gelu", norm="layernorm", norm_eps=1e-5, residual="deepnorm",
                      position="rope_2d", rotary_fraction=1.0, rope_style="half", rope_theta=10000.0,
                      qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=False, max_position=64)

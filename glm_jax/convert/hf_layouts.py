"""The checkpoint layouts of the GLM family, as tensor-name rules and config mappings.

A layout says, for one published format, how its config.json becomes a
ModelConfig (and back), and which source tensors become which glm_jax
parameters (and back). Every rule is a pure reshape / transpose / split, so an
import followed by an export is the identity bit for bit. Tensor names, fused
orderings and config fields are documented in docs/checkpoints.md, where each
was checked against the reference code:

  glm      transformers GlmForCausalLM (GLM-4-9B-hf, glm-4-9b-chat-hf; ChatGLM2/3 architecture)
  glm4     transformers Glm4ForCausalLM (GLM-4-0414: sandwich norms)
  chatglm  THUDM's original ChatGLM2-6B / ChatGLM3-6B / glm-4-9b-chat (fused QKV, `transformer.encoder`)
  chatglm6b THUDM's ChatGLM-6B (first generation: MHA, 2D RoPE, DeepNorm residual, GeLU, per-head fused QKV)

Parameter paths are the unscanned layout ('layers_3', 'attention', 'query',
'kernel'): imports write it (one layer at a time) and checkpoints restore into
either layout (glm_jax.checkpoint).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

from glm_jax.model import ModelConfig

Path = tuple[str, ...]


class LayoutError(ValueError):
    """A checkpoint's config.json does not describe a supported GLM layout."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """Some source tensors <-> some glm_jax parameters (a fused tensor maps to several)."""

    sources: tuple[str, ...]
    targets: tuple[Path, ...]
    to_ours: Callable[..., tuple]     # source arrays (in `sources` order) -> target arrays
    to_theirs: Callable[..., tuple]   # target arrays (in `targets` order) -> source arrays


def _xp(x):
    """numpy for real tensors, jax.numpy for the abstract ones of the shape check (jax.eval_shape)."""
    return np if isinstance(x, np.ndarray) else jnp


def same(name: str, path: Path) -> Rule:
    """A tensor stored exactly as glm_jax stores it (norm scales, biases of the full width, embeddings)."""
    return Rule((name,), (path,), lambda x: (x,), lambda x: (x,))


def linear(name: str, path: Path) -> Rule:
    """torch Linear [out, in] <-> kernel [in, out]."""
    return Rule((name,), (path,), lambda w: (w.T,), lambda k: (k.T,))


def heads_in(name: str, path: Path, heads: int, head_dim: int) -> Rule:
    """q/k/v projection [heads*D, E] <-> kernel [E, heads, D]."""
    return Rule((name,), (path,), lambda w: (w.T.reshape(-1, heads, head_dim),),
                lambda k: (k.reshape(k.shape[0], heads * head_dim).T,))


def heads_bias(name: str, path: Path, heads: int, head_dim: int) -> Rule:
    """q/k/v bias [heads*D] <-> [heads, D]."""
    return Rule((name,), (path,), lambda b: (b.reshape(heads, head_dim),), lambda b: (b.reshape(-1),))


def heads_out(name: str, path: Path, heads: int, head_dim: int) -> Rule:
    """attention output [E, heads*D] <-> kernel [heads, D, E]."""
    return Rule((name,), (path,), lambda w: (w.T.reshape(heads, head_dim, -1),),
                lambda k: (k.reshape(heads * head_dim, -1).T,))


def gated_in(name: str, path: Path, mlp_dim: int) -> Rule:
    """fused gate/up [2F, E] (rows 0..F-1 = first half) <-> kernel [E, 2, F]."""
    return Rule((name,), (path,), lambda w: (w.T.reshape(-1, 2, mlp_dim),),
                lambda k: (k.reshape(k.shape[0], 2 * mlp_dim).T,))


def grouped_qkv(name: str, prefix: Path, H: int, G: int, D: int, part: str) -> Rule:
    """ChatGLM2 fused QKV with query groups: rows [H*D | G*D | G*D] (weight [.., E] or bias)."""
    paths = tuple(prefix + (proj, part) for proj in ("query", "key", "value"))
    sizes = (H, G, G)

    def to_ours(w):
        q, k, v = _xp(w).split(w, [H * D, (H + G) * D], axis=0)
        if part == "bias":
            return tuple(x.reshape(n, D) for x, n in zip((q, k, v), sizes))
        return tuple(x.T.reshape(-1, n, D) for x, n in zip((q, k, v), sizes))

    def to_theirs(q, k, v):
        xp = _xp(q)
        if part == "bias":
            return (xp.concatenate([x.reshape(-1) for x in (q, k, v)]),)
        return (xp.concatenate([x.reshape(x.shape[0], -1).T for x in (q, k, v)], axis=0),)

    return Rule((name,), paths, to_ours, to_theirs)


def per_head_qkv(name: str, prefix: Path, H: int, D: int, part: str) -> Rule:
    """ChatGLM-6B (and non-MQA ChatGLM2) fused QKV: rows grouped per head, [q_h | k_h | v_h] for each h."""
    paths = tuple(prefix + (proj, part) for proj in ("query", "key", "value"))

    def to_ours(w):
        grouped = w.reshape(H, 3, D, *w.shape[1:])  # [H, 3, D] or [H, 3, D, E]
        if part == "bias":
            return tuple(grouped[:, i] for i in range(3))
        return tuple(grouped[:, i].transpose(2, 0, 1) for i in range(3))  # [E, H, D]

    def to_theirs(q, k, v):
        xp = _xp(q)
        if part == "bias":
            return (xp.stack([q, k, v], axis=1).reshape(-1),)
        stacked = xp.stack([x.transpose(1, 2, 0) for x in (q, k, v)], axis=1)  # [H, 3, D, E]
        return (stacked.reshape(H * 3 * D, -1),)

    return Rule((name,), paths, to_ours, to_theirs)


def norm(name: str, path: Path, model: ModelConfig) -> list[Rule]:
    """A norm's scale (`.weight`) and, for LayerNorm, its `.bias`."""
    rules = [same(f"{name}.weight", path + ("scale",))]
    if model.norm == "layernorm":
        rules.append(same(f"{name}.bias", path + ("bias",)))
    return rules


def embedding_norm_head(embedding: str, final_norm: str, head: str, model: ModelConfig) -> list[Rule]:
    """The rules outside the layers: token embedding, final norm and (unless tied) the output head."""
    rules = [same(embedding, ("embedding",))] + norm(final_norm, ("final_norm",), model)
    if not model.tie_embeddings:
        rules.append(linear(head, ("lm_head", "kernel")))
    return rules


# ------------------------------------------------------------------ config helpers
def _require(config: dict, layout: str, *keys: str):
    missing = [k for k in keys if k not in config]
    if missing:
        raise LayoutError(f"config.json of this {layout!r} checkpoint lacks {missing}; it is incomplete or "
                          "not a GLM checkpoint")
    return [config[k] for k in keys]


def _first(value):
    return value[0] if isinstance(value, list) else value


# ----------------------------------------------------------------------- layouts
class Layout:
    """One published checkpoint format: config mapping plus tensor rules."""

    name: str = ""
    description: str = ""

    def matches(self, config: dict) -> bool:
        raise NotImplementedError

    def model_config(self, config: dict) -> ModelConfig:
        raise NotImplementedError

    def hf_config(self, model: ModelConfig, base: dict | None) -> dict:
        raise NotImplementedError

    def global_rules(self, model: ModelConfig) -> list[Rule]:
        raise NotImplementedError

    def layer_rules(self, model: ModelConfig, layer: int) -> list[Rule]:
        raise NotImplementedError

    def rule_groups(self, model: ModelConfig) -> list[list[Rule]]:
        """The rules in the order they are streamed: each tensor outside the layers on its own (the
        embedding and head are the largest), then layer by layer (every layer has the same rules)."""
        return [[rule] for rule in self.global_rules(model)] + [self.layer_rules(model, i)
                                                                 for i in range(model.num_layers)]


class TransformersGlm(Layout):
    """transformers GlmForCausalLM (model_type 'glm') and, with sandwich norms, Glm4ForCausalLM ('glm4')."""

    def __init__(self, model_type: str, architecture: str, sandwich: bool):
        self.name, self.architecture, self.sandwich = model_type, architecture, sandwich
        self.description = f"transformers {architecture} (model_type {model_type!r})"

    def matches(self, config: dict) -> bool:
        return config.get("model_type") == self.name

    def model_config(self, config: dict) -> ModelConfig:
        V, E, F, L, H = _require(config, self.name, "vocab_size", "hidden_size", "intermediate_size",
                                 "num_hidden_layers", "num_attention_heads")
        rope = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        fraction = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))
        scaling = _rope_scaling_fields(rope, config)
        activation = config.get("hidden_act", "silu")
        if activation != "silu":
            raise LayoutError(f"hidden_act {activation!r}: the {self.architecture} layout is SwiGLU ('silu')")
        return ModelConfig(
            vocab_size=V, hidden_size=E, num_layers=L, num_heads=H,
            num_kv_heads=config.get("num_key_value_heads") or H,
            head_dim=config.get("head_dim") or E // H, mlp_dim=F, mlp_activation="swiglu",
            norm="rmsnorm", norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            residual="sandwich" if self.sandwich else "pre", position="rope",
            rotary_fraction=float(fraction), rope_style="interleaved", rope_theta=float(theta), **scaling,
            qkv_bias=bool(config.get("attention_bias", True)), out_bias=False, mlp_bias=False,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position=int(config.get("max_position_embeddings", 131072)))

    def hf_config(self, model: ModelConfig, base: dict | None) -> dict:
        _check_exportable(model, self, scalings=("none", "theta", "linear", "yarn"),
                          residual="sandwich" if self.sandwich else "pre", position="rope",
                          rope_style="interleaved", norm="rmsnorm", mlp_activation="swiglu", out_bias=False,
                          mlp_bias=False)
        config = {k: v for k, v in (base or {}).items() if k not in ("architectures", "model_type")}
        config.update(
            architectures=[self.architecture], model_type=self.name, vocab_size=model.vocab_size,
            hidden_size=model.hidden_size, intermediate_size=model.mlp_dim,
            num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
            num_key_value_heads=model.num_kv_heads, head_dim=model.head_dim, hidden_act="silu",
            rms_norm_eps=model.norm_eps, attention_bias=model.qkv_bias,
            tie_word_embeddings=model.tie_embeddings, max_position_embeddings=model.max_position,
            # transformers 5 reads rope_parameters; 4.x the top-level fields: write both.
            rope_theta=effective_rope_theta(model), partial_rotary_factor=model.rotary_fraction,
            rope_parameters={"rope_theta": effective_rope_theta(model), "partial_rotary_factor": model.rotary_fraction,
                             **_hf_rope_scaling(model)})
        config.setdefault("torch_dtype", model.param_dtype)
        return config

    def global_rules(self, model: ModelConfig) -> list[Rule]:
        return embedding_norm_head("model.embed_tokens.weight", "model.norm", "lm_head.weight", model)

    def layer_rules(self, model: ModelConfig, layer: int) -> list[Rule]:
        H, G, D = model.num_heads, model.num_kv_heads, model.head_dim
        src, dst = f"model.layers.{layer}.", (f"layers_{layer}",)
        attention = dst + ("attention",)
        rules = []
        for proj, ours, heads in (("q_proj", "query", H), ("k_proj", "key", G), ("v_proj", "value", G)):
            rules.append(heads_in(f"{src}self_attn.{proj}.weight", attention + (ours, "kernel"), heads, D))
            if model.qkv_bias:
                rules.append(heads_bias(f"{src}self_attn.{proj}.bias", attention + (ours, "bias"), heads, D))
        rules += [heads_out(f"{src}self_attn.o_proj.weight", attention + ("out", "kernel"), H, D),
                  gated_in(f"{src}mlp.gate_up_proj.weight", dst + ("mlp", "wi", "kernel"), model.mlp_dim),
                  linear(f"{src}mlp.down_proj.weight", dst + ("mlp", "wo", "kernel")),
                  same(f"{src}input_layernorm.weight", dst + ("input_norm", "scale")),
                  same(f"{src}post_attention_layernorm.weight", dst + ("post_attention_norm", "scale"))]
        if self.sandwich:
            rules += [same(f"{src}post_self_attn_layernorm.weight", dst + ("post_attention_branch_norm", "scale")),
                      same(f"{src}post_mlp_layernorm.weight", dst + ("post_mlp_branch_norm", "scale"))]
        return rules


class ChatGLM(Layout):
    """THUDM's original ChatGLM2-6B / ChatGLM3-6B / glm-4-9b-chat (model_type 'chatglm', `transformer.encoder`)."""

    name = "chatglm"
    description = "THUDM ChatGLM2/3-6B, glm-4-9b-chat original (model_type 'chatglm', transformer.encoder)"

    def matches(self, config: dict) -> bool:
        return config.get("model_type") == "chatglm" and "multi_query_group_num" in config

    def model_config(self, config: dict) -> ModelConfig:
        V, E, F, L, H = _require(config, self.name, "padded_vocab_size", "hidden_size", "ffn_hidden_size",
                                 "num_layers", "num_attention_heads")
        if config.get("apply_residual_connection_post_layernorm", False):
            raise LayoutError("apply_residual_connection_post_layernorm = true is not a released ChatGLM "
                              "configuration and glm_jax does not implement it")
        if not config.get("post_layer_norm", True):
            raise LayoutError("post_layer_norm = false (no final norm) is not supported")
        if not config.get("original_rope", True):
            raise LayoutError("original_rope = false is not a released ChatGLM configuration")
        if config.get("pre_seq_len"):
            raise LayoutError(f"pre_seq_len = {config['pre_seq_len']}: this checkpoint carries a ChatGLM P-tuning v2 "
                              "prefix encoder, which is not imported; import the base model (pre_seq_len null in "
                              "config.json) and train a prefix here with train.adapter = 'prefix'")
        multi_query = config.get("multi_query_attention", False)
        add_bias = bool(config.get("add_bias_linear", False))
        return ModelConfig(
            vocab_size=V, hidden_size=E, num_layers=L, num_heads=H,
            num_kv_heads=config["multi_query_group_num"] if multi_query else H,
            head_dim=config.get("kv_channels") or E // H, mlp_dim=F, mlp_activation="swiglu",
            norm="rmsnorm" if config.get("rmsnorm", True) else "layernorm",
            norm_eps=float(config.get("layernorm_epsilon", 1e-5)), residual="pre", position="rope",
            rotary_fraction=0.5, rope_style="interleaved",
            rope_theta=10000.0 * float(config.get("rope_ratio", 1.0)),
            qkv_bias=add_bias or bool(config.get("add_qkv_bias", False)), out_bias=add_bias, mlp_bias=add_bias,
            tie_embeddings=False, max_position=int(config.get("seq_length", 32768)))

    def hf_config(self, model: ModelConfig, base: dict | None) -> dict:
        _check_exportable(model, self, scalings=("none", "theta"), residual="pre", position="rope",
                          rope_style="interleaved", mlp_activation="swiglu", tie_embeddings=False, rotary_fraction=0.5)
        if model.out_bias != model.mlp_bias or (model.out_bias and not model.qkv_bias):
            raise LayoutError("the chatglm layout has one add_bias_linear switch for the output and MLP "
                              "projections (which implies QKV bias); this model's biases differ")
        config = dict(base or {})
        config.update(
            model_type="chatglm", padded_vocab_size=model.vocab_size, hidden_size=model.hidden_size,
            ffn_hidden_size=model.mlp_dim, num_layers=model.num_layers, num_attention_heads=model.num_heads,
            kv_channels=model.head_dim, multi_query_attention=model.num_kv_heads != model.num_heads,
            multi_query_group_num=model.num_kv_heads, add_bias_linear=model.out_bias,
            add_qkv_bias=model.qkv_bias, rmsnorm=model.norm == "rmsnorm", layernorm_epsilon=model.norm_eps,
            apply_residual_connection_post_layernorm=False, post_layer_norm=True, original_rope=True,
            rope_ratio=effective_rope_theta(model) / 10000.0, seq_length=model.max_position)
        config.setdefault("architectures", ["ChatGLMModel"])
        return config

    def global_rules(self, model: ModelConfig) -> list[Rule]:
        return embedding_norm_head("transformer.embedding.word_embeddings.weight",
                                   "transformer.encoder.final_layernorm", "transformer.output_layer.weight", model)

    def layer_rules(self, model: ModelConfig, layer: int) -> list[Rule]:
        H, G, D = model.num_heads, model.num_kv_heads, model.head_dim
        src, dst = f"transformer.encoder.layers.{layer}.", (f"layers_{layer}",)
        attention = dst + ("attention",)
        qkv = f"{src}self_attention.query_key_value"
        if G != H:
            fused = [grouped_qkv(f"{qkv}.weight", attention, H, G, D, "kernel")]
            fused += [grouped_qkv(f"{qkv}.bias", attention, H, G, D, "bias")] if model.qkv_bias else []
        else:  # without multi_query_attention the reference splits per head
            fused = [per_head_qkv(f"{qkv}.weight", attention, H, D, "kernel")]
            fused += [per_head_qkv(f"{qkv}.bias", attention, H, D, "bias")] if model.qkv_bias else []
        rules = fused + [heads_out(f"{src}self_attention.dense.weight", attention + ("out", "kernel"), H, D),
                         gated_in(f"{src}mlp.dense_h_to_4h.weight", dst + ("mlp", "wi", "kernel"), model.mlp_dim),
                         linear(f"{src}mlp.dense_4h_to_h.weight", dst + ("mlp", "wo", "kernel"))]
        if model.out_bias:
            rules += [same(f"{src}self_attention.dense.bias", attention + ("out", "bias")),
                      Rule((f"{src}mlp.dense_h_to_4h.bias",), (dst + ("mlp", "wi", "bias"),),
                           lambda b: (b.reshape(2, -1),), lambda b: (b.reshape(-1),)),
                      same(f"{src}mlp.dense_4h_to_h.bias", dst + ("mlp", "wo", "bias"))]
        return (rules + norm(f"{src}input_layernorm", dst + ("input_norm",), model)
                + norm(f"{src}post_attention_layernorm", dst + ("post_attention_norm",), model))


class ChatGLM6B(Layout):
    """THUDM's ChatGLM-6B (first generation; model_type 'chatglm' without multi_query_group_num)."""

    name = "chatglm6b"
    description = "THUDM ChatGLM-6B, first generation (model_type 'chatglm', transformer.layers, 2D RoPE)"

    def matches(self, config: dict) -> bool:
        return config.get("model_type") == "chatglm" and "multi_query_group_num" not in config

    def model_config(self, config: dict) -> ModelConfig:
        V, E, L, H = _require(config, self.name, "vocab_size", "hidden_size", "num_layers", "num_attention_heads")
        if not config.get("position_encoding_2d", True):
            raise LayoutError("position_encoding_2d = false is not a released ChatGLM-6B configuration")
        return ModelConfig(
            vocab_size=V, hidden_size=E, num_layers=L, num_heads=H, num_kv_heads=H, head_dim=E // H,
            mlp_dim=config.get("inner_hidden_size") or 4 * E, mlp_activation="gelu", norm="layernorm",
            norm_eps=float(config.get("layernorm_epsilon", 1e-5)), residual="deepnorm", position="rope_2d",
            rotary_fraction=1.0, rope_style="half", rope_theta=10000.0, qkv_bias=True, out_bias=True,
            mlp_bias=True, tie_embeddings=False, max_position=int(config.get("max_sequence_length", 2048)))

    def hf_config(self, model: ModelConfig, base: dict | None) -> dict:
        _check_exportable(model, self, residual="deepnorm", position="rope_2d", rope_style="half",
                          mlp_activation="gelu", norm="layernorm", qkv_bias=True, out_bias=True, mlp_bias=True,
                          tie_embeddings=False, rotary_fraction=1.0, rope_theta=10000.0)
        if model.num_kv_heads != model.num_heads or model.head_dim * model.num_heads != model.hidden_size:
            raise LayoutError("the ChatGLM-6B layout is MHA with head_dim = hidden_size / num_heads; export a "
                              "GQA/MQA model in the 'chatglm' layout instead (--layout chatglm)")
        config = dict(base or {})
        config.update(model_type="chatglm", vocab_size=model.vocab_size, hidden_size=model.hidden_size,
                      num_layers=model.num_layers, num_attention_heads=model.num_heads,
                      inner_hidden_size=model.mlp_dim, layernorm_epsilon=model.norm_eps,
                      position_encoding_2d=True, max_sequence_length=model.max_position)
        config.setdefault("architectures", ["ChatGLMModel"])
        return config

    def global_rules(self, model: ModelConfig) -> list[Rule]:
        return embedding_norm_head("transformer.word_embeddings.weight", "transformer.final_layernorm",
                                   "lm_head.weight", model)

    def layer_rules(self, model: ModelConfig, layer: int) -> list[Rule]:
        H, D = model.num_heads, model.head_dim
        src, dst = f"transformer.layers.{layer}.", (f"layers_{layer}",)
        attention = dst + ("attention",)
        return ([per_head_qkv(f"{src}attention.query_key_value.weight", attention, H, D, "kernel"),
                 per_head_qkv(f"{src}attention.query_key_value.bias", attention, H, D, "bias"),
                 heads_out(f"{src}attention.dense.weight", attention + ("out", "kernel"), H, D),
                 same(f"{src}attention.dense.bias", attention + ("out", "bias")),
                 linear(f"{src}mlp.dense_h_to_4h.weight", dst + ("mlp", "wi", "kernel")),
                 same(f"{src}mlp.dense_h_to_4h.bias", dst + ("mlp", "wi", "bias")),
                 linear(f"{src}mlp.dense_4h_to_h.weight", dst + ("mlp", "wo", "kernel")),
                 same(f"{src}mlp.dense_4h_to_h.bias", dst + ("mlp", "wo", "bias"))]
                + norm(f"{src}input_layernorm", dst + ("input_norm",), model)
                + norm(f"{src}post_attention_layernorm", dst + ("post_attention_norm",), model))


LAYOUTS: dict[str, Layout] = {
    "glm": TransformersGlm("glm", "GlmForCausalLM", sandwich=False),
    "glm4": TransformersGlm("glm4", "Glm4ForCausalLM", sandwich=True),
    "chatglm": ChatGLM(),
    "chatglm6b": ChatGLM6B(),
}


def supported() -> str:
    return "; ".join(f"{name}: {layout.description}" for name, layout in LAYOUTS.items())


def detect(config: dict) -> Layout:
    """The layout a config.json describes; LayoutError naming what was found and what is supported."""
    for layout in LAYOUTS.values():
        if layout.matches(config):
            return layout
    raise LayoutError(f"config.json has model_type {config.get('model_type')!r} and architectures "
                      f"{config.get('architectures')}, which is not a supported GLM layout. Supported: {supported()}")


def for_model(model: ModelConfig) -> Layout:
    """The transformers layout a glm_jax model exports to by default (glm4 for sandwich norms, else glm)."""
    return LAYOUTS["glm4" if model.residual == "sandwich" else "glm"]


# Hugging Face rope_type <-> ModelConfig.rope_scaling (transformers' modeling_rope_utils; YaRN with its
# default ramp (beta_fast 32, beta_slow 1), truncation and attention factor, the only ones glm_jax computes).
HF_ROPE_TYPES = {"default": "none", "linear": "linear", "yarn": "yarn"}


def _rope_scaling_fields(rope: dict, config: dict) -> dict:
    """ModelConfig rope_scaling fields of a config.json's rope_parameters / rope_scaling."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in HF_ROPE_TYPES:
        raise LayoutError(f"this checkpoint uses RoPE scaling rope_type {kind!r}, which glm_jax does not compute; "
                          f"supported: {sorted(HF_ROPE_TYPES)}")
    if kind == "default":
        return {}
    custom = {k: rope[k] for k, default in (("beta_fast", 32), ("beta_slow", 1), ("truncate", True))
              if k in rope and rope[k] != default}
    custom.update({k: rope[k] for k in ("attention_factor", "mscale", "mscale_all_dim") if rope.get(k) is not None})
    if custom:
        raise LayoutError(f"this checkpoint's {kind} RoPE scaling sets {custom}; glm_jax computes YaRN with its "
                          "defaults (beta_fast 32, beta_slow 1, truncated ramp, attention factor 0.1 ln s + 1) only")
    original = rope.get("original_max_position_embeddings") or config.get("max_position_embeddings", 2048)
    factor = rope.get("factor") or config.get("max_position_embeddings", original) / original
    return {"rope_scaling": HF_ROPE_TYPES[kind], "rope_scaling_factor": float(factor),
            "rope_original_context": int(original)}


def _hf_rope_scaling(model: ModelConfig) -> dict:
    """rope_parameters entries of the model's scaling ('theta' is folded into rope_theta)."""
    if model.rope_scaling in ("none", "theta"):
        return {"rope_type": "default"}
    entries = {"rope_type": model.rope_scaling, "factor": model.rope_scaling_factor}
    if model.rope_scaling == "yarn":
        entries["original_max_position_embeddings"] = model.rope_original_context
    return entries


def effective_rope_theta(model: ModelConfig) -> float:
    """The RoPE base a reader without scaling support needs: theta x s under 'theta' scaling."""
    return model.rope_theta * (model.rope_scaling_factor if model.rope_scaling == "theta" else 1.0)


def _check_exportable(model: ModelConfig, layout: Layout, scalings: tuple[str, ...] = ("none",), **required) -> None:
    wrong = {k: (getattr(model, k), v) for k, v in required.items() if getattr(model, k) != v}
    if model.rope_scaling not in scalings:
        wrong["rope_scaling"] = (model.rope_scaling, scalings)
    if wrong:
        details = ", ".join(f"{k} is {have!r} (the layout needs {want!r})" for k, (have, want) in wrong.items())
        raise LayoutError(f"this model cannot be written in the {layout.name!r} layout: {details}. "
                          f"Layouts: {supported()}")

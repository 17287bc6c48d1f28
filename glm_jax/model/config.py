"""ModelConfig: every GLM-family architecture as one frozen, validated dataclass.

A model variant is a set of field values (a gin preset under
glm_jax/configs/models/), never a new code path. Field meanings follow
docs/architectures.md; the docstring of each choice names the reference model
that uses it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp

from glm_jax.kernels.masks import LambdaShape
from glm_jax.model import quantization, rope

MlpActivation = Literal["gelu", "geglu", "swiglu"]
Norm = Literal["layernorm", "rmsnorm"]
Residual = Literal["pre", "post", "deepnorm", "sandwich"]
Position = Literal["learned_2d", "rope", "rope_2d", "none"]
RopeStyle = Literal["half", "interleaved"]
AttentionImpl = Literal["auto", "xla", "blockwise", "pallas", "pallas_interpret"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]

_CHOICES = {
    "mlp_activation": ("gelu", "geglu", "swiglu"),
    "norm": ("layernorm", "rmsnorm"),
    "residual": ("pre", "post", "deepnorm", "sandwich"),
    "position": ("learned_2d", "rope", "rope_2d", "none"),
    "rope_style": ("half", "interleaved"),
    "rope_scaling": rope.SCALING_METHODS,
    "attention_impl": ("auto", "xla", "blockwise", "pallas", "pallas_interpret"),
    "remat_policy": ("none", "full", "dots", "dots_no_batch"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "param_dtype": ("float32", "bfloat16"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a GLM-family decoder.

    Attributes:
      vocab_size: rows of the word embedding (and of the output head).
      hidden_size: model width E.
      num_layers: transformer blocks L.
      num_heads: query heads H.
      num_kv_heads: key/value heads G (H = MHA, 1 = MQA, else GQA-G). Query head
        h uses KV head h // (H // G). None means H.
      head_dim: per-head width D. None means hidden_size // num_heads.
      mlp_dim: inner width F of the MLP (per half for gated MLPs).
      mlp_activation: 'gelu' (tanh GeLU, GLM / ChatGLM-6B); 'geglu' (exact GeLU,
        the SECOND half of the up projection is the gate, GLM-130B); 'swiglu'
        (SiLU, the FIRST half is the gate, ChatGLM2 / GLM-4).
      norm, norm_eps: LayerNorm (GLM, GLM-130B) or RMSNorm (ChatGLM2, GLM-4).
      residual: 'pre' (x + f(LN(x))), 'post' (LN(x + f(x))), 'deepnorm'
        (GLM-130B / ChatGLM-6B: a = LN(x); alpha * a + f(a), alpha = (2L)^0.5),
        'sandwich' (GLM-4-0414: x + LN'(f(LN(x)))).
      position: 'learned_2d' (GLM: position + block-position tables added to the
        embedding), 'rope' (1D RoPE on row 0 of positions), 'rope_2d' (ChatGLM-6B:
        half of the rotary dims by position, half by block position), 'none'.
      rotary_fraction: fraction of head_dim that rotates (ChatGLM2 / GLM-4: 0.5).
      rope_style: 'half' pairs (j, j + r/2) (NeoX); 'interleaved' pairs (2i, 2i+1).
      rope_theta: RoPE base.
      rope_scaling: context extension of a RoPE model (glm_jax.model.rope): 'none',
        'theta' (base x factor: ChatGLM2-32k / GLM-4 `rope_ratio`), 'linear' (position
        interpolation), 'ntk' (NTK-aware base), 'yarn' (YaRN). The same rotation in
        training, prefill and decoding.
      rope_scaling_factor: s >= 1, the extension factor (1 = identity).
      rope_original_context: the context the model was trained at (YaRN's ramp).
      qkv_bias, out_bias, mlp_bias: biases of the q/k/v, attention-output and MLP
        projections.
      tie_embeddings: output head is the transposed word embedding.
      embedding_grad_scale: GLM-130B embedding-gradient shrink alpha; the forward
        value is unchanged and the embedding gradient is scaled by alpha. 1.0 = off.
      init_std: standard deviation of the normal initialiser (GLM: 0.02). Output
        projections use init_std / sqrt(2L); DeepNorm uses its own Xavier init.
      dtype: compute dtype; 'auto' is bfloat16 on GPU/TPU and float32 on CPU.
        Softmax, norms statistics and logits are always float32.
      param_dtype: storage dtype of parameters.
      scan_layers: stack the blocks with nn.scan (one compiled block, a leading
        'layers' axis on every block parameter).
      remat_policy: rematerialisation of each block: 'none', 'full' (save
        nothing), 'dots' (save matmul outputs), 'dots_no_batch'.
      attention_impl: 'auto' | 'xla' | 'blockwise' | 'pallas' | 'pallas_interpret'
        (see glm_jax.kernels.attention.resolve_impl).
      pipeline_microbatches: micro-batches of the GPipe schedule when the mesh splits
        the layer stack into stages (MeshConfig.stage > 1, glm_jax.model.pipeline_parallel);
        0 = one per stage. More shrink the bubble, (S - 1) / (M + S - 1).
      max_position: rows of the learned position tables (learned_2d only).
      pre_seq_len: P-tuning v2 (ChatGLM2/3's name): P learned key/value slots per
        layer (attention/prefix_key, prefix_value [P, G, D]) that every query sees,
        without positions (glm_jax.kernels.learned_prefix). 0 = none. Set through
        train.adapter = 'prefix' and PrefixTuning.length, which train only them.
      prompt_len: prompt tuning (Lester et al. 2021): P trained input embeddings,
        `soft_prompt` [P, E], a positionless bidirectional prompt that runs through every
        layer beside the sequence and that every query sees (glm_jax.model.prompt_tuning).
        0 = none. Set through train.adapter = 'prompt' and PromptTuning.length.
      adapter_dim: bottleneck adapters (Houlsby et al. 2019): a residual
        E -> adapter_dim -> E layer on the attention and on the MLP output of every layer
        (glm_jax.model.layers.Bottleneck). 0 = none. Set through train.adapter =
        'bottleneck' and BottleneckAdapters.dim.
      attention_sink, attention_window: LM-Infinite's Λ-shaped attention (Han et al. 2023),
        training-free context extension: with attention_window = w > 0 a query sees only the
        first attention_sink keys of its segment and the w keys behind it (itself included)
        besides GLM's rule (glm_jax.kernels.masks.LambdaShape); 0 = full attention.
      quant_bits: 8 | 4: weight-only INT8 / INT4 projections (attention and MLP) for
        inference (glm_jax.model.quantization); None = float. Written by
        `glm_jax convert quantize`, which quantizes a run's parameters; such a run
        generates, evaluates and chats but does not train.
      quant_group_size: inputs per scale (group-wise, e.g. 128); None = one scale per
        output channel (GLM-130B). Must divide every projection's input dimension.
    """

    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_dim: int = 1024
    mlp_activation: MlpActivation = "gelu"
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    residual: Residual = "pre"
    position: Position = "learned_2d"
    rotary_fraction: float = 1.0
    rope_style: RopeStyle = "half"
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_original_context: int = 2048
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    tie_embeddings: bool = True
    embedding_grad_scale: float = 1.0
    init_std: float = 0.02
    dtype: str = "auto"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: RematPolicy = "none"
    attention_impl: AttentionImpl = "auto"
    pipeline_microbatches: int = 0
    max_position: int = 1024
    pre_seq_len: int = 0
    prompt_len: int = 0
    adapter_dim: int = 0
    attention_sink: int = 0
    attention_window: int = 0
    quant_bits: int | None = None
    quant_group_size: int | None = None

    def __post_init__(self):
        # Fill derived defaults on the frozen instance, then validate.
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None and self.num_heads > 0:
            if isinstance(self.hidden_size, int) and self.hidden_size % self.num_heads:
                _fail("num_heads", f"= {self.num_heads} does not divide ModelConfig.hidden_size = {self.hidden_size}, "
                      "so the heads cannot split the hidden width (head_dim unset means hidden_size // "
                      "num_heads); choose num_heads dividing hidden_size or set ModelConfig.head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        self._validate()

    # ----------------------------------------------------------------- checks
    def _validate(self):
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                _fail(name, f"is {value!r}; choose one of {allowed}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "mlp_dim", "max_position"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                _fail(name, f"is {value!r}; it must be a positive integer")
        if self.num_kv_heads > self.num_heads or self.num_heads % self.num_kv_heads:
            _fail("num_kv_heads", f"num_heads % num_kv_heads != 0 "
                  f"({self.num_heads} % {self.num_kv_heads}); choose a divisor "
                  f"of num_heads (num_heads = MHA, 1 = MQA)")
        if not 0.0 < self.rotary_fraction <= 1.0:
            _fail("rotary_fraction", f"is {self.rotary_fraction}; it must be in (0, 1]")
        if self.position in ("rope", "rope_2d"):
            # rope: rotated dims come in pairs; rope_2d: two halves, each in pairs.
            multiple = 2 if self.position == "rope" else 4
            if self.rotary_dim % multiple or self.rotary_dim != self.head_dim * self.rotary_fraction:
                _fail("rotary_fraction", f"gives rotary dims head_dim * rotary_fraction = "
                      f"{self.head_dim * self.rotary_fraction}, which must be a whole "
                      f"multiple of {multiple} for position={self.position!r}")
        if self.rope_theta <= 0:
            _fail("rope_theta", f"is {self.rope_theta}; it must be positive")
        self._validate_rope_scaling()
        if self.norm_eps <= 0:
            _fail("norm_eps", f"is {self.norm_eps}; it must be positive")
        if not 0.0 < self.embedding_grad_scale <= 1.0:
            _fail("embedding_grad_scale", f"is {self.embedding_grad_scale}; it must be "
                  "in (0, 1] (1.0 turns the GLM-130B shrink off)")
        if self.init_std <= 0:
            _fail("init_std", f"is {self.init_std}; it must be positive")
        if not isinstance(self.pipeline_microbatches, int) or self.pipeline_microbatches < 0:
            _fail("pipeline_microbatches", f"is {self.pipeline_microbatches!r}; it must be a whole number >= 0 "
                  "(0 = one per pipeline stage)")
        if not isinstance(self.pre_seq_len, int) or self.pre_seq_len < 0:
            _fail("pre_seq_len", f"is {self.pre_seq_len!r}; it must be a whole number >= 0 (0 = no learned prefix)")
        for field, meaning in (("prompt_len", "no soft prompt"), ("adapter_dim", "no bottleneck adapters"),
                               ("attention_sink", "no global tokens"), ("attention_window", "full attention")):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(field, f"is {value!r}; it must be a whole number >= 0 (0 = {meaning})")
        if self.attention_sink and not self.attention_window:
            _fail("attention_sink", f"is {self.attention_sink} but attention_window is 0 (full attention, where "
                  "every key is visible anyway); set ModelConfig.attention_window for Λ-shaped attention")
        self._validate_quantization()

    def _validate_rope_scaling(self):
        if not self.rope_scaling_factor >= 1.0:
            _fail("rope_scaling_factor", f"is {self.rope_scaling_factor}; it must be >= 1 (the context is extended "
                  "s-fold; 1 = unscaled)")
        if self.rope_scaling == "none" and self.rope_scaling_factor != 1.0:
            _fail("rope_scaling_factor", f"is {self.rope_scaling_factor} but rope_scaling is 'none'; choose a "
                  f"method: ModelConfig.rope_scaling = one of {rope.SCALING_METHODS[1:]}")
        if self.rope_scaling != "none" and self.position not in ("rope", "rope_2d"):
            _fail("rope_scaling", f"is {self.rope_scaling!r} but position is {self.position!r}, which has no "
                  "rotary embedding to scale")
        if not isinstance(self.rope_original_context, int) or self.rope_original_context < 1:
            _fail("rope_original_context", f"is {self.rope_original_context!r}; it must be a positive integer")

    def _validate_quantization(self):
        if self.quant_bits is None:
            if self.quant_group_size is not None:
                _fail("quant_group_size", f"is {self.quant_group_size} but quant_bits is None; set "
                      "ModelConfig.quant_bits = 8 or 4 too, or drop the group size")
            return
        try:
            for name, width in self.projection_inputs.items():
                quantization.check_scheme(self.quant_bits, self.quant_group_size, width, f" of {name}")
        except ValueError as error:
            _fail("quant_bits / quant_group_size", f"do not fit this model: {error}")

    # ------------------------------------------------------- derived values
    @property
    def rotary_dim(self) -> int:
        """Number of leading head dims that RoPE rotates (0 without RoPE)."""
        if self.position not in ("rope", "rope_2d"):
            return 0
        return int(round(self.head_dim * self.rotary_fraction))

    @property
    def compute_dtype(self):
        if self.dtype == "auto":
            import jax

            return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32)
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def rope_scaling_spec(self) -> rope.RopeScaling:
        return rope.RopeScaling(self.rope_scaling, self.rope_scaling_factor, self.rope_original_context)

    @property
    def lambda_shape(self) -> LambdaShape | None:
        """The Λ-shaped mask of attention_sink / attention_window, or None (full attention)."""
        return LambdaShape(self.attention_sink, self.attention_window) if self.attention_window else None

    @property
    def dense_options(self) -> dict:
        """The dtypes and quantization every projection (layers.Dense) is built with."""
        return dict(dtype=self.compute_dtype, param_dtype=self.weight_dtype, quant_bits=self.quant_bits,
                    quant_group_size=self.quant_group_size)

    @property
    def projection_inputs(self) -> dict[str, int]:
        """Input width of each projection that quantization applies to."""
        return {"attention/query, key, value and mlp/wi": self.hidden_size,
                "attention/out": self.num_heads * self.head_dim, "mlp/wo": self.mlp_dim}

    @property
    def gated_mlp(self) -> bool:
        return self.mlp_activation in ("geglu", "swiglu")

    @property
    def deepnorm_alpha(self) -> float:
        """DeepNorm residual scale, (2L)^0.5 (GLM-130B, ChatGLM-6B)."""
        return math.sqrt(2.0 * self.num_layers)

    @property
    def deepnorm_beta(self) -> float:
        """DeepNorm Xavier gain on FFN, value and output projections, (2L)^-0.5."""
        return (2.0 * self.num_layers) ** -0.5

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Closed-form parameter count (the same layout the GLM module creates)."""
        E, V, L = self.hidden_size, self.vocab_size, self.num_layers
        H, G, D, F = self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim
        attention = E * H * D + 2 * E * G * D + H * D * E
        attention += self.qkv_bias * (H + 2 * G) * D + self.out_bias * E
        up_width = 2 * F if self.gated_mlp else F
        mlp = E * up_width + F * E + self.mlp_bias * (up_width + E)
        norm = E * (2 if self.norm == "layernorm" else 1)
        norms_per_layer = 4 if self.residual == "sandwich" else 2
        per_layer = attention + mlp + norms_per_layer * norm
        total = L * per_layer + V * E
        total += 0 if self.residual == "post" else norm  # final norm
        total += 0 if self.tie_embeddings else V * E
        total += 2 * self.max_position * E if self.position == "learned_2d" else 0
        total += L * 2 * self.pre_seq_len * G * D
        total += self.prompt_len * E
        if self.adapter_dim:  # down + up with their biases, on attention and MLP of every layer
            total += L * 2 * (2 * E * self.adapter_dim + self.adapter_dim + E)
        return int(total)


def _fail(field: str, problem: str):
    raise ValueError(f"ModelConfig.{field} {problem}.")

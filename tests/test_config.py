"""ModelConfig validation and parameter counts of the presets (nothing allocated)."""

import jax
import pytest

from glm_jax.model import ModelConfig, abstract_params
from glm_jax.experiment import load_preset, preset_names

# Published sizes: ChatGLM2-6B and GLM-4-9B model cards; GLM-130B is the rounded
# "130B" of its paper (its exact config gives 128.7B, 1.0% below the name).
PUBLISHED = {"chatglm2_6b": 6.24e9, "glm4_9b": 9.40e9, "glm_130b": 130e9}


def independent_count(c: ModelConfig) -> int:
    """Parameter count written from architectures.md, separately from ModelConfig.num_params."""
    E, L = c.hidden_size, c.num_layers
    q = E * c.num_heads * c.head_dim + (c.num_heads * c.head_dim if c.qkv_bias else 0)
    kv = 2 * (E * c.num_kv_heads * c.head_dim + (c.num_kv_heads * c.head_dim if c.qkv_bias else 0))
    o = c.num_heads * c.head_dim * E + (E if c.out_bias else 0)
    inner = c.mlp_dim * (2 if c.mlp_activation in ("geglu", "swiglu") else 1)
    up = E * inner + (inner if c.mlp_bias else 0)
    down = c.mlp_dim * E + (E if c.mlp_bias else 0)
    norm = E if c.norm == "rmsnorm" else 2 * E
    layer = q + kv + o + up + down + norm * (4 if c.residual == "sandwich" else 2)
    embeddings = c.vocab_size * E * (1 if c.tie_embeddings else 2)
    positions = 2 * c.max_position * E if c.position == "learned_2d" else 0
    return L * layer + embeddings + positions + (0 if c.residual == "post" else norm)


def eval_shape_count(config: ModelConfig) -> int:
    leaves = jax.tree_util.tree_leaves(abstract_params(config), is_leaf=lambda x: hasattr(x, "names"))
    return sum(int(leaf.value.size) for leaf in leaves)


@pytest.mark.parametrize("name", preset_names())
def test_preset_count_matches_closed_forms(name):
    config = load_preset(name)
    counted = eval_shape_count(config)
    assert counted == independent_count(config) == config.num_params()


@pytest.mark.parametrize("name,published", sorted(PUBLISHED.items()))
def test_preset_count_matches_published(name, published):
    counted = eval_shape_count(load_preset(name))
    tolerance = 0.011 if name == "glm_130b" else 0.01  # 130B is a rounded name; exact is 128.70B
    assert abs(counted - published) / published < tolerance, counted


def test_presets_have_reference_knobs():
    chatglm2 = load_preset("chatglm2_6b")
    assert (chatglm2.num_kv_heads, chatglm2.rotary_dim, chatglm2.rope_style) == (2, 64, "interleaved")
    glm130b = load_preset("glm_130b")
    assert glm130b.deepnorm_alpha == pytest.approx(140 ** 0.5)
    assert glm130b.embedding_grad_scale == 0.1


@pytest.mark.parametrize("changes,field", [
    (dict(num_heads=8, num_kv_heads=3), "num_kv_heads"),
    (dict(num_heads=4, num_kv_heads=8), "num_kv_heads"),
    (dict(position="rope", head_dim=64, rotary_fraction=1.5), "rotary_fraction"),
    (dict(position="rope", head_dim=10, rotary_fraction=0.5), "rotary_fraction"),  # 5 rotary dims
    (dict(position="rope_2d", head_dim=6, rotary_fraction=1.0), "rotary_fraction"),  # halves of 3
    (dict(mlp_activation="relu"), "mlp_activation"),
    (dict(residual="preln"), "residual"),
    (dict(position="alibi"), "position"),
    (dict(norm="batchnorm"), "norm"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(hidden_size=256, num_heads=6), "num_heads"),  # head_dim unset: 6 heads cannot split 256
    (dict(embedding_grad_scale=0.0), "embedding_grad_scale"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(dtype="int8"), "dtype"),
    (dict(remat_policy="some"), "remat_policy"),
])
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}\b"):
        ModelConfig(**changes)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="chatglm2_6b"):
        load_preset("chatglm7")

"""An independent float64 numpy GLM, written from docs/architectures.md.

It shares no code with glm_jax: attention loops over heads with a mask built
from the rule by explicit loops, RoPE uses complex multiplication, norms and
MLPs are written out. It reads an UNSCANNED, unboxed parameter tree.
"""

import math

import numpy as np
from scipy.special import erf  # exact GeLU for GeGLU


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_exact(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def norm(x, p, kind, eps):
    if kind == "rmsnorm":
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * p["scale"]
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def rope_complex(x, pos, rotary_dim, style, theta):
    """x [T, D]; rotates pairs as complex numbers z * exp(i * pos * freq)."""
    x = x.copy()
    half = rotary_dim // 2
    freq = theta ** (-np.arange(half) * 2.0 / rotary_dim)
    phase = np.exp(1j * pos[:, None] * freq[None, :])
    if style == "interleaved":
        z = (x[:, 0:rotary_dim:2] + 1j * x[:, 1:rotary_dim:2]) * phase
        x[:, 0:rotary_dim:2], x[:, 1:rotary_dim:2] = z.real, z.imag
    else:
        z = (x[:, :half] + 1j * x[:, half:rotary_dim]) * phase
        x[:, :half], x[:, half:rotary_dim] = z.real, z.imag
    return x


def positional(cfg, x, pos, block):
    if cfg.position == "rope":
        return rope_complex(x, pos, cfg.rotary_dim, cfg.rope_style, cfg.rope_theta)
    if cfg.position == "rope_2d":
        r = cfg.rotary_dim // 2
        out = x.copy()
        out[:, :r] = rope_complex(x[:, :r], pos, r, cfg.rope_style, cfg.rope_theta)
        out[:, r:2 * r] = rope_complex(x[:, r:2 * r], block, r, cfg.rope_style, cfg.rope_theta)
        return out
    return x


def mask_by_loops(seg, prefix):
    T = len(seg)
    m = np.zeros((T, T), bool)
    for q in range(T):
        for k in range(T):
            m[q, k] = seg[q] == seg[k] and (k <= q or prefix[k])
    return m


def narrow_by_loops(allowed, seg, sink=0, window=0, windows=None):
    """The context-extension options, key by key: Λ-shaped attention (window > 0: keys among the first
    `sink` of their segment or less than `window` behind the query) and parallel context windows
    (a query in window w > 0 sees only window w's keys; a task query, 0, every key)."""
    allowed = allowed.copy()
    start = {}
    for t, s in enumerate(seg):
        start.setdefault(s, t)
    T = len(seg)
    for q in range(T):
        for k in range(T):
            if window and k - start[seg[k]] >= sink and q - k >= window:
                allowed[q, k] = False
            if windows is not None and windows[q] != 0 and windows[q] != windows[k]:
                allowed[q, k] = False
    return allowed


def dense(x, p, n_in=1):
    w = p["kernel"]
    y = np.tensordot(x, w, axes=n_in)
    return y + p["bias"] if "bias" in p else y


def attention(cfg, p, x, pos, block, seg, prefix, windows=None):
    H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = dense(x, p["query"]), dense(x, p["key"]), dense(x, p["value"])  # [T, heads, D]
    allowed = narrow_by_loops(mask_by_loops(seg, prefix), seg, cfg.attention_sink, cfg.attention_window, windows)
    out = np.zeros_like(q)
    for h in range(H):
        g = h // (H // G)
        qh = positional(cfg, q[:, h], pos, block)
        kh = positional(cfg, k[:, g], pos, block)
        s = qh @ kh.T / math.sqrt(D)
        s = np.where(allowed, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        out[:, h] = (w / w.sum(-1, keepdims=True)) @ v[:, g]
    return dense(out, p["out"], n_in=2)


def mlp_layer(cfg, p, x):
    if cfg.mlp_activation == "gelu":
        return dense(gelu_tanh(dense(x, p["wi"])), p["wo"])
    # Rebuild the reference's fused [E, 2F] up projection: index 0 = first half.
    F = cfg.mlp_dim
    fused = {"kernel": p["wi"]["kernel"].reshape(x.shape[-1], 2 * F)}
    if "bias" in p["wi"]:
        fused["bias"] = p["wi"]["bias"].reshape(2 * F)
    h = dense(x, fused)
    x1, x2 = h[:, :F], h[:, F:]
    inner = x1 * gelu_exact(x2) if cfg.mlp_activation == "geglu" else silu(x1) * x2
    return dense(inner, p["wo"])


def bottleneck_adapter(p, h):
    """Houlsby et al. 2019: h + up(gelu(down(h))), with biases."""
    return h + gelu_tanh(h @ p["adapter_down"] + p["adapter_down_bias"]) @ p["adapter_up"] + p["adapter_up_bias"]


def block(cfg, p, x, pos, blk, seg, prefix, windows=None):
    def n(name, h):
        return norm(h, p[name], cfg.norm, cfg.norm_eps)

    def adapted(name, h):  # a bottleneck adapter on a sublayer's output, where the parameters have one
        return bottleneck_adapter(p[name], h) if name in p else h

    def att(h):
        return adapted("attention_adapter", attention(cfg, p["attention"], h, pos, blk, seg, prefix, windows))

    def mlp(cfg, p_mlp, h):
        return adapted("mlp_adapter", mlp_layer(cfg, p_mlp, h))

    if cfg.residual == "pre":
        x = x + att(n("input_norm", x))
        return x + mlp(cfg, p["mlp"], n("post_attention_norm", x))
    if cfg.residual == "post":
        x = n("input_norm", x + att(x))
        return n("post_attention_norm", x + mlp(cfg, p["mlp"], x))
    if cfg.residual == "deepnorm":
        alpha = math.sqrt(2 * cfg.num_layers)
        a = n("input_norm", x)
        h = alpha * a + att(a)
        m = n("post_attention_norm", h)
        return alpha * m + mlp(cfg, p["mlp"], m)
    x = x + n("post_attention_branch_norm", att(n("input_norm", x)))
    return x + n("post_mlp_branch_norm", mlp(cfg, p["mlp"], n("post_attention_norm", x)))


def forward(cfg, params, tokens, positions, segment_ids, prefix_mask, context_windows=None):
    """Logits [B, T, V] in float64 for one batch (context_windows: [B, T] parallel context windows)."""
    params = _to_f64(params)
    out = []
    for b in range(tokens.shape[0]):
        pos, blk = positions[b, 0], positions[b, 1]
        x = params["embedding"][tokens[b]]
        if cfg.position == "learned_2d":
            x = x + params["position_embedding"][pos] + params["block_position_embedding"][blk]
        for i in range(cfg.num_layers):
            x = block(cfg, params[f"layers_{i}"], x, pos, blk, segment_ids[b], prefix_mask[b],
                      None if context_windows is None else context_windows[b])
        if cfg.residual != "post":
            x = norm(x, params["final_norm"], cfg.norm, cfg.norm_eps)
        head = params["embedding"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]
        out.append(x @ head)
    return np.stack(out)


def _to_f64(tree):
    if isinstance(tree, dict):
        return {k: _to_f64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)

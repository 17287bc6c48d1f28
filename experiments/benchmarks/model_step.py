"""Forward+backward speed of glm_tiny and a 59M-parameter model vs a float32 matmul peak.

    python experiments/benchmarks/model_step.py [--steps 5] [--out experiments/results/model_step.json]

Everything is measured in one run, so the ratios (model FLOP/s / matmul FLOP/s)
are comparable even on a noisy machine. Model FLOPs are analytic
(glm_jax.train.flops): 'attended' follows GLM's mask, 'full_matrix' counts
T x T per row like MaxText / Levanter.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.model import GLM, ModelConfig, init_params
from glm_jax.experiment import load_preset
from glm_jax.evaluation import loss_sums
from glm_jax.train.flops import training_flops_both

# The Foundation issue's benchmark model: 59M parameters, SwiGLU, float32.
BENCH_59M = dict(vocab_size=32768, hidden_size=512, num_layers=8, num_heads=8, mlp_dim=1408,
                 mlp_activation="swiglu", norm="rmsnorm", position="rope", rope_style="interleaved",
                 rotary_fraction=0.5, qkv_bias=True, out_bias=False, mlp_bias=False,
                 tie_embeddings=False)


def retain_freed_memory() -> bool:
    """Make glibc serve every allocation from its heap and keep what is freed; False where not glibc.

    A measurement condition, not a glm_jax setting: eager PyTorch allocates each step's
    tensors with malloc, and by default glibc maps every allocation over 32 MiB afresh and
    unmaps it on free, so each step pays page faults and kernel zeroing for its large
    tensors. With this setting the 59M train step of PyTorch ran 1.4x faster on the 2-core
    CPU (train_step.py, malloc rows), while XLA:CPU's step kept its ~1.05 M minor page faults
    per step either way (its buffers do not come back from this heap), so it changed little.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # mallopt options, glibc malloc.h
    settings = ((m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_top_pad, 2**30))
    return all(libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) == 1 for option, value in settings)


def timed(fn, *args, steps: int) -> float:
    """Median wall seconds of fn(*args) over `steps` runs, after one compile+warm-up run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(n: int | None = None, steps: int = 10, dtype="float32") -> float:
    """Achieved FLOP/s of one large square matmul in `dtype` (the machine's practical peak).

    n defaults to 2048 on CPU and 8192 on an accelerator (a smaller product does not fill one).
    On a GPU a float32 product runs in TF32, jax's default there.
    """
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    b = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)), dtype)
    seconds = timed(jax.jit(jnp.matmul), a, b, steps=steps)
    return 2.0 * n ** 3 / seconds


def machine() -> str:
    """What the figures were measured on, for the tables and the JSON."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        import os

        return f"{os.cpu_count()} CPU cores"
    return device.device_kind


def torch_device():
    """The torch device matching jax's backend: the peer runs where glm_jax runs."""
    import torch

    return torch.device("cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu")


def torch_synchronized(fn, device):
    """fn followed by a wait for the GPU, so `timed` measures the device work, not the launch."""
    import torch

    def run(*args):
        out = fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def glm_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict:
    """One GLM-shaped batch: a single example per row with a random Part A / Part B split."""
    rng = np.random.default_rng(seed)
    sep = rng.integers(length // 4, 3 * length // 4, size=batch)
    index = np.arange(length)
    prefix = index[None] < sep[:, None]
    positions = np.stack([np.minimum(index[None], sep[:, None] - 1),
                          np.maximum(index[None] - sep[:, None] + 1, 0)], 1).astype(np.int32)
    return dict(tokens=rng.integers(0, vocab, (batch, length), dtype=np.int32),
                targets=rng.integers(0, vocab, (batch, length), dtype=np.int32),
                loss_mask=(~prefix).astype(np.float32), positions=positions,
                segment_ids=np.ones((batch, length), np.int32), prefix_mask=prefix)


def measure(name: str, config: ModelConfig, batch: int, length: int, steps: int, peak: float) -> dict:
    params = nn.meta.unbox(init_params(config, jax.random.key(0)))
    data = {k: jnp.asarray(v) for k, v in glm_batch(batch, length, config.vocab_size).items()}

    def loss_fn(p, d):  # the training loss: head + cross-entropy in chunks (glm_jax.model.chunked_loss)
        objective, sums = loss_sums(GLM(config), p, d)
        return objective / jnp.maximum(sums["count"], 1.0)

    seconds = timed(jax.jit(jax.value_and_grad(loss_fn)), params, data, steps=steps)
    flops = training_flops_both(config, np.asarray(data["segment_ids"]), np.asarray(data["prefix_mask"]))
    return {"model": name, "params": config.num_params(), "batch": batch, "seq_len": length,
            "step_seconds": seconds, "tokens_per_second": batch * length / seconds,
            "model_flops_per_second": flops["attended"] / seconds,
            "fraction_of_matmul_peak": flops["attended"] / seconds / peak,
            "fraction_of_matmul_peak_full_matrix": flops["full_matrix"] / seconds / peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--malloc", choices=["default", "retain"], default="default",
                        help="host allocator: glibc's default or retain_freed_memory (see there)")
    parser.add_argument("--out", default="experiments/results/model_step.json")
    args = parser.parse_args()
    if args.malloc == "retain":
        retain_freed_memory()

    peak = matmul_peak()
    rows = [measure("glm_tiny", load_preset("glm_tiny"), args.batch, args.seq_len, args.steps, peak),
            measure("bench_59m", ModelConfig(**BENCH_59M), args.batch, args.seq_len, args.steps, peak)]

    print(f"float32 matmul peak (2048^3): {peak / 1e9:.1f} GFLOP/s on {jax.devices()[0].device_kind}")
    header = f"{'model':<10} {'params':>8} {'B x T':>8} {'step s':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'of peak':>8} {'(full T^2)':>10}"
    print(header)
    for r in rows:
        print(f"{r['model']:<10} {r['params'] / 1e6:>7.1f}M {r['batch']:>3}x{r['seq_len']:<4} "
              f"{r['step_seconds']:>8.3f} {r['tokens_per_second']:>9.0f} {r['model_flops_per_second'] / 1e9:>8.1f} "
              f"{r['fraction_of_matmul_peak']:>8.1%} {r['fraction_of_matmul_peak_full_matrix']:>10.1%}")
    result = {"benchmark": "model_step (forward+backward, float32)", "jax": jax.__version__,
              "machine": platform.machine(), "cpu_count": __import__("os").cpu_count(),
              "matmul_peak_flops_per_second": peak, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

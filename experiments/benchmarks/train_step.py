"""Full train step (forward, backward, AdamW) of the 59M benchmark model vs a PyTorch peer and the matmul peak.

    pip install torch==2.13.0 'glm_jax[bench]'   # CPU torch from the local file, transformers
    python experiments/benchmarks/train_step.py [--steps 5] [--dtype float32|bfloat16] [--malloc default|retain|both]
        [--out experiments/results/train_step.json]

Side by side in one run on this machine: (a) the float32 matmul peak, (b) the
glm_jax train step exactly as glm_jax.train runs it (jit, donated state, clip +
AdamW), (c) Hugging Face transformers GlmForCausalLM (the same architecture:
SwiGLU, RMSNorm, partial interleaved RoPE, QKV bias, untied head) trained with
torch.optim.AdamW on the same token ids. MFU uses analytic FLOPs
(glm_jax.train.flops): 6 * matmul params per token + attention over attended pairs.
Both systems run under glibc's default allocator and then (--malloc both, the
default) with freed memory retained (model_step.retain_freed_memory), which removes
eager PyTorch's per-step page faults on its large tensors: a fair comparison gives
both sides the same allocator.

On a GPU both run there: glm_jax with the Triton flash kernel ('auto'), the peer with
SDPA on CUDA. --dtype bfloat16 is mixed precision on both sides (float32 parameters and
optimizer state, bf16 compute: glm_jax's ModelConfig.dtype, torch.autocast); float32
matmuls run in TF32 on both sides (jax's default on GPU; torch is set to match), and the
peak is measured in the same dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from model_step import (BENCH_59M, glm_batch, machine, matmul_peak, retain_freed_memory, timed,  # noqa: E402
                        torch_device, torch_synchronized)

from glm_jax.model import ModelConfig  # noqa: E402
from glm_jax.parallel.mesh import MeshConfig, make_mesh  # noqa: E402
from glm_jax.parallel.rules import logical_axis_rules  # noqa: E402
from glm_jax.train.flops import training_flops, training_flops_both  # noqa: E402
from glm_jax.optim import OptimizerConfig, make_optimizer  # noqa: E402
from glm_jax.train.state import init_state, state_shardings  # noqa: E402
from glm_jax.train.step import make_train_step  # noqa: E402


def glm_jax_step_seconds(config: ModelConfig, batch: dict, repeats: int) -> float:
    mesh = make_mesh(MeshConfig(num_devices=1))
    rules = logical_axis_rules("fsdp")
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-4), 1000)
    shardings = state_shardings(config, tx, mesh, rules)
    holder = {"state": init_state(config, tx, jax.random.key(0), shardings)}
    with jax.set_mesh(mesh):
        step = jax.jit(make_train_step(config, tx, schedule, rules), donate_argnums=0)
    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def run():
        with jax.set_mesh(mesh):
            holder["state"], metrics = step(holder["state"], device_batch)
        jax.block_until_ready(metrics["loss"])

    return timed(run, steps=repeats)


def torch_step_seconds(batch: dict, repeats: int, dtype: str) -> float | None:
    try:
        import torch
        from transformers import GlmConfig, GlmForCausalLM
    except ImportError:
        print("torch / transformers not installed: skipping the PyTorch peer (pip install torch==2.13.0 "
              "'glm_jax[bench]')")
        return None
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_float32_matmul_precision("high")  # TF32 on a GPU, as jax's default; no effect on CPU
    device = torch_device()
    c = BENCH_59M
    hf = GlmConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_hidden_layers=c["num_layers"],
                   num_attention_heads=c["num_heads"], num_key_value_heads=c["num_heads"],
                   head_dim=c["hidden_size"] // c["num_heads"], intermediate_size=c["mlp_dim"],
                   partial_rotary_factor=c["rotary_fraction"], attention_bias=True, tie_word_embeddings=False,
                   max_position_embeddings=max(4096, batch["tokens"].shape[1]), pad_token_id=0,
                   attn_implementation="sdpa")
    model = GlmForCausalLM(hf).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.from_numpy(batch["tokens"]).long().to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def run():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return timed(torch_synchronized(run, device), steps=repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype (bfloat16: mixed precision, float32 parameters)")
    parser.add_argument("--malloc", choices=["default", "retain", "both"], default="both",
                        help="host allocator for both systems: glibc's default, model_step.retain_freed_memory "
                             "(freed memory kept: eager PyTorch's large tensors stop page-faulting), or both in turn")
    parser.add_argument("--out", default="experiments/results/train_step.json")
    args = parser.parse_args()

    config = ModelConfig(**BENCH_59M, dtype=args.dtype)
    batch = glm_batch(args.batch, args.seq_len, config.vocab_size)
    flops = training_flops_both(config, batch["segment_ids"], batch["prefix_mask"])
    tokens = args.batch * args.seq_len
    causal_pairs = args.batch * args.seq_len * (args.seq_len + 1) // 2  # the peer trains a causal LM
    rows, ratios = [], {}
    # Default first: once freed memory is retained, the process cannot go back to a cold heap.
    for malloc in (["default", "retain"] if args.malloc == "both" else [args.malloc]):
        if malloc == "retain" and not retain_freed_memory():
            print("glibc malloc not found: skipping malloc=retain")
            continue
        peak = matmul_peak(dtype=args.dtype)
        ours = glm_jax_step_seconds(config, batch, args.steps)
        peer = torch_step_seconds(batch, args.steps, args.dtype)
        rows.append({"system": "glm_jax (jax.jit, AdamW)", "malloc": malloc, "matmul_peak": peak,
                     "step_seconds": ours, "tokens_per_second": tokens / ours,
                     "fraction_of_matmul_peak": flops["attended"] / ours / peak,
                     "fraction_of_matmul_peak_full_matrix": flops["full_matrix"] / ours / peak})
        if peer is not None:
            rows.append({"system": "transformers GlmForCausalLM (torch AdamW)", "malloc": malloc,
                         "matmul_peak": peak, "step_seconds": peer, "tokens_per_second": tokens / peer,
                         "fraction_of_matmul_peak": training_flops(config, tokens, causal_pairs) / peer / peak,
                         "fraction_of_matmul_peak_full_matrix": flops["full_matrix"] / peer / peak})
            ratios[malloc] = peer / ours
    print(f"59M GLM train step, B={args.batch}, T={args.seq_len}, {args.dtype}, {machine()}")
    print(f"{'system':<44} {'malloc':>7} {'peak GF/s':>9} {'step s':>8} {'tokens/s':>9} {'MFU':>7} {'MFU (T^2)':>10}")
    for r in rows:
        print(f"{r['system']:<44} {r['malloc']:>7} {r['matmul_peak'] / 1e9:>9.1f} {r['step_seconds']:>8.3f} "
              f"{r['tokens_per_second']:>9.0f} {r['fraction_of_matmul_peak']:>7.1%} "
              f"{r['fraction_of_matmul_peak_full_matrix']:>10.1%}")
    for malloc, ratio in ratios.items():
        print(f"glm_jax / PyTorch tokens/s (malloc={malloc}): {ratio:.2f}x")
    result = {"benchmark": f"train_step (59M, {args.dtype})", "machine": machine(), "jax": jax.__version__,
              "batch": args.batch, "seq_len": args.seq_len, "rows": rows, "speedup_vs_torch": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

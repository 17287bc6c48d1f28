"""Attention memory and block skipping: the XLA reference vs the Pallas flash kernel.

    python experiments/benchmarks/attention.py [--lengths 1024 2048 4096 8192 16384] [--time]
    python experiments/benchmarks/attention.py --backend gpu [--batch 4]   # on a GPU: kernel vs cuDNN vs XLA
    python experiments/benchmarks/attention.py --backend tpu   # on a TPU: kernel vs Splash
    python experiments/benchmarks/attention.py --tpu_topology v5e:2x2   # TPU HBM from the AOT compile, on CPU
    python experiments/benchmarks/attention.py --blockwise   # CPU: dense reference vs the XLA blockwise path

CPU mode: compiled temporary memory (`compiled.memory_analysis()`) of forward+backward
for both paths at Hq=8, Hkv=2, D=128, B=1 (a GLM mask with one prefix), the
attended-pair ratio vs the visited-block ratio of packed GLM batches, and (with
--time) CPU wall time, where the kernel runs in interpret mode: not its target
platform. GPU mode times the Triton kernel against jax.nn.dot_product_attention
(cuDNN); TPU mode times the Mosaic kernel against JAX's Splash attention (with a
causal mask: Splash has no per-example prefix masks). --tpu_topology compiles
forward+backward (bf16) for one chip of a TPU topology with the real TPU compiler
(libtpu) and reports its per-device HBM for both paths. The GPU mode ran on an H100
(experiments/results/gpu/attention_gpu.json; cuDNN gets the GLM mask as a dense mask, so it
computes every block); the TPU timing mode has not run on a TPU (its two programs compile for
v5e from CPU, tests/test_flash_attention_tpu.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from model_step import timed  # noqa: E402

from glm_jax.kernels import masks
from glm_jax.kernels.attention import xla_attention
from glm_jax.kernels.blocks import visited_blocks
from glm_jax.kernels.flash_attention import count_forward_visits, flash_attention

HQ, HKV, D = 8, 2, 128
LIMIT_BYTES = 16 << 30


def glm_mask(T: int):
    segment_ids = jnp.ones((1, T), jnp.int32)
    prefix_mask = jnp.arange(T)[None] < T // 2  # Part A = half the row
    return segment_ids, prefix_mask


def fwd_bwd(impl: str, T: int, **kernel_options):
    """Jitted forward+backward (a sum of the outputs) under the GLM mask of length T.

    impl: 'xla' (the reference), 'pallas' (the generic kernel with 128-blocks, interpret
    mode unless kernel_options say otherwise) or 'tpu' (the Mosaic kernel).
    """
    from glm_jax.kernels.flash_attention_tpu import flash_attention_tpu

    seg, prefix = glm_mask(T)
    attend = {"xla": xla_attention,
              "pallas": functools.partial(flash_attention, block_q=128, block_k=128,
                                          **{"interpret": True, **kernel_options}),
              "tpu": flash_attention_tpu}[impl]

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v, seg, prefix, scale=D ** -0.5).astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def avals(T: int, dtype=jnp.float32):
    return (jax.ShapeDtypeStruct((1, T, HQ, D), dtype), jax.ShapeDtypeStruct((1, T, HKV, D), dtype),
            jax.ShapeDtypeStruct((1, T, HKV, D), dtype))


def temp_bytes(impl: str, T: int) -> int:
    return fwd_bwd(impl, T).lower(*avals(T)).compile().memory_analysis().temp_size_in_bytes


def pair_vs_block_ratios(T: int = 4096, block: int = 128, seed: int = 0) -> dict:
    """Ideal (attended pairs / T^2) vs achieved (visited blocks / all blocks) on packed rows.

    The visited blocks are counted inside the forward kernel (interpret mode, one head) and
    checked against the count from the key ranges; the unmasked share is reported too.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from conftest import random_packing

    B = 8
    seg, prefix, _ = random_packing(np.random.default_rng(seed), B, T, max_segments=5)
    seg, prefix = jnp.asarray(seg), jnp.asarray(prefix)
    pairs = float(masks.dense_mask(seg, prefix).sum()) / (B * T * T)
    x = jnp.zeros((B, T, 1, 16), jnp.float32)
    masked, unmasked = (int(c.sum()) for c in count_forward_visits(x, x, x, seg, prefix, block_q=block, block_k=block))
    from_ranges = int(visited_blocks(seg, prefix, block, block).sum())
    if masked + unmasked != from_ranges:
        raise AssertionError(f"kernel visited {masked + unmasked} blocks, key ranges say {from_ranges}")
    total = B * (T // block) ** 2
    return {"T": T, "block": block, "attended_pair_ratio": pairs, "visited_block_ratio": (masked + unmasked) / total,
            "unmasked_block_ratio": unmasked / total}


def wall_seconds(fn, T: int, repeats: int = 3) -> float:
    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.normal(size=a.shape), a.dtype) for a in avals(T)]
    return timed(fn, *args, steps=repeats)


def cpu_report(lengths: list[int], with_time: bool) -> dict:
    rows = []
    for T in lengths:
        row = {"T": T}
        for impl in ("xla", "pallas"):
            row[f"{impl}_temp_bytes"] = temp_bytes(impl, T)
            if with_time and T <= 4096:
                row[f"{impl}_seconds"] = wall_seconds(fwd_bwd(impl, T), T)
        row["ratio"] = row["pallas_temp_bytes"] / row["xla_temp_bytes"]
        rows.append(row)
    print(f"forward+backward temporary memory, B=1, Hq={HQ}, Hkv={HKV}, D={D}, float32, GLM mask (sep = T/2)")
    print(f"{'T':>6} {'XLA MiB':>10} {'Pallas MiB':>11} {'kernel/XLA':>11}" + (f" {'XLA s':>8} {'Pallas s':>9}" if with_time else ""))
    for r in rows:
        line = f"{r['T']:>6} {r['xla_temp_bytes'] / 2**20:>10.1f} {r['pallas_temp_bytes'] / 2**20:>11.1f} {r['ratio']:>11.3f}"
        if with_time and "xla_seconds" in r:
            line += f" {r['xla_seconds']:>8.3f} {r['pallas_seconds']:>9.3f}"
        print(line)
    fits = {impl: max([r["T"] for r in rows if r[f"{impl}_temp_bytes"] <= LIMIT_BYTES], default=None)
            for impl in ("xla", "pallas")}
    print(f"largest T within 16 GiB of temporaries: XLA {fits['xla']}, Pallas {fits['pallas']}")
    skipping = [pair_vs_block_ratios(T) for T in (1024, 4096)]
    for s in skipping:
        print(f"packed GLM rows, T={s['T']}, blocks {s['block']}: attended pairs {s['attended_pair_ratio']:.1%} of T^2, "
              f"visited blocks {s['visited_block_ratio']:.1%} of all blocks (counted in the kernel; "
              f"{s['unmasked_block_ratio']:.1%} run unmasked)")
    return {"rows": rows, "largest_T_within_16GiB": fits, "block_skipping": skipping}


# Triton launch configurations tried by the GPU mode: (block_q, block_k, num_warps, num_stages).
GPU_CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2), (64, 128, 4, 2)]


def gpu_programs(T: int, batch: int, config=(64, 64, 4, 2)) -> dict:
    """bf16 forward+backward programs for the GPU mode: the Triton kernel with one launch
    configuration, cuDNN through jax.nn.dot_product_attention under the same dense GLM mask,
    and the XLA reference (what 'xla' runs)."""
    from jax.experimental.pallas import triton as pallas_triton

    block_q, block_k, num_warps, num_stages = config
    seg, prefix = glm_mask(T)
    seg, prefix = jnp.tile(seg, (batch, 1)), jnp.tile(prefix, (batch, 1))
    mask = masks.dense_mask(seg, prefix)[:, None]

    def loss_of(attend):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)),
                                          argnums=(0, 1, 2)))

    params = pallas_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return {
        "pallas": loss_of(lambda q, k, v: flash_attention(q, k, v, seg, prefix, scale=D ** -0.5, block_q=block_q,
                                                          block_k=block_k, compiler_params=params)),
        "cudnn": loss_of(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=D ** -0.5,
                                                                      implementation="cudnn")),
        "xla": loss_of(lambda q, k, v: xla_attention(q, k, v, seg, prefix, scale=D ** -0.5)),
    }


def gpu_args(T: int, batch: int) -> list:
    rng = np.random.default_rng(0)
    shapes = [(batch, *a.shape[1:]) for a in avals(T)]
    return [jnp.asarray(rng.normal(size=shape), jnp.bfloat16) for shape in shapes]


def gpu_time(fn, args) -> float | str:
    try:
        return timed(fn, *args, steps=20)
    except Exception as error:  # a peer that cannot run this shape (e.g. cuDNN's limits) is reported, not fatal
        return str(error).splitlines()[0][:160]


def attended_flops(T: int, batch: int) -> float:
    """Forward+backward FLOPs over the attended pairs only: 4 D per pair forward (QK^T, PV),
    10 D backward (recomputed scores, dV, dP, dQ, dK), per query head."""
    seg, prefix = glm_mask(T)
    pairs = float(masks.dense_mask(seg, prefix).sum()) * batch
    return 14.0 * pairs * D * HQ


def gpu_report(lengths: list[int], batch: int, configs=GPU_CONFIGS) -> dict:
    sweep_T = 4096 if 4096 in lengths else lengths[len(lengths) // 2]
    args = gpu_args(sweep_T, batch)
    sweep = [{"config": list(c), "seconds": gpu_time(gpu_programs(sweep_T, batch, c)["pallas"], args)}
             for c in configs] if len(configs) > 1 else [{"config": list(configs[0]), "seconds": None}]
    timed_ok = [s for s in sweep if isinstance(s["seconds"], float)]
    best = tuple(min(timed_ok, key=lambda s: s["seconds"])["config"]) if timed_ok else configs[0]
    if len(configs) > 1:
        print(f"Triton launch configurations at T={sweep_T} (block_q, block_k, warps, stages): "
              + ", ".join(f"{tuple(s['config'])} {s['seconds'] * 1e3:.2f} ms" if isinstance(s["seconds"], float)
                          else f"{tuple(s['config'])} failed: {s['seconds']}" for s in sweep))
    rows = []
    for T in lengths:
        args = gpu_args(T, batch)
        row = {"T": T, "batch": batch, "config": list(best)}
        for name, fn in gpu_programs(T, batch, best).items():
            row[f"{name}_seconds"] = gpu_time(fn, args)
            print(f"T={T} {name}: {row[f'{name}_seconds']}", flush=True)
        row["pallas_attended_tflops"] = (attended_flops(T, batch) / row["pallas_seconds"] / 1e12
                                         if isinstance(row["pallas_seconds"], float) else None)
        rows.append(row)
    print(f"forward+backward bf16, B={batch}, Hq={HQ}, Hkv={HKV}, D={D}, GLM mask (sep = T/2), "
          f"Triton config {best}, {jax.devices()[0].device_kind}")
    print(f"{'T':>6} {'Triton ms':>10} {'cuDNN ms':>10} {'XLA ms':>10} {'cuDNN/Triton':>13} {'XLA/Triton':>11} "
          f"{'Triton TFLOP/s':>15}")
    for r in rows:
        cells = [f"{r[k] * 1e3:.2f}" if isinstance(r[k], float) else "failed"
                 for k in ("pallas_seconds", "cudnn_seconds", "xla_seconds")]
        ratios = [f"{r[k] / r['pallas_seconds']:.2f}" if isinstance(r[k], float) and isinstance(r["pallas_seconds"], float)
                  else "-" for k in ("cudnn_seconds", "xla_seconds")]
        tflops = f"{r['pallas_attended_tflops']:.1f}" if r["pallas_attended_tflops"] else "-"
        print(f"{r['T']:>6} {cells[0]:>10} {cells[1]:>10} {cells[2]:>10} {ratios[0]:>13} {ratios[1]:>11} {tflops:>15}")
    for r in rows:
        for k in ("cudnn_seconds", "xla_seconds"):
            if not isinstance(r[k], float):
                print(f"T={r['T']} {k.split('_')[0]}: {r[k]}")
    return {"device": jax.devices()[0].device_kind, "sweep_T": sweep_T, "sweep": sweep, "rows": rows}


def tpu_hbm_report(lengths: list[int], topology: str) -> dict:
    """Per-device HBM (arguments + outputs + temporaries) of bf16 forward+backward on one TPU chip."""
    from jax.sharding import SingleDeviceSharding

    from glm_jax.parallel.tpu_topology import topology_devices

    device = topology_devices(topology)[0]
    sharding = SingleDeviceSharding(device)
    rows = []
    for T in lengths:
        row = {"T": T}
        for impl, program in (("xla", "xla"), ("pallas", "tpu")):
            args = [jax.ShapeDtypeStruct(a.shape, jnp.bfloat16, sharding=sharding) for a in avals(T)]
            try:
                memory = fwd_bwd(program, T).lower(*args).compile().memory_analysis()
                row[f"{impl}_hbm_bytes"] = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                            + memory.temp_size_in_bytes)
                row[f"{impl}_temp_bytes"] = memory.temp_size_in_bytes
            except Exception as error:  # the TPU compiler rejects programs that do not fit in HBM
                row[f"{impl}_hbm_bytes"] = None
                row[f"{impl}_error"] = str(error).splitlines()[0][:200]
        rows.append(row)
    print(f"{topology} ({device.device_kind}), one chip, forward+backward bf16, B=1, Hq={HQ}, Hkv={HKV}, D={D}")
    print(f"{'T':>6} {'XLA HBM MiB':>12} {'Pallas HBM MiB':>15} {'XLA temp MiB':>13} {'Pallas temp MiB':>16}")
    for r in rows:
        cells = [f"{r[k] / 2**20:.1f}" if r.get(k) is not None else "does not fit"
                 for k in ("xla_hbm_bytes", "pallas_hbm_bytes", "xla_temp_bytes", "pallas_temp_bytes")]
        print(f"{r['T']:>6} {cells[0]:>12} {cells[1]:>15} {cells[2]:>13} {cells[3]:>16}")
    return {"topology": topology, "device_kind": device.device_kind, "tpu_rows": rows}


def tpu_programs(T: int) -> dict:
    """The two jitted forward+backward programs the TPU mode times: the GLM kernel (GLM mask with
    sep T/2) and JAX's Splash attention (causal: Splash has no per-example prefix masks)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    kernel = splash.make_splash_mha(splash_mask.MultiHeadMask([splash_mask.CausalMask((T, T))] * HQ),
                                    head_shards=1, q_seq_shards=1)

    def splash_loss(q, k, v):  # Splash wants [H, T, D] per example and as many K/V heads as Q heads
        k, v = (jnp.repeat(x, HQ // HKV, axis=2) for x in (k, v))
        out = kernel(*(x[0].transpose(1, 0, 2) for x in (q * D ** -0.5, k, v)))
        return jnp.sum(out.astype(jnp.float32))

    return {"pallas": fwd_bwd("tpu", T), "splash_causal": jax.jit(jax.value_and_grad(splash_loss, argnums=(0, 1, 2)))}


def tpu_report(lengths: list[int]) -> dict:
    rows = []
    for T in lengths:
        rng = np.random.default_rng(0)
        args = [jnp.asarray(rng.normal(size=a.shape), jnp.bfloat16) for a in avals(T, jnp.bfloat16)]
        row = {"T": T}
        for name, fn in tpu_programs(T).items():
            row[f"{name}_seconds"] = timed(fn, *args, steps=10)
        rows.append(row)
        print(f"T={T}: GLM kernel {row['pallas_seconds'] * 1e3:.2f} ms, "
              f"Splash (causal) {row['splash_causal_seconds'] * 1e3:.2f} ms")
    return {"rows": rows}


# (batch, length) at the 59M benchmark model's heads (8 x 64, MHA): its own shape first.
BLOCKWISE_SHAPES = [(8, 512), (4, 1024), (2, 2048), (1, 4096)]


def blockwise_report(shapes=BLOCKWISE_SHAPES, heads: int = 8, head_dim: int = 64, repeats: int = 5) -> dict:
    """CPU wall time of the dense XLA reference vs the XLA blockwise path, forward and forward+backward.

    GLM rows with one prefix each (Part A of a random length in [T/4, 3T/4), as the train-step
    benchmark's batches), float32.
    """
    from glm_jax.kernels.blockwise_attention import blockwise_attention

    rows = []
    for B, T in shapes:
        rng = np.random.default_rng(0)
        sep = rng.integers(T // 4, 3 * T // 4, size=B)
        seg, prefix = jnp.ones((B, T), jnp.int32), jnp.asarray(np.arange(T)[None] < sep[:, None])
        q, k, v, cotangent = (jnp.asarray(rng.normal(size=(B, T, heads, head_dim)), jnp.float32) for _ in range(4))
        row = {"batch": B, "T": T, "heads": heads, "head_dim": head_dim}
        for name, attend in (("dense", xla_attention), ("blockwise", blockwise_attention)):
            forward = jax.jit(lambda q, k, v, attend=attend: attend(q, k, v, seg, prefix, scale=head_dim ** -0.5))
            both = jax.jit(jax.grad(lambda q, k, v, f=forward: jnp.sum(f(q, k, v) * cotangent), argnums=(0, 1, 2)))
            row[f"{name}_forward_seconds"] = timed(forward, q, k, v, steps=repeats)
            row[f"{name}_forward_backward_seconds"] = timed(both, q, k, v, steps=repeats)
        rows.append(row)
    print(f"CPU attention, {heads} heads x {head_dim}, float32, one GLM prefix per row: dense reference vs blockwise")
    print(f"{'B x T':>9} {'dense fwd s':>12} {'blockwise':>10} {'speedup':>8} {'dense f+b s':>12} {'blockwise':>10} {'speedup':>8}")
    for r in rows:
        fwd = r["dense_forward_seconds"] / r["blockwise_forward_seconds"]
        both = r["dense_forward_backward_seconds"] / r["blockwise_forward_backward_seconds"]
        print(f"{r['batch']:>3} x {r['T']:<4} {r['dense_forward_seconds']:>12.4f} {r['blockwise_forward_seconds']:>10.4f} "
              f"{fwd:>7.2f}x {r['dense_forward_backward_seconds']:>12.4f} "
              f"{r['blockwise_forward_backward_seconds']:>10.4f} {both:>7.2f}x")
    return {"rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--backend", choices=["cpu", "gpu", "tpu"], default="cpu")
    parser.add_argument("--batch", type=int, default=1, help="GPU mode: examples per call")
    parser.add_argument("--triton_config", type=int, nargs=4, default=None, metavar=("BQ", "BK", "WARPS", "STAGES"),
                        help="GPU mode: time this launch configuration instead of sweeping GPU_CONFIGS")
    parser.add_argument("--tpu_topology", default=None, help="e.g. v5e:2x2: TPU HBM from the AOT compile (on CPU)")
    parser.add_argument("--time", action="store_true", help="also time both paths on CPU (T <= 4096)")
    parser.add_argument("--blockwise", action="store_true",
                        help="CPU: time the dense reference against the XLA blockwise path (BLOCKWISE_SHAPES)")
    parser.add_argument("--out", default="experiments/results/attention.json")
    args = parser.parse_args()
    if args.blockwise:
        result, name = blockwise_report(), "attention (CPU: dense vs blockwise)"
        if args.out == parser.get_default("out"):
            args.out = args.out.replace(".json", "_blockwise_cpu.json")
    elif args.tpu_topology:
        result, name = tpu_hbm_report(args.lengths, args.tpu_topology), f"attention (TPU AOT {args.tpu_topology})"
        args.out = args.out.replace(".json", f"_{args.tpu_topology.replace(':', '_')}.json")
    else:
        report = {"cpu": lambda: cpu_report(args.lengths, args.time), "gpu": lambda: gpu_report(args.lengths, args.batch,
                                                  [tuple(args.triton_config)] if args.triton_config else GPU_CONFIGS),
                  "tpu": lambda: tpu_report(args.lengths)}[args.backend]
        result, name = report(), f"attention ({args.backend})"
        if args.backend != "cpu" and args.out == parser.get_default("out"):
            args.out = args.out.replace(".json", f"_{args.backend}.json")  # keep the CPU figures
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": name, "jax": jax.__version__, **result}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Streaming import of a full-size GLM-4-9B checkpoint: wall time, GB/s and peak resident memory.

    python experiments/benchmarks/import_hf.py [--size 9b|small] [--work DIR] [--keep]
        [--out experiments/results/import_hf.json]

Writes a synthetic checkpoint in the layout of transformers GlmForCausalLM with
GLM-4-9B's real shapes (vocab 151552, hidden 4096, 40 layers, 32 query / 2 KV heads
of 128, SwiGLU 13696; random bf16, about 19 GB in 10 shards + index, the
released glm-4-9b-hf's shard layout), then, side by side in one run:
  read     the time to read every safetensors file once (the floor the issue's target uses);
  copy     the time to copy every file once (read + write: the I/O floor of any import on a
           disk that writes slower than it reads, as this machine's does: ~250 MB/s);
  import   `glm_jax convert import-hf` in a fresh process (VmHWM of that process
           is the peak resident memory; its baseline after importing jax is reported too).
The target is import <= 2x read and peak RSS well under the checkpoint's size.
`--size small` is the same at hidden 1024 / 24 layers (0.6 GB; the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

SIZES = {
    "9b": dict(vocab_size=151552, hidden_size=4096, num_hidden_layers=40, num_attention_heads=32,
               num_key_value_heads=2, head_dim=128, intermediate_size=13696, shards=10),
    "small": dict(vocab_size=16384, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=2, head_dim=64, intermediate_size=2816, shards=3),
}
CHILD = """
import json, sys, time
import jax
from glm_jax.convert.hf import import_hf

def high_water():  # VmHWM: this process's peak resident memory (ru_maxrss would include the parent's before exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

baseline = high_water()
start = time.perf_counter()
import_hf(sys.argv[1], sys.argv[2], hash_files=False)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss": high_water(), "baseline_rss": baseline}))
"""


def tensor_shapes(size: dict) -> dict[str, tuple[int, ...]]:
    V, E, L = size["vocab_size"], size["hidden_size"], size["num_hidden_layers"]
    H, G, D, F = size["num_attention_heads"], size["num_key_value_heads"], size["head_dim"], size["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (V, E)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (E,), p + "self_attn.q_proj.weight": (H * D, E),
                       p + "self_attn.q_proj.bias": (H * D,), p + "self_attn.k_proj.weight": (G * D, E),
                       p + "self_attn.k_proj.bias": (G * D,), p + "self_attn.v_proj.weight": (G * D, E),
                       p + "self_attn.v_proj.bias": (G * D,), p + "self_attn.o_proj.weight": (E, H * D),
                       p + "post_attention_layernorm.weight": (E,), p + "mlp.gate_up_proj.weight": (2 * F, E),
                       p + "mlp.down_proj.weight": (E, F)})
    shapes.update({"model.norm.weight": (E,), "lm_head.weight": (V, E)})
    return shapes


def write_checkpoint(directory: Path, size: dict) -> int:
    """Synthetic bf16 checkpoint (random values tiled from a pool: content does not change the cost)."""
    from glm_jax.convert.hf import save_file  # writes from the arrays, no serialised copy of the shard

    directory.mkdir(parents=True)
    shapes = tensor_shapes(size)
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    pool = (0.02 * np.random.default_rng(0).standard_normal(1 << 22)).astype(ml_dtypes.bfloat16)
    per_shard, shard, shard_bytes, weight_map, index = total / size["shards"], {}, 0, {}, 1

    def flush():
        nonlocal shard, shard_bytes, index
        name = f"model-{index:05d}-of-{size['shards']:05d}.safetensors"
        save_file(shard, str(directory / name))
        weight_map.update({n: name for n in shard})
        shard, shard_bytes, index = {}, 0, index + 1

    for name, shape in shapes.items():
        shard[name] = np.resize(pool, shape)
        shard_bytes += shard[name].nbytes
        if shard_bytes >= per_shard and index < size["shards"]:
            flush()
    flush()
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {k: v for k, v in size.items() if k != "shards"}
    config.update(architectures=["GlmForCausalLM"], model_type="glm", hidden_act="silu", attention_bias=True,
                  rms_norm_eps=1.5625e-07, tie_word_embeddings=False, max_position_embeddings=131072,
                  partial_rotary_factor=0.5, rope_theta=10000.0, torch_dtype="bfloat16")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    fixture = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "hf" / "glm_mha_rot50"
    for name in ("tokenizer.json", "tokenizer_config.json"):  # any GLM tokenizer with the specials will do
        shutil.copyfile(fixture / name, directory / name)
    return total


def read_once(directory: Path) -> float:
    start = time.perf_counter()
    buffer = bytearray(64 << 20)
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - start


def copy_once(directory: Path, scratch: Path) -> float:
    scratch.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for path in sorted(directory.glob("*.safetensors")):
        shutil.copyfile(path, scratch / path.name)
        os.sync()  # the import's data reaches the disk too (Orbax waits for its writes)
        (scratch / path.name).unlink()
    return time.perf_counter() - start


def run_import(source: Path, out: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(source), str(out)], capture_output=True, text=True,
                            check=False, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(size_name: str, work: Path, keep: bool = False) -> dict:
    size = SIZES[size_name]
    source, out = work / f"glm4_{size_name}_hf", work / f"glm4_{size_name}_run"
    shutil.rmtree(source, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    total = write_checkpoint(source, size)
    write_seconds = time.perf_counter() - start
    read_seconds = read_once(source)
    copy_seconds = copy_once(source, work / "copy_scratch")
    imported = run_import(source, out)
    result = {"size": size_name, "checkpoint_bytes": total, "write_seconds": write_seconds,
              "read_seconds": read_seconds, "copy_seconds": copy_seconds, "import_seconds": imported["seconds"],
              "import_over_read": imported["seconds"] / read_seconds,
              "import_over_copy": imported["seconds"] / copy_seconds,
              "import_gb_per_s": total / imported["seconds"] / 1e9, "read_gb_per_s": total / read_seconds / 1e9,
              "peak_rss_bytes": imported["peak_rss"], "baseline_rss_bytes": imported["baseline_rss"],
              "peak_rss_over_checkpoint": imported["peak_rss"] / total}
    if not keep:
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="9b")
    parser.add_argument("--work", default=None, help="where the synthetic checkpoint and the run go (default: a tmp dir)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", default="experiments/results/import_hf.json")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="import_hf_"))
    r = measure(args.size, work, args.keep)
    gb = 1e9
    print("| checkpoint | read once | copy once | import | import / read | import / copy | import GB/s | "
          "peak RSS | baseline RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.size}: {r['checkpoint_bytes'] / gb:.1f} GB | {r['read_seconds']:.1f} s | {r['copy_seconds']:.1f} s | "
          f"{r['import_seconds']:.1f} s | {r['import_over_read']:.2f}x | {r['import_over_copy']:.2f}x | "
          f"{r['import_gb_per_s']:.2f} | "
          f"{r['peak_rss_bytes'] / gb:.2f} GB | {r['baseline_rss_bytes'] / gb:.2f} GB |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()

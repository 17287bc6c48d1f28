"""Decode speed and KV-cache bytes of MHA vs GQA-4 vs MQA, weight-only INT8 / INT4, and a transformers peer.

    python experiments/benchmarks/decode.py [--contexts 512 2048 8192] [--batches 1 8] [--tokens 32]
        [--dtype float32|bfloat16] [--quant INT8 INT4-g128 INT4] [--out experiments/results/decode.json] [--no-peer]

One model shape (hidden 1024, 16 heads of 64, 8 layers, SwiGLU 2816, vocab
32768: ChatGLM2 / GLM-4 style) with 16, 4 and 1 KV heads. For each context
length and batch, the cache is filled with the context (random keys and values:
decode cost does not depend on their values, and this skips an O(T^2) XLA
prefill that would not fit at 8k x 8 on this machine) and the Generator's
compiled decode loop (glm_jax.infer.generate.decode_loop, greedy, exactly
--tokens tokens) is timed. The peer is transformers GlmForCausalLM.generate
(torch CPU, float32, greedy) continuing from a DynamicCache filled the same
way, with the same config and context (MHA only).

Decode at long context is memory-bandwidth bound: every new token reads the
whole cache, 2 x layers x kv_heads x head_dim x 4 bytes per context token,
so MHA reads H/G times the bytes of GQA-G (16x for MQA) on top of the fixed
weight read. Ratios, not absolute times, are the result (the machine is noisy).
On a GPU the peer runs on CUDA too; --dtype sets both sides' weights and cache.

--quant adds the MHA model with its projections quantized (glm_jax.model.quantization:
INT8 per output channel, INT4 per output channel or per 128 inputs; embedding and head
stay --dtype), timed in the same run: at batch 1 and short context decode reads the
weights once per token, so fewer weight bytes are the whole point.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from model_step import machine, torch_device  # noqa: E402

from glm_jax.data.tokenizer import SpecialTokens  # noqa: E402
from glm_jax.infer.cache import init_cache, kv_bytes, kv_bytes_per_token  # noqa: E402
from glm_jax.infer.generate import decode_loop, decode_state  # noqa: E402
from glm_jax.infer.sampling import SamplingConfig  # noqa: E402
from glm_jax.model import GLM, ModelConfig, init_params, param_bytes, quantize_params  # noqa: E402

MODEL = dict(vocab_size=32768, hidden_size=1024, num_layers=8, num_heads=16, head_dim=64, mlp_dim=2816,
             mlp_activation="swiglu", norm="rmsnorm", position="rope", rope_style="interleaved",
             rotary_fraction=0.5, qkv_bias=True, out_bias=False, mlp_bias=False, tie_embeddings=False,
             dtype="float32", scan_layers=False)  # what the Generator decodes with (model/scan_layout.py)
VARIANTS = {"MHA": 16, "GQA-4": 4, "MQA": 1}
QUANT = {"INT8": (8, None), "INT4-g128": (4, 128), "INT4": (4, None)}  # (bits, group size) of the MHA model
SPECIALS = SpecialTokens(pad=1, eos=2, cls=3, mask=4, smask=5, gmask=6, sop=7, eop=8, dblock=9)


def filled_cache(config: ModelConfig, batch: int, context: int, tokens: int, seed: int) -> dict:
    """A cache whose first `context` slots hold one causal segment of random keys and values."""
    cache = init_cache(config, batch, context, tokens)
    key = jax.random.key(seed)

    def fill(path, leaf):
        name = getattr(path[-1], "key", None)
        if name in ("context_key", "context_value"):
            return jax.random.normal(jax.random.fold_in(key, len(jax.tree_util.keystr(path))), leaf.shape, leaf.dtype)
        if name == "segment_ids":
            return leaf.at[:, :context].set(1)
        return leaf  # prefix_mask stays False: a causal context

    return jax.tree_util.tree_map_with_path(fill, cache)


class GlmJaxDecode:
    """One model's compiled decode loop, timed one run at a time (main interleaves the variants, so a
    slow spell of the machine falls on all of them alike instead of on whichever ran then)."""

    def __init__(self, config: ModelConfig, batch: int, context: int, tokens: int):
        self.config, self.batch, self.context, self.tokens = config, batch, context, tokens
        params = nn.unbox(init_params(config.replace(quant_bits=None, quant_group_size=None), jax.random.key(0)))
        if config.quant_bits:
            params = quantize_params(params, config)
        self.params = params
        self.loop = jax.jit(functools.partial(decode_loop, model=GLM(config), specials=SPECIALS, mode="causal",
                                              max_new_tokens=tokens, ignore_stop=True))
        self.times, self.cache_bytes = [], None

    def run(self, seed: int, record: bool = True) -> None:
        """Decodes `tokens` tokens after a freshly filled cache (record=False: the compiling run)."""
        batch, context, tokens = self.batch, self.context, self.tokens
        cache = filled_cache(self.config, batch, context, tokens, seed=seed)
        self.cache_bytes = kv_bytes(cache)
        context_cache, state = decode_state(cache, context, jnp.full((batch,), 10, jnp.int32),
                                            jnp.full((batch,), context, jnp.int32), jnp.zeros((batch,), jnp.int32),
                                            tokens, SPECIALS.pad)
        del cache
        jax.block_until_ready((context_cache, state))  # the fill is asynchronous: keep it out of the timing
        no_masks = jnp.zeros((batch, 1), jnp.int32), jnp.zeros((batch,), jnp.int32)
        start = time.perf_counter()
        out = self.loop(self.params, context_cache, state, *no_masks, jax.random.key(0), SamplingConfig().as_arrays())
        jax.block_until_ready(out)
        if record:
            self.times.append(time.perf_counter() - start)
        assert int(out["num_tokens"].min()) == tokens

    def result(self) -> dict:
        seconds = statistics.median(self.times)
        return {"tokens_per_second": self.batch * self.tokens / seconds, "seconds_per_step": seconds / self.tokens,
                "kv_cache_bytes": self.cache_bytes, "kv_bytes_per_token": kv_bytes_per_token(self.config),
                "param_bytes": param_bytes(self.params)}


def glm_jax_decode(config: ModelConfig, batch: int, context: int, tokens: int, repeats: int) -> dict:
    """One model timed alone: a compiling run, then `repeats` timed ones (the ablation's decode column)."""
    case = GlmJaxDecode(config, batch, context, tokens)
    for repeat in range(repeats + 1):
        case.run(seed=repeat, record=repeat > 0)
    return case.result()


def transformers_decode(batch: int, context: int, tokens: int, repeats: int, dtype: str) -> dict | None:
    try:
        import torch
        from transformers import DynamicCache, GlmConfig, GlmForCausalLM
    except ImportError:
        print("torch / transformers not installed: skipping the peer (pip install torch 'glm_jax[bench]')")
        return None
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    m = MODEL
    hf = GlmConfig(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], num_hidden_layers=m["num_layers"],
                   num_attention_heads=m["num_heads"], num_key_value_heads=m["num_heads"], head_dim=m["head_dim"],
                   intermediate_size=m["mlp_dim"], partial_rotary_factor=m["rotary_fraction"], attention_bias=True,
                   tie_word_embeddings=False, max_position_embeddings=context + tokens + 8, pad_token_id=0,
                   eos_token_id=None, attn_implementation="sdpa")
    device = torch_device()
    torch_dtype = getattr(torch, dtype)
    model = GlmForCausalLM(hf).to(device, torch_dtype).eval()
    shape = (batch, m["num_heads"], context, m["head_dim"])
    times = []
    for repeat in range(repeats + 1):
        cache = DynamicCache(config=hf)
        for layer in range(m["num_layers"]):
            cache.update(*(torch.randn(shape, device=device, dtype=torch_dtype) for _ in range(2)), layer)
        ids = torch.randint(10, m["vocab_size"], (batch, context + 1), device=device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, past_key_values=cache, max_new_tokens=tokens,
                                 min_new_tokens=tokens, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if repeat:
            times.append(time.perf_counter() - start)
        assert out.shape[1] == context + 1 + tokens
        del cache, out
    seconds = statistics.median(times)
    return {"tokens_per_second": batch * tokens / seconds, "seconds_per_step": seconds / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant, interleaved")
    parser.add_argument("--no-peer", action="store_true", help="skip the transformers peer")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--quant", nargs="*", choices=sorted(QUANT), default=["INT8", "INT4-g128"],
                        help="quantized MHA columns (none: --quant with no names)")
    parser.add_argument("--out", default="experiments/results/decode.json")
    args = parser.parse_args()

    rows = []
    for context in args.contexts:
        for batch in args.batches:
            cases = {}  # variant name -> its decode loop; timed round-robin
            for name, kv_heads in VARIANTS.items():
                config = ModelConfig(**{**MODEL, "dtype": args.dtype, "param_dtype": args.dtype}, num_kv_heads=kv_heads)
                cases[name] = GlmJaxDecode(config, batch, context, args.tokens)
            for name in args.quant:
                bits, group = QUANT[name]
                config = ModelConfig(**{**MODEL, "dtype": args.dtype, "param_dtype": args.dtype},
                                     num_kv_heads=VARIANTS["MHA"], quant_bits=bits, quant_group_size=group)
                cases[f"MHA {name}"] = GlmJaxDecode(config, batch, context, args.tokens)
            for repeat in range(args.repeats + 1):  # the first round compiles
                for case in cases.values():
                    case.run(seed=repeat, record=repeat > 0)
            for name, case in cases.items():
                rows.append({"impl": "glm_jax", "variant": name, "kv_heads": case.config.num_kv_heads,
                             "context": context, "batch": batch, "params": case.config.num_params(), **case.result()})
                print(_row(rows[-1]), flush=True)
            del cases
            if not args.no_peer:
                peer = transformers_decode(batch, context, args.tokens, args.repeats, args.dtype)
                if peer:
                    rows.append({"impl": "transformers", "variant": "MHA", "kv_heads": MODEL["num_heads"],
                                 "context": context, "batch": batch, **peer})
                    print(_row(rows[-1]), flush=True)

    print("\nside by side (tokens/s; ratios against glm_jax MHA of the same context and batch)")
    print(f"{'context':>7} {'batch':>5} {'MHA':>9} {'GQA-4':>9} {'MQA':>9} {'HF MHA':>9} "
          f"{'GQA-4/MHA':>9} {'MQA/MHA':>8} {'MHA/HF':>7} {'cache MHA':>10} {'cache GQA4':>10} {'cache MQA':>10}")
    summary = []
    for context in args.contexts:
        for batch in args.batches:
            got = {(r["impl"], r["variant"]): r for r in rows if r["context"] == context and r["batch"] == batch}
            mha, gqa, mqa = (got[("glm_jax", v)] for v in VARIANTS)
            peer = got.get(("transformers", "MHA"))
            line = {"context": context, "batch": batch, "gqa4_over_mha": gqa["tokens_per_second"] / mha["tokens_per_second"],
                    "mqa_over_mha": mqa["tokens_per_second"] / mha["tokens_per_second"],
                    "mha_over_transformers": mha["tokens_per_second"] / peer["tokens_per_second"] if peer else None}
            summary.append(line)
            print(f"{context:>7} {batch:>5} {mha['tokens_per_second']:>9.1f} {gqa['tokens_per_second']:>9.1f} "
                  f"{mqa['tokens_per_second']:>9.1f} {peer['tokens_per_second'] if peer else float('nan'):>9.1f} "
                  f"{line['gqa4_over_mha']:>9.2f} {line['mqa_over_mha']:>8.2f} "
                  f"{line['mha_over_transformers'] or float('nan'):>7.2f} {_mib(mha['kv_cache_bytes']):>10} "
                  f"{_mib(gqa['kv_cache_bytes']):>10} {_mib(mqa['kv_cache_bytes']):>10}")
    if args.quant:
        print("\nweight-only quantization (tokens/s of MHA; ratios against float MHA of the same context and batch; "
              "parameter bytes against float)")
        print(f"{'context':>7} {'batch':>5} {'float':>9} " + " ".join(f"{n:>10} {n + '/float':>15}" for n in args.quant)
              + " " + " ".join(f"{n + ' bytes':>15}" for n in args.quant))
        for line in summary:
            got = {r["variant"]: r for r in rows if r["context"] == line["context"] and r["batch"] == line["batch"]
                   and r["impl"] == "glm_jax"}
            base = got["MHA"]
            cells, sizes = [], []
            for name in args.quant:
                r = got[f"MHA {name}"]
                line[f"{name}_over_float"] = r["tokens_per_second"] / base["tokens_per_second"]
                line[f"{name}_param_bytes_over_float"] = r["param_bytes"] / base["param_bytes"]
                cells.append(f"{r['tokens_per_second']:>10.1f} {line[f'{name}_over_float']:>15.2f}")
                sizes.append(f"{line[f'{name}_param_bytes_over_float']:>15.2f}")
            print(f"{line['context']:>7} {line['batch']:>5} {base['tokens_per_second']:>9.1f} " + " ".join(cells)
                  + " " + " ".join(sizes))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": MODEL, "dtype": args.dtype, "tokens": args.tokens, "device": machine(),
                                          "rows": rows, "summary": summary}, indent=2))
    print(f"wrote {args.out}")


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _row(r: dict) -> str:
    cache = f", cache {_mib(r['kv_cache_bytes'])}" if "kv_cache_bytes" in r else ""
    return (f"{r['impl']:<12} {r['variant']:<6} context {r['context']:>5} batch {r['batch']}: "
            f"{r['tokens_per_second']:8.1f} tokens/s ({r['seconds_per_step'] * 1e3:.1f} ms/step){cache}")


if __name__ == "__main__":
    main()

"""glm_jax convert uptrain | import-hf | export-hf

  uptrain --from RUN_OR_CKPT --num_kv_heads G --method mean|first|random|weighted|aligned|svd
          [--grouping contiguous|similarity] --out NEW_RUN
          [--alpha A] [--recipe FILE] [--gin.uptrain_recipe.NAME=VALUE ...]
      converts an MHA (or GQA) checkpoint to G key/value heads and writes a run directory
      that `./launch.sh train NEW_RUN/config.gin` uptrains (glm_jax/convert/uptrain.py).
  import-hf --from HF_DIR --out RUN [--dtype bfloat16|float32|float16] [--force]
      a Hugging Face / THUDM GLM checkpoint (config.json, safetensors, tokenizer) ->
      a run directory that generate, train, evaluate and uptrain accept (glm_jax/convert/hf.py).
  export-hf --from RUN_OR_CKPT --out HF_DIR [--layout glm|glm4|chatglm|chatglm6b] [--max_shard_size 5GB]
      a run's checkpoint -> config.json + sharded safetensors that transformers loads.
  merge-lora --from LORA_RUN --out NEW_RUN
      a LoRA run's adapters merged into its frozen base -> a plain run directory (glm_jax/convert/adapters.py).
  quantize --from RUN_OR_CKPT --bits 8|4 [--group_size N] --out RUN_Q
      weight-only INT8 / INT4 attention and MLP projections (absmax scales per output channel, or per
      N inputs) -> a run directory for generate, chat and evaluation (glm_jax/convert/quantize.py).
"""

from __future__ import annotations

import argparse
import json
import sys

from glm_jax.cli import flags


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="glm_jax convert", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    uptrain = commands.add_parser("uptrain", help="MHA -> GQA/MQA by pooling key/value heads")
    uptrain.add_argument("--from", dest="source", required=True,
                         help="run directory, its checkpoints/ folder, or RUN/checkpoints/STEP")
    uptrain.add_argument("--num_kv_heads", type=int, required=True, help="G: key/value heads after conversion")
    uptrain.add_argument("--method", choices=("mean", "first", "random", "weighted", "aligned", "svd"), default="mean",
                         help="how a group of KV heads becomes one (glm_jax/convert/uptrain.py)")
    uptrain.add_argument("--grouping", choices=("contiguous", "similarity"), default="contiguous",
                         help="which heads share a group: by index, or balanced groups of similar heads")
    uptrain.add_argument("--calibration_batches", type=int, default=4,
                         help="batches of the source's own training data whose activations similarity grouping "
                              "and the weighted / aligned merges compare (up to 4096 tokens are kept)")
    uptrain.add_argument("--out", required=True, help="new run directory")
    uptrain.add_argument("--alpha", type=float, default=None,
                         help="uptraining steps as a fraction of the source's (default: the recipe's 0.05)")
    uptrain.add_argument("--recipe", default=None, help="recipe gin file (default: the shipped uptrain_gqa.gin)")
    uptrain.add_argument("--seed", type=int, default=0, help="initialiser seed of --method random")

    imports = commands.add_parser("import-hf", help="Hugging Face / THUDM checkpoint -> run directory")
    imports.add_argument("--from", dest="source", required=True, help="checkpoint directory (config.json, "
                         "model.safetensors or sharded model-*.safetensors + index, tokenizer.json or THUDM's tokenizer.model)")
    imports.add_argument("--out", required=True, help="new run directory")
    imports.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default=None,
                         help="parameter dtype (default: the checkpoint's own)")
    imports.add_argument("--force", action="store_true", help="replace --out if it already holds something")
    imports.add_argument("--no_hashes", action="store_true",
                         help="skip the sha256 of the source files in provenance.json (saves one read)")

    exports = commands.add_parser("export-hf", help="run directory -> Hugging Face checkpoint")
    exports.add_argument("--from", dest="source", required=True,
                         help="run directory, its checkpoints/ folder, or RUN/checkpoints/STEP")
    exports.add_argument("--out", required=True, help="new checkpoint directory")
    exports.add_argument("--layout", default=None, choices=("glm", "glm4", "chatglm", "chatglm6b"),
                         help="default: the layout the run was imported from, else glm (glm4 for sandwich norms)")
    exports.add_argument("--max_shard_size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    exports.add_argument("--force", action="store_true", help="replace --out if it already holds something")

    merges = commands.add_parser("merge-lora", help="LoRA run -> plain run with the adapters merged in")
    merges.add_argument("--from", dest="source", required=True,
                        help="LoRA run directory, its checkpoints/ folder, or RUN/checkpoints/STEP")
    merges.add_argument("--out", required=True, help="new run directory")

    quantizes = commands.add_parser("quantize", help="run -> weight-only INT8 / INT4 run for inference")
    quantizes.add_argument("--from", dest="source", required=True,
                           help="run directory, its checkpoints/ folder, or RUN/checkpoints/STEP")
    quantizes.add_argument("--bits", type=int, required=True, help="8 (INT8) or 4 (INT4)")
    quantizes.add_argument("--group_size", type=int, default=None,
                           help="inputs per scale, e.g. 128 (default: one scale per output channel, GLM-130B)")
    quantizes.add_argument("--out", required=True, help="new run directory")
    args, overrides = flags.parse_with_gin(parser, argv)
    recipe_overrides = [o for o in overrides if o.startswith("uptrain_recipe.")]
    if overrides != recipe_overrides or (overrides and args.command != "uptrain"):
        parser.error(f"{overrides} cannot be set here: `convert uptrain` takes --gin.uptrain_recipe.NAME=VALUE "
                     "(alpha, learning_rate_scale, learning_rate_from, schedule, warmup_fraction); the other "
                     "commands take no gin overrides")
    args.recipe_bindings = recipe_overrides
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.command == "import-hf":
        from glm_jax.convert.hf import import_hf

        provenance = import_hf(args.source, args.out, args.dtype, args.force, hash_files=not args.no_hashes)
        print(json.dumps({k: v for k, v in provenance.items() if k != "source_config"}, indent=2))
        print(f"generate with: python -m glm_jax generate --run_dir {args.out} --mode causal --prompt ...",
              file=sys.stderr)
        return 0
    if args.command == "export-hf":
        from glm_jax.convert.hf import export_hf

        print(json.dumps(export_hf(args.source, args.out, args.layout, args.max_shard_size, args.force), indent=2))
        return 0
    if args.command == "merge-lora":
        from glm_jax.convert.adapters import merge_run

        print(json.dumps(merge_run(args.source, args.out), indent=2))
        return 0
    if args.command == "quantize":
        from glm_jax.convert.quantize import quantize_run

        print(json.dumps(quantize_run(args.source, args.out, args.bits, args.group_size), indent=2))
        print(f"generate with: python -m glm_jax generate --run_dir {args.out} --prompt ...", file=sys.stderr)
        return 0
    from glm_jax.convert.uptrain import DEFAULT_RECIPE, convert_run

    provenance = convert_run(args.source, args.num_kv_heads, args.method, args.out, seed=args.seed,
                             alpha=args.alpha, recipe_file=args.recipe or DEFAULT_RECIPE,
                             recipe_bindings=args.recipe_bindings, grouping=args.grouping,
                             calibration_batches=args.calibration_batches)
    print(json.dumps(provenance, indent=2))
    print(f"uptrain it with: ./launch.sh train {args.out}/config.gin", file=sys.stderr)
    return 0

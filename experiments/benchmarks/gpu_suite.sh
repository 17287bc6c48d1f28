#!/usr/bin/env bash
# Everything that needs a GPU, in one command: the Triton kernel's tests on hardware and the
# GPU benchmarks (attention kernel vs cuDNN vs XLA, train step vs PyTorch, decode vs
# transformers), plus a short end-to-end training run and generation with the README's commands.
#
#   bash experiments/benchmarks/gpu_suite.sh [tests] [attention] [train_step] [decode] [train_run]
#
# With no arguments, all parts run. Logs and JSON go to $OUT (default experiments/results/gpu).
# Each part has its own time limit and a failing part does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-experiments/results/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests attention train_step decode train_run)

run_part() {  # name, seconds, command...
  local name="$1" limit="$2"; shift 2
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - start))s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"

for part in "${parts[@]}"; do
  case "$part" in
    tests) run_part tests 400 env JAX_PLATFORMS=cuda "$PY" -m pytest tests/test_gpu.py -v -rA -p no:cacheprovider \
             --timeout 60 -o faulthandler_timeout=50 ;;
    attention) run_part attention 240 "$PY" experiments/benchmarks/attention.py --backend gpu --batch 4 \
                 --lengths 1024 4096 8192 --triton_config 64 64 4 2 --out "$OUT/attention_gpu.json" ;;
    # (64, 64, 4 warps, 2 stages), the Model's default, was the fastest of attention.py's GPU_CONFIGS
    # sweep on an H100 (run attention.py --backend gpu without --triton_config to sweep again).
    train_step) run_part train_step 200 bash -c "'$PY' experiments/benchmarks/train_step.py --malloc default --dtype bfloat16 --batch 16 \
                 --seq_len 1024 --steps 10 --out '$OUT/train_step_gpu_bf16.json' && '$PY' experiments/benchmarks/train_step.py --malloc default \
                 --dtype float32 --batch 8 --seq_len 512 --steps 10 --out '$OUT/train_step_gpu_f32.json'" ;;
    decode) run_part decode 200 "$PY" experiments/benchmarks/decode.py --contexts 2048 8192 32768 --batches 1 8 \
              --dtype bfloat16 --out "$OUT/decode_gpu.json" ;;
    train_run) run_part train_run 240 bash -c "'$PY' -m glm_jax train --gin_file=experiments/configs/glm_tiny_stdlib.gin \
                 --gin.RUN_DIR=\"'runs/gpu_tiny'\" && '$PY' -m glm_jax generate --run_dir runs/gpu_tiny \
                 --prompt 'def add(a, b):\n    return [MASK]'" ;;
    *) echo "unknown part $part" >&2 ;;
  esac
done

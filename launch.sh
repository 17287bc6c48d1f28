#!/usr/bin/env bash
# glm_jax launcher: the README's two commands and the multi-host launchers.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<USAGE
usage: ./launch.sh <command> [args]

commands:
  test [pytest args]                 install glm_jax[test] into .venv and run the fast test suite
                                     (pass -m slow for the long runs)
  train CONFIG [--gin.NAME=VALUE ...]
                                     train from a gin config, e.g.
                                     ./launch.sh train experiments/configs/glm_tiny_stdlib.gin
  multiprocess N CONFIG [overrides]  N local processes joined by jax.distributed on 127.0.0.1
                                     (gloo CPU collectives): a real multi-host run on one machine.
                                     DEVICES_PER_PROCESS (default 1) simulated CPU devices each.
  tpu TPU_NAME ZONE CONFIG [overrides] [--dry-run]
                                     run the same train command on every worker of a TPU VM pod
                                     (gcloud compute tpus tpu-vm ssh --worker=all)
  preflight --topology=v5e:4x4 --gin_file=CONFIG [overrides]
                                     compile the sharded train step for a TPU topology on this
                                     machine and report per-device HBM (exit 1 if it does not fit)
  slurm CONFIG [overrides] [--dry-run]
                                     srun one process per task; jax.distributed reads the SLURM
                                     environment (coordinator = first node)
USAGE
}

# Pins jax to the CPU when the machine has no accelerator device files, so an installed
# libtpu (the tpu extra, used by the preflight tests) does not probe for a TPU.
cpu_unless_accelerator() {
  if ! compgen -G "/dev/accel*" >/dev/null && ! compgen -G "/dev/vfio/[0-9]*" >/dev/null \
     && ! compgen -G "/dev/nvidia[0-9]*" >/dev/null; then
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
  fi
}

# Creates .venv on first use and (re)installs the package when pyproject.toml changes.
ensure_venv() {
  local extras="$1"
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  local stamp=".venv/.glm_jax-installed-${extras}"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[${extras}]"
    touch "$stamp"
  fi
}

need_config() {
  if [ -z "${1:-}" ] || [ ! -f "$1" ]; then
    echo "launch.sh: give an existing gin config (got '${1:-}')" >&2
    usage >&2
    exit 2
  fi
}

# Removes --dry-run from the arguments and says whether it was there.
DRY_RUN=0
strip_dry_run() {
  ARGS=()
  for a in "$@"; do
    if [ "$a" = "--dry-run" ]; then DRY_RUN=1; else ARGS+=("$a"); fi
  done
}

run_or_print() {
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  test)
    ensure_venv test,tpu
    # -n 2: both cores; tests share compiled functions within a worker. --durations lists the
    # slowest tests, so a CI log shows where the ~15-minute budget goes.
    exec .venv/bin/python -m pytest -n 2 --durations=15 "$@"
    ;;
  train)
    need_config "${1:-}"
    config="$1"; shift
    ensure_venv test
    cpu_unless_accelerator
    exec .venv/bin/python -m glm_jax train --gin_file="$config" "$@"
    ;;
  multiprocess)
    n="${1:-}"
    if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
      echo "launch.sh multiprocess: N must be a positive integer (got '${n}')" >&2; usage >&2; exit 2
    fi
    shift
    need_config "${1:-}"
    config="$1"; shift
    ensure_venv test
    port="${GLM_JAX_PORT:-$((20000 + RANDOM % 20000))}"
    devices="${DEVICES_PER_PROCESS:-1}"
    pids=()
    for ((i = 0; i < n; i++)); do
      JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
      GLM_JAX_COORDINATOR="127.0.0.1:${port}" GLM_JAX_NUM_PROCESSES="$n" GLM_JAX_PROCESS_ID="$i" \
        .venv/bin/python -m glm_jax train --gin_file="$config" "$@" &
      pids+=($!)
    done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    exit "$status"
    ;;
  tpu)
    strip_dry_run "$@"
    set -- "${ARGS[@]+"${ARGS[@]}"}"
    if [ $# -lt 3 ]; then echo "launch.sh tpu: need TPU_NAME ZONE CONFIG" >&2; usage >&2; exit 2; fi
    name="$1"; zone="$2"; config="$3"; shift 3
    overrides=""
    for a in "$@"; do overrides+=" $(printf '%q' "$a")"; done
    remote="cd ~/glm_jax && GLM_JAX_DISTRIBUTED=auto ./launch.sh train $(printf '%q' "$config")${overrides}"
    run_or_print gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$remote"
    ;;
  slurm)
    strip_dry_run "$@"
    set -- "${ARGS[@]+"${ARGS[@]}"}"
    if [ "$DRY_RUN" = 0 ]; then need_config "${1:-}"; fi
    if [ $# -lt 1 ]; then echo "launch.sh slurm: need CONFIG" >&2; usage >&2; exit 2; fi
    config="$1"; shift
    [ "$DRY_RUN" = 0 ] && ensure_venv test
    run_or_print srun --kill-on-bad-exit=1 .venv/bin/python -m glm_jax train --gin_file="$config" "$@"
    ;;
  preflight)
    ensure_venv test,tpu
    export JAX_PLATFORMS=cpu  # compile for the TPU topology from this machine
    exec .venv/bin/python -m glm_jax preflight "$@"
    ;;
  -h|--help|help)
    usage
    ;;
  *)
    [ -n "$cmd" ] && echo "launch.sh: unknown command '$cmd'" >&2
    usage >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# glm_jax launcher. Sub-commands:
#   ./launch.sh test [pytest args]     create .venv if missing, install glm_jax[test], run pytest
#   ./launch.sh train CONFIG [...]     (arrives with the training issue)
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<USAGE
usage: ./launch.sh <command> [args]

commands:
  test [pytest args]   install glm_jax with test extras into .venv and run the test suite
                       (default: the fast suite; pass -m slow for the long runs)
  train CONFIG [...]   train from a gin config (not available yet: arrives with the
                       sharded-training issue)
USAGE
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

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  test)
    ensure_venv test
    # -n 2: both cores; tests share compiled functions within a worker.
    exec .venv/bin/python -m pytest -n 2 "$@"
    ;;
  train)
    echo "launch.sh train: not available yet (arrives with the sharded-training issue)." >&2
    exit 2
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

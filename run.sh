#!/usr/bin/env bash
# Sets itself up on first use (a virtualenv in .venv), then runs what you ask:
#   ./run.sh demo         train a tiny Megatron GPT at TP2·PP2 on the CPU, convert, verify bit-exactly
#   ./run.sh test [ARGS]  the whole test suite (pytest ARGS)
#   ./run.sh bench [ARGS] the resharding benchmark
set -euo pipefail
cd "$(dirname "$0")"
venv=${CKPT_HOOKS_VENV:-.venv}
if [ ! -f "$venv/.installed" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
  python3 -m venv "$venv"
  # torch is pinned to the CPU build; the library itself accepts a range.
  "$venv/bin/pip" install --quiet torch==2.13.0 megatron-core==0.16.1 mindspore==2.10.0 "numpy<2" -e ".[test]"
  touch "$venv/.installed"
fi
command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  demo)  exec "$venv/bin/python" tools/demo.py "$@" ;;
  test)  exec "$venv/bin/python" -m pytest "$@" ;;
  bench) exec "$venv/bin/python" bench/bench_reshard.py "$@" ;;
  *) echo "usage: ./run.sh demo | test [pytest args] | bench [args]" >&2; exit 2 ;;
esac

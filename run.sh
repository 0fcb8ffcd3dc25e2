#!/usr/bin/env bash
# Sets itself up on first use (a virtualenv in .venv), then runs what you ask:
#   ./run.sh demo         train a tiny Megatron GPT at TP2·PP2 on the CPU, convert, verify bit-exactly
#   ./run.sh test [ARGS]  the whole test suite (pytest ARGS)
#   ./run.sh bench [ARGS] the resharding benchmark
set -euo pipefail
cd "$(dirname "$0")"
venv=${CKPT_HOOKS_VENV:-.venv}
if [ ! -f "$venv/.installed" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
  echo "run.sh: first run: installing torch 2.13.0, megatron-core 0.16.1, MindSpore 2.10.0 and the test" \
       "references into $venv (about 4 GB; a few minutes)" >&2
  python3 -m venv "$venv"
  # The tests pin torch 2.13.0 (the library accepts a range). Which build pip picks is the
  # index's choice: PyPI's Linux wheel carries CUDA. To force the CPU build, point
  # CKPT_HOOKS_TORCH_INDEX at an index that serves it (e.g. PyTorch's .../whl/cpu).
  "$venv/bin/pip" install --quiet ${CKPT_HOOKS_TORCH_INDEX:+--index-url "$CKPT_HOOKS_TORCH_INDEX"} torch==2.13.0
  "$venv/bin/pip" install --quiet torch==2.13.0 megatron-core==0.16.1 mindspore==2.10.0 "numpy<2" -e ".[test]"
  touch "$venv/.installed"
  echo "run.sh: installed" >&2
fi
command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  demo)  exec "$venv/bin/python" tools/demo.py "$@" ;;
  test)  exec "$venv/bin/python" -m pytest "$@" ;;
  bench) exec "$venv/bin/python" bench/bench_reshard.py "$@" ;;
  *) echo "usage: ./run.sh demo | test [pytest args] | bench [args]" >&2; exit 2 ;;
esac

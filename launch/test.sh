#!/usr/bin/env bash
# The whole test suite: sets up the venv if needed, then runs pytest (extra args go to pytest).
#   TORCH_PP_TEST_WORKERS  pytest processes (default 2; 0: one process). Each takes whole test files
#   (--dist loadscope), so a file's shared pipelines start once. Most tests wait on Gloo and
#   process starts, not the CPU: two cut the suite from about 29 to 24 minutes on 2 cores.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/launch/setup_env.sh"
VENV=${TORCH_PP_VENV:-$ROOT/.venv}
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=12 \
  -n "${TORCH_PP_TEST_WORKERS:-2}" --dist loadscope "$@" tests

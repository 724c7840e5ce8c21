#!/usr/bin/env bash
# The whole test suite: sets up the venv if needed, then runs pytest (extra args go to pytest).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/launch/setup_env.sh"
VENV=${TORCH_PP_VENV:-$ROOT/.venv}
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=12 "$@" tests

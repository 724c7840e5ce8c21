#!/usr/bin/env bash
# The main job on this machine: a 2-stage pipeline (two processes under torchrun) with the
# embedded SmolLM2-135M-Instruct, streaming its answer to a chat prompt.
#   bash launch/demo.sh                       # default prompt
#   bash launch/demo.sh --prompt "..." ...    # any `torch_pp generate` options
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/launch/setup_env.sh"
VENV=${TORCH_PP_VENV:-$ROOT/.venv}
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--chat --prompt "What is the capital of France? Answer in two sentences." --max-new-tokens 64)
cd "$ROOT"
# One intra-op thread per stage process (two stages share this machine's cores); set here so
# that torchrun does not print its OMP_NUM_THREADS banner.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$VENV/bin/torchrun" --nnodes 1 --nproc-per-node "${NPROC:-2}" --master-addr 127.0.0.1 \
  --master-port "${MASTER_PORT:-29500}" -m torch_pp generate "${args[@]}"

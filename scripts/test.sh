#!/usr/bin/env bash
# Installs fastvision (scripts/setup.sh) and runs the test suite. Without a GPU the Triton kernels
# run in Triton's interpreter on CPU tensors, and the cpu and triton backends must be present
# (their tests fail rather than skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${FASTVISION_VENV:-.venv}"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
  export FASTVISION_REQUIRE_BACKENDS="${FASTVISION_REQUIRE_BACKENDS:-cpu,triton}"
fi
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest -q tests "$@"

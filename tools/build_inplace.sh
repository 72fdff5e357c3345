#!/usr/bin/env bash
# Rebuild fastvision._C in place for development. Builds are serialized with a lock so that
# several shells can call this at once. FASTVISION_SKIP_CUDA=1 builds the C++ (CPU) kernels only.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
# The dev venv's python unless PYTHON names another (a bare `python` may lack torch).
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
exec flock /tmp/fastvision-build.lock "$PYTHON" setup.py -q build_ext --inplace

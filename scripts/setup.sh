#!/usr/bin/env bash
# Creates .venv (or $FASTVISION_VENV) with torch and builds fastvision into it (editable).
# With a CUDA build of torch and nvcc present, the CUDA kernels compile too: the architecture list
# defaults to the visible GPUs, else 9.0 (H100/H200); TORCH_CUDA_ARCH_LIST overrides it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FASTVISION_VENV:-.venv}"
TORCH_SPEC="${FASTVISION_TORCH:-torch==2.14.1}"  # the CUDA 13.0 build: its nvcc matches /usr/local/cuda
# train: scikit-learn, scikit-image and matplotlib for the training and visualisation tools.
EXTRAS="${FASTVISION_EXTRAS:-train,test,onnx}"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip setuptools wheel
"$PY" -m pip install -q "$TORCH_SPEC" numpy ninja
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda  # the nvcc on PATH may be a wrapper that misleads torch
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# --no-build-isolation: the extension compiles against the torch installed above.
"$PY" -m pip install -q --no-build-isolation -e ".[$EXTRAS]"
"$VENV/bin/fastvision" info

#!/usr/bin/env bash
# Creates .venv (or $FASTVISION_VENV) with torch and builds fastvision into it (editable).
# With a CUDA build of torch and nvcc present, the CUDA kernels compile too: the architecture list
# defaults to the visible GPUs, else 9.0 (H100/H200); TORCH_CUDA_ARCH_LIST overrides it.
# FASTVISION_TORCH picks torch (a pip requirement, default the newest tested release); numpy is
# held below 2.4 when that torch brings triton 3.6, whose interpreter fails on numpy 2.4.
# The build is skipped when the installed one was made from the same csrc/, setup.py, pyproject.toml,
# torch version and build settings (a hash recorded in the venv), so running this twice builds once.
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
# shellcheck source=scripts/venv_base.sh
source scripts/venv_base.sh
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda  # the nvcc on PATH may be a wrapper that misleads torch
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# What the built extension depends on: its sources, the build files, torch, and the build settings.
build_stamp() {
  {
    find csrc setup.py pyproject.toml -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    "$PY" -c "import torch; print(torch.__version__, torch.version.cuda)"
    echo "extras=$EXTRAS arch=${TORCH_CUDA_ARCH_LIST:-} skip_cuda=${FASTVISION_SKIP_CUDA:-}" \
      "cpu=${FASTVISION_CPU_BASELINE:-} no_ext=${FASTVISION_NO_EXTENSION:-} cuda_home=${CUDA_HOME:-}" \
      "checkout=$(pwd -P)"
  } | sha256sum | cut -d' ' -f1
}
STAMP_FILE="$VENV/fastvision-build.stamp"
STAMP="$(build_stamp)"
# The recorded build is reused only if it still imports from this checkout with its extension loaded.
if [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$STAMP" ] && "$PY" -c "
import os, sys
import fastvision
if os.environ.get('FASTVISION_NO_EXTENSION', '0') != '1':
    import fastvision._C
sys.exit(0 if os.path.dirname(os.path.dirname(os.path.realpath(fastvision.__file__))) == os.path.realpath('.') else 1)
" 2>/dev/null; then
  echo "setup.sh: fastvision is built from these sources for torch $("$PY" -c 'import torch; print(torch.__version__)'); build skipped"
else
  rm -f "$STAMP_FILE"
  # --no-build-isolation: the extension compiles against the torch installed above.
  "${PIP[@]}" --no-build-isolation -e ".[$EXTRAS]"
  echo "$STAMP" > "$STAMP_FILE"
fi
"$VENV/bin/fastvision" info

#!/usr/bin/env bash
# The built wheel installs and runs without the source tree: builds a (non-editable) wheel from a
# copy of this checkout's files, installs it into a fresh venv, and from a folder outside the
# checkout runs `fastvision info`, checks that the extension loads (with its CUDA kernels when torch
# is a CUDA build and nvcc is present), that fastvision.triton_kernels and every op's Triton module
# import, that the package data (the TensorRT ONNX operator table) is installed, and runs
# `fastvision bench --quick --op geglu`.
#
#   FASTVISION_VENV     the venv to (re)create, default .venv-wheel (removed first: a fresh install)
#   FASTVISION_TORCH    torch (and triton) requirements, default torch==2.14.1
#   FASTVISION_EXTRAS   extras to install with the wheel, default none
#   FASTVISION_WHEEL_DIR  where the wheel goes, default dist/
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd -P)"
VENV="${FASTVISION_VENV:-.venv-wheel}"
TORCH_SPEC="${FASTVISION_TORCH:-torch==2.14.1}"
EXTRAS="${FASTVISION_EXTRAS:-}"
WHEEL_DIR="${FASTVISION_WHEEL_DIR:-dist}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
case "$WHEEL_DIR" in /*) ;; *) WHEEL_DIR="$ROOT/$WHEEL_DIR" ;; esac
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastvision-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

rm -rf "$VENV"
python3 -m venv "$VENV"
PY="$VENV/bin/python"
# shellcheck source=scripts/venv_base.sh
source scripts/venv_base.sh

# The files a clone holds (tracked, plus new files git does not ignore): no build/ folder, no built
# extension, nothing of an editable install travels into the wheel.
mkdir -p "$WORK/src"
git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$WORK/src"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda  # the nvcc on PATH may be a wrapper that misleads torch
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
mkdir -p "$WHEEL_DIR"
rm -f "$WHEEL_DIR"/fastvision-*.whl
start=$SECONDS
"$PY" -m pip wheel -q --no-build-isolation --no-deps "$WORK/src" -w "$WHEEL_DIR"
WHEEL="$(ls "$WHEEL_DIR"/fastvision-*.whl)"
echo "wheel_smoke: built $(basename "$WHEEL") in $((SECONDS - start)) s"
"${PIP[@]}" "${WHEEL}${EXTRAS:+[$EXTRAS]}" "$NUMPY_SPEC"

# From outside the checkout, with the current folder kept off sys.path: only the installed copy is seen.
mkdir -p "$WORK/run"
cd "$WORK/run"
export PYTHONSAFEPATH=1
unset TRITON_INTERPRET
"$VENV/bin/fastvision" info
"$PY" - "$VENV" <<'EOF'
import importlib
import os
import sys
from importlib.resources import files

import torch

import fastvision
from fastvision._extension import EXTENSION_ERROR, extension_loaded
from fastvision.ops import OPS

venv = os.path.realpath(sys.argv[1])
where = os.path.realpath(fastvision.__file__)
assert where.startswith(venv + os.sep), f"fastvision imported from {where}, not from the venv {venv}"
assert extension_loaded(), f"fastvision._C did not load: {EXTENSION_ERROR}"
nvcc = os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
if torch.version.cuda and nvcc and os.environ.get("FASTVISION_SKIP_CUDA", "0") != "1":
    from fastvision._backend import cuda_kernels_built

    assert cuda_kernels_built(), "torch is a CUDA build and nvcc is present, but no CUDA kernel was built"
import fastvision.triton_kernels  # noqa: E402,F401

for spec in OPS.values():
    if spec.triton_module:
        importlib.import_module(spec.triton_module)
table = files("fastvision.deploy") / "tensorrt_onnx_ops.json"
assert table.is_file(), f"package data missing: {table}"
print(f"wheel_smoke: {where}: extension loaded, Triton modules import, {table.name} present")
EOF
"$VENV/bin/fastvision" bench --quick --op geglu
echo "wheel_smoke: OK ($(basename "$WHEEL"), $("$PY" -c 'import torch; print("torch", torch.__version__)'))"

#!/usr/bin/env bash
# The compatibility leg: the GPU machine's stack (torch 2.11.0 + triton 3.6.0, numpy < 2.4 for
# triton 3.6's interpreter) in a venv of its own. The package is installed as a built wheel (the
# extension compiled with CUDA for sm_90; scripts/wheel_smoke.sh, which also checks the install
# from outside the checkout), then the op-contract harness and the per-op tests run against that
# installed copy with the Triton kernels under the interpreter, and the kernel budget compiles the
# Triton kernels for sm_90 with triton 3.6 (real code generation, no interpreter).
#
#   FASTVISION_VENV          default .venv-compat
#   FASTVISION_TORCH         default "torch==2.11.0 triton==3.6.0"
#   FASTVISION_BUDGET_ARGS   arguments of bench/kernel_budget.py, default --representative
#   FASTVISION_BUDGET_LIMIT  seconds the kernel budget may take, default 1500
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd -P)"
export FASTVISION_VENV="${FASTVISION_VENV:-.venv-compat}"
export FASTVISION_TORCH="${FASTVISION_TORCH:-torch==2.11.0 triton==3.6.0}"
export FASTVISION_EXTRAS="${FASTVISION_EXTRAS:-test,onnx}"
export FASTVISION_WHEEL_DIR="${FASTVISION_WHEEL_DIR:-dist/compat}"
case "$FASTVISION_VENV" in /*) VENV="$FASTVISION_VENV" ;; *) VENV="$ROOT/$FASTVISION_VENV" ;; esac
PY="$VENV/bin/python"

stage() { echo "compat: $1 ($((SECONDS / 60)) min $((SECONDS % 60)) s so far)"; }

stage "wheel build, install and smoke test"
bash scripts/wheel_smoke.sh

# The checkout stays off sys.path (PYTHONSAFEPATH; tests/ has no __init__.py, so pytest adds only
# tests/ itself): the tests import the installed wheel, which this checks first.
export PYTHONSAFEPATH=1
"$PY" -c "
import os, sys, fastvision
where = os.path.realpath(fastvision.__file__)
sys.exit(0 if where.startswith(os.path.realpath(sys.prefix) + os.sep) else f'fastvision imported from {where}')
"
"$PY" -c "import torch, triton, numpy; print('compat: torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"

stage "op-contract harness and per-op tests (Triton under its interpreter)"
OP_TESTS=(tests/test_op_contract.py tests/test_compat.py)
for name in $("$PY" -c "from fastvision.ops import OPS; print(' '.join(OPS))"); do
  for file in "tests/test_${name}.py" "tests/test_${name%2d}.py"; do
    if [ -f "$file" ] && [[ ! " ${OP_TESTS[*]} " == *" $file "* ]]; then
      OP_TESTS+=("$file")
    fi
  done
done
TRITON_INTERPRET=1 FASTVISION_REQUIRE_BACKENDS=cpu,triton \
  "$PY" -m pytest -q -p no:cacheprovider "${OP_TESTS[@]}"

stage "kernel budget under triton $("$PY" -c 'import triton; print(triton.__version__)')"
read -r -a BUDGET_ARGS <<< "${FASTVISION_BUDGET_ARGS:---representative}"
env -u TRITON_INTERPRET timeout "${FASTVISION_BUDGET_LIMIT:-1500}" \
  "$PY" bench/kernel_budget.py --quiet --no-write "${BUDGET_ARGS[@]}"
stage "done"

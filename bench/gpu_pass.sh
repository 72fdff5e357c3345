#!/usr/bin/env bash
# The whole GPU pass in one call, for a machine with a CUDA GPU and torch/triton/nvcc installed:
#   1. build fastvision (CUDA kernels included) with --no-build-isolation,
#   2. run the test suite on the GPU (every backend against its reference),
#   3. run every benchmark (fastvision bench, full sizes) and pytest-benchmark,
#   4. leave result files (JSON/CSV with device, versions and git revision, logs) in $OUT
#      (default bench/results/<date>-<gpu>/), ready to commit under bench/results/.
# Wheels placed in wheels/ (e.g. liger-kernel, a peer) are installed first without dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_' )"
OUT="${OUT:-bench/results/$(date -u +%Y%m%d)-${GPU:-gpu}}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
# A GPU backend that failed to build must fail its tests, not skip them.
export FASTVISION_REQUIRE_BACKENDS="${FASTVISION_REQUIRE_BACKENDS:-triton,cuda}"
status=0

step() { echo "=== $* ($(date -u +%T))"; }

step build
if ls wheels/*.whl >/dev/null 2>&1; then "$PY" -m pip install -q --no-deps wheels/*.whl 2>&1 | tail -3; fi
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  echo "build failed; see $OUT/build.log"; tail -30 "$OUT/build.log"; exit 1
fi
"$PY" -m fastvision info --json | tee "$OUT/info.json"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv >"$OUT/gpu.csv" 2>&1

step "tests on the GPU"
"$PY" -m pytest -q tests -p no:cacheprovider --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1 || status=1
tail -5 "$OUT/tests.log"

step "memcheck of the CUDA and Triton kernels (the op tests' small cases)"
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m pytest -q -x \
    tests/test_geglu.py tests/test_add_layer_norm.py tests/test_topk_attention.py tests/test_sparse_max_pool2d.py \
    tests/test_sparse_conv.py -k "(cuda or triton) and not compile and not export and not opcheck" \
    -p no:cacheprovider >"$OUT/memcheck.log" 2>&1 || status=1
  tail -3 "$OUT/memcheck.log"
fi

step "fastvision bench (full sizes)"
"$PY" -m fastvision bench --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" || status=1

step "pytest-benchmark"
"$PY" -m pytest -q bench -p no:cacheprovider --benchmark-json="$OUT/pytest_benchmark.json" \
  --benchmark-columns=median,iqr,rounds >"$OUT/pytest_benchmark.log" 2>&1 || status=1
tail -3 "$OUT/pytest_benchmark.log"

step "done: results in $OUT (status $status)"
exit $status

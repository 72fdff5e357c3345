#!/usr/bin/env bash
# The GPU pass in one call, within a time budget, for a machine with a CUDA GPU and torch, triton and
# nvcc installed (no network needed):
#
#   bash bench/gpu_pass.sh [--budget SECONDS] [--out DIR] [--skip STAGE[,STAGE]] [--only STAGE[,STAGE]] [--dry-run]
#
# Stages run in order of value, each stopped at its deadline (the smaller of its own cap and what is
# left of the budget) and skipped when less than its minimum is left:
#
#   build        pip install --no-build-isolation -e . for the visible GPU's architecture only
#   tests        GPU correctness of the cuda and triton backends against the references, one op
#                file at a time, fastest first, each with a per-test timeout
#   bench-quick  fastvision bench --quick
#   bench-full   fastvision bench, one op at a time (each op gets a share of what is left)
#   pytest-bench pytest-benchmark, one bench/test_<op>.py at a time
#   memcheck     compute-sanitizer memcheck over the op tests' cuda/triton cases, one file at a time
#   deploy       fastvision bench-inference on the GPU (eager, compile, reduce-overhead, ONNX Runtime,
#                TensorRT where present) and fastvision profile of the small models (summaries)
#   tests-rest   the rest of the test suite on the GPU (models, training, export)
#
# Every stage writes its results into the output folder as soon as they exist (benchmark JSON is
# rewritten after every case), and appends one JSON line to stages.jsonl ("started" before it
# runs, then done / timeout / failed / skipped-no-time / skipped); stages.log is the same for
# people and summary.md is rewritten on exit. A pass cut short, even by SIGKILL, keeps everything
# it measured and says which stage it was in.
#
# Budget: --budget or GPU_PASS_BUDGET seconds (default 480: 8 minutes, under the 10-minute limit of
# one command on the lent machines). Output: --out or OUT (default bench/results/<date>-<gpu>/).
# Wheels placed in wheels/ (e.g. liger-kernel, a peer) are installed first without dependencies.
# --dry-run prints the plan and writes it to stages.jsonl without running anything (works without
# a GPU); it assumes the worst case, every stage running to its limit, so it shows what a slow pass
# would leave out. Without a visible GPU the pass records every stage as skipped-no-gpu and exits 2.
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET="${GPU_PASS_BUDGET:-480}"
OUT="${OUT:-}"
DRY=0
SKIP=","
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET="$2"; shift 2 ;;
    --budget=*) BUDGET="${1#*=}"; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --skip) SKIP=",$2,"; shift 2 ;;
    --only) ONLY=",$2,"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_pass.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_pass.sh: --budget takes whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac

PY="${PYTHON:-python3}"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=10  # seconds kept back for writing the summary
PER_TEST="${GPU_PASS_TEST_TIMEOUT:-90}"  # one test may run this long before its stack is dumped / it fails

GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
GPU_CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')"
if [ -z "$OUT" ] && [ "$DRY" = 1 ]; then OUT="$(mktemp -d -t gpu_pass_plan.XXXXXX)"; fi
OUT="${OUT:-bench/results/$(date -u +%Y%m%d)-$(echo "${GPU_NAME:-gpu}" | tr ' ' '_')}"
mkdir -p "$OUT"
STAGES="$OUT/stages.jsonl"  # appended to: a second pass into the same folder keeps the first one's lines
printf '{"stage": "pass", "status": "started", "budget_s": %s, "date": "%s", "git": "%s", "dry_run": %s}\n' \
  "$BUDGET" "$(date -u +%FT%TZ)" "$(git rev-parse --short HEAD 2>/dev/null)" "$([ "$DRY" = 1 ] && echo true || echo false)" >>"$STAGES"
echo "--- pass started $(date -u +%FT%TZ), budget ${BUDGET}s" >>"$OUT/stages.log"

export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${GPU_CAP:-9.0}}"  # the visible GPU's architecture only
export MAX_JOBS="${MAX_JOBS:-16}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PYTHONFAULTHANDLER=1
# A GPU backend that failed to build must fail its tests, not skip them.
export FASTVISION_REQUIRE_BACKENDS="${FASTVISION_REQUIRE_BACKENDS:-triton,cuda}"
unset TRITON_INTERPRET

SIM=0  # --dry-run: seconds the plan has used so far, as if every stage ran to its limit
now() { echo $(($(date +%s) + SIM)); }
left() { echo $((DEADLINE - $(now) - RESERVE)); }
json_str() { printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' | tr '\n\t' '  '; }

# record STAGE STATUS SECONDS LIMIT RC DETAIL
record() {
  printf '{"stage": "%s", "status": "%s", "seconds": %s, "limit_s": %s, "rc": %s, "detail": "%s", "elapsed_s": %s}\n' \
    "$1" "$2" "$3" "$4" "${5:-null}" "$(json_str "${6:-}")" "$(($(now) - START))" >>"$STAGES"
  printf '%-28s %-16s %5ss of %5ss  %s\n' "$1" "$2" "$3" "$4" "${6:-}" | tee -a "$OUT/stages.log"
}

wanted() {  # wanted STAGE-GROUP
  case "$SKIP" in *",$1,"*) return 1 ;; esac
  [ -z "$ONLY" ] && return 0
  case "$ONLY" in *",$1,"*) return 0 ;; esac
  return 1
}

CURRENT=""
CHILD=""
STAGE_T0=0
# run NAME GROUP MIN_S CAP_S LOG COMMAND...: runs COMMAND under `timeout` with what is left, at most CAP_S.
run() {
  local name=$1 group=$2 min=$3 cap=$4 log=$5
  shift 5
  if ! wanted "$group"; then record "$name" skipped 0 0 null "not asked for"; return 0; fi
  local avail limit
  avail=$(left)
  limit=$((cap < avail ? cap : avail))
  if [ "$limit" -lt "$min" ]; then
    if [ "$cap" -lt "$avail" ]; then
      record "$name" skipped-no-time 0 "$limit" null "needs ${min}s; its group's time is used up (${avail}s of the budget left)"
    else
      record "$name" skipped-no-time 0 "$limit" null "needs ${min}s, ${avail}s of the budget left"
    fi
    return 0
  fi
  if [ "$DRY" = 1 ]; then
    record "$name" planned "$limit" "$limit" null "$(printf '%q ' "$@")"
    SIM=$((SIM + limit))
    return 0
  fi
  printf '{"stage": "%s", "status": "started", "limit_s": %s, "elapsed_s": %s}\n' "$name" "$limit" "$(($(now) - START))" >>"$STAGES"
  CURRENT="$name"
  STAGE_T0=$(now)
  local rc status
  # In the background so that a TERM sent to the pass runs its trap at once (bash defers traps
  # while a foreground command runs); the trap stops the stage and records it.
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$log" 2>&1 &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=""
  CURRENT=""
  case $rc in
    0) status=done ;;
    124|137) status=timeout ;;
    5) status=no-tests ;;  # pytest: nothing collected or selected
    *) status=failed ;;
  esac
  record "$name" "$status" "$(($(now) - STAGE_T0))" "$limit" "$rc" "$(tail -1 "$log" 2>/dev/null | cut -c1-200)"
  [ "$status" = done ] || [ "$status" = no-tests ]
}

# share GROUP_END FILES_LEFT MIN_S: one part's limit within a group that must end at GROUP_END: a fair
# share of what is left of the group, at least MIN_S (a part that finishes early leaves more to the
# rest), never past the group's end.
share() {
  local left_in_group=$(($1 - $(now))) fair
  fair=$((left_in_group / $2))
  [ "$fair" -lt "$3" ] && fair=$3
  [ "$fair" -gt "$left_in_group" ] && fair=$left_in_group
  echo "$fair"
}

write_summary() {
  {
    echo "# GPU pass: ${GPU_NAME:-no GPU} (sm_${GPU_CAP:-?}), budget ${BUDGET}s, $(($(now) - START))s used"
    echo
    echo "git $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | grep -q . && echo '(with local changes)')"
    echo
    echo '```'
    cat "$OUT/stages.log"
    echo '```'
  } >"$OUT/summary.md"
}

on_exit() {
  if [ -n "$CHILD" ]; then kill -TERM "$CHILD" 2>/dev/null; wait "$CHILD" 2>/dev/null; fi
  if [ -n "$CURRENT" ]; then
    record "$CURRENT" interrupted "$(($(now) - STAGE_T0))" 0 null "the pass was stopped during this stage"
  fi
  write_summary
}
trap on_exit EXIT
trap 'exit 130' INT TERM

echo "GPU pass: ${GPU_NAME:-no GPU visible}, arch ${TORCH_CUDA_ARCH_LIST}, budget ${BUDGET}s, results in $OUT"

ALL_GROUPS="build tests bench-quick bench-full pytest-bench memcheck deploy tests-rest"
# GPU_PASS_ALLOW_NO_GPU=1 runs the stages anyway: for checking the pass's own mechanics on a CPU machine.
if [ "$DRY" = 0 ] && [ "${GPU_PASS_ALLOW_NO_GPU:-0}" != 1 ] && { [ -z "$GPU_NAME" ] || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }; then
  for group in $ALL_GROUPS; do record "$group" skipped-no-gpu 0 0 null "no CUDA device visible"; done
  exit 2
fi

# ---- build: the visible architecture only
build() {
  if ls wheels/*.whl >/dev/null 2>&1; then "$PY" -m pip install -q --no-deps wheels/*.whl || return 1; fi
  "$PY" -m pip install --no-build-isolation --no-deps -e . || return 1
  "$PY" -m fastvision info --json >"$OUT/info.json"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv >"$OUT/gpu.csv"
}
export -f build
export PY OUT
# Caps per stage group (seconds), scaled to the budget; GPU_PASS_<GROUP>_CAP overrides one. A group
# that finishes early leaves its time to the next; one that runs long is stopped at its cap or at the
# budget's end, whichever comes first.
pct() { echo $((BUDGET * $1 / 100)); }
BUILD_CAP="${GPU_PASS_BUILD_CAP:-$(pct 40)}"
TESTS_CAP="${GPU_PASS_TESTS_CAP:-$(pct 35)}"
QUICK_CAP="${GPU_PASS_BENCH_QUICK_CAP:-$(pct 12)}"
FULL_CAP="${GPU_PASS_BENCH_FULL_CAP:-$(pct 25)}"
PB_CAP="${GPU_PASS_PYTEST_BENCH_CAP:-$(pct 12)}"
MC_CAP="${GPU_PASS_MEMCHECK_CAP:-$(pct 15)}"
DEPLOY_CAP="${GPU_PASS_DEPLOY_CAP:-$(pct 15)}"

run build build 30 "$BUILD_CAP" "$OUT/build.log" bash -c build

# ---- GPU correctness of the cuda and triton backends, fastest files first
PYTEST_ARGS=(-q -p no:cacheprovider -o "faulthandler_timeout=$PER_TEST")
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_ARGS+=("--timeout=$PER_TEST"); fi
OP_TESTS="geglu add_layer_norm grn masked_gather sparse_max_pool2d kernel_edges sparse_conv topk_attention moe op_contract"
mkdir -p "$OUT/tests"
RUN_FILES=()
for name in $OP_TESTS; do [ -f "tests/test_$name.py" ] && RUN_FILES+=("tests/test_$name.py"); done
tests_end=$(($(now) + TESTS_CAP))
set -- "${RUN_FILES[@]}"
while [ $# -gt 0 ]; do
  file="$1"; name="$(basename "$file" .py)"; name="${name#test_}"
  run "tests:$name" tests 20 "$(share "$tests_end" $# 20)" "$OUT/tests/$name.log" \
    "$PY" -m pytest "${PYTEST_ARGS[@]}" "$file" -k "cuda or triton" --junitxml="$OUT/tests/$name.xml"
  shift
done

# ---- quick benchmark (JSON written after every case)
run bench-quick bench-quick 30 "$QUICK_CAP" "$OUT/bench_quick.txt" \
  "$PY" -m fastvision bench --quick --json "$OUT/bench_quick.json"

# ---- full benchmark, one op at a time; each op gets a fair share of what is left for the stage
BENCH_OPS="$("$PY" -c 'from fastvision.benchmark.runner import op_names; print(" ".join(op_names()))' 2>/dev/null)"
BENCH_OPS="${BENCH_OPS:-add_layer_norm geglu grn masked_gather moe sparse_conv2d sparse_max_pool2d topk_attention train_step}"
mkdir -p "$OUT/bench"
full_end=$(($(now) + FULL_CAP))
set -- $BENCH_OPS
while [ $# -gt 0 ]; do
  run "bench-full:$1" bench-full 20 "$(share "$full_end" $# 30)" "$OUT/bench/$1.txt" \
    "$PY" -m fastvision bench --op "$1" --budget 0.5 --json "$OUT/bench/$1.json"
  shift
done

# ---- pytest-benchmark, one file at a time
mkdir -p "$OUT/pytest_benchmark"
pb_end=$(($(now) + PB_CAP))
set -- bench/test_*.py
while [ $# -gt 0 ]; do
  name="$(basename "$1" .py)"; name="${name#test_}"
  run "pytest-bench:$name" pytest-bench 15 "$(share "$pb_end" $# 20)" "$OUT/pytest_benchmark/$name.log" \
    "$PY" -m pytest -q "$1" -p no:cacheprovider --benchmark-json="$OUT/pytest_benchmark/$name.json" \
    --benchmark-columns=min,median,iqr,rounds --benchmark-max-time=0.2
  shift
done

# ---- compute-sanitizer memcheck over the op tests' small cuda/triton cases
if command -v compute-sanitizer >/dev/null || [ "$DRY" = 1 ]; then
  mkdir -p "$OUT/memcheck"
  mc_end=$(($(now) + MC_CAP))
  set -- "${RUN_FILES[@]}"
  while [ $# -gt 0 ]; do
    name="$(basename "$1" .py)"; name="${name#test_}"
    run "memcheck:$name" memcheck 20 "$(share "$mc_end" $# 45)" "$OUT/memcheck/$name.log" \
      compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m pytest "${PYTEST_ARGS[@]}" -x "$1" \
      -k "(cuda or triton) and not compile and not export and not opcheck"
    shift
  done
else
  record memcheck skipped 0 0 null "compute-sanitizer not found"
fi

# ---- inference benchmark and profiles on the GPU (the small models; the CPU ones are in profiles/)
mkdir -p "$OUT/profiles"
deploy_end=$(($(now) + DEPLOY_CAP))
run deploy:bench-inference deploy 30 "$(share "$deploy_end" 4 60)" "$OUT/inference.txt" \
  "$PY" -m fastvision bench-inference --quick --device cuda --model vit_mnist --model sparse_unet_mnist \
  --model sparse_moe_denoiser --model mamba_ginr_small --json "$OUT/inference.json"
set -- vit_mnist sparse_moe_denoiser mamba_ginr_small
while [ $# -gt 0 ]; do
  run "deploy:profile-$1" deploy 15 "$(share "$deploy_end" $# 20)" "$OUT/profiles/$1.log" \
    "$PY" -m fastvision profile "$1" --device cuda --steps 3 --no-trace --out "$OUT/profiles/$1"
  shift
done

# ---- the rest of the suite on the GPU
IGNORES=()
for file in "${RUN_FILES[@]}"; do IGNORES+=("--ignore=$file"); done
run tests-rest tests-rest 30 100000 "$OUT/tests/rest.log" \
  "$PY" -m pytest "${PYTEST_ARGS[@]}" tests "${IGNORES[@]}" --junitxml="$OUT/tests/rest.xml"

failed=$(grep -cE '"status": "(failed|timeout)"' "$STAGES")
echo "GPU pass finished in $(($(now) - START))s: $failed stage(s) failed or timed out; results in $OUT"
[ "$failed" = 0 ]

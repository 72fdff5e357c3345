#!/usr/bin/env bash
# The GPU pass in one call, within a time budget, for a machine with a CUDA GPU and torch, triton and
# nvcc installed (no network needed):
#
#   bash bench/gpu_pass.sh [--budget SECONDS] [--out DIR] [--skip STAGE[,STAGE]] [--only STAGE[,STAGE]] [--dry-run]
#
# First, before any stage, it checks the versions it finds (python, torch and its CUDA, triton, nvcc,
# pytest and its plugins, the peers) against the tested range, writes them to versions.json, and
# continues with what works: a missing pytest skips the test stages, a missing pytest-benchmark the
# pytest-bench stage, a triton or nvcc that is absent or fails to import drops that backend from
# FASTVISION_REQUIRE_BACKENDS; versions outside the tested range are warned about, not refused.
# This runs in --dry-run too (e.g. `PYTHON=.venv-gpu-stack/bin/python bash bench/gpu_pass.sh
# --dry-run` on a machine with the GPU stack and no GPU).
#
# Stages run in order of value, each stopped at its deadline (the smaller of its own cap and what is
# left of the budget) and skipped when less than its minimum is left:
#
#   peers        the carried peer wheels in bench/peers/ (bench/fetch_peers.sh fills it where there
#                is network): pip install --no-deps --no-index, each wheel on its own (one that fails
#                is reported, the others install); --dry-run checks that they would install
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
# Peers: bench/peers/*.whl (liger-kernel, fla-core, spconv-triton, einops), carried with the tree.
# mamba-ssm (source only) is not carried: an sm_90 build of it was not attempted (hours of CUDA
# compilation on the two-core build machine); its benchmark rows say it is absent.
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

ALL_GROUPS="peers build tests bench-quick bench-full pytest-bench memcheck deploy tests-rest"

# ---- versions: what this machine has, and what the pass can do with it (runs in --dry-run too)
check_versions() {
  "$PY" - "$OUT/versions.json" "$CUDA_HOME" <<'EOF'
import importlib
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import sys

out, cuda_home = sys.argv[1], sys.argv[2]
# The tested range is fastvision._compat.TESTED, read from its file (no package import, no build yet).
spec = importlib.util.spec_from_file_location("fastvision_compat", os.path.join("fastvision", "_compat.py"))
compat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compat)
tested_torch, tested_triton = (
    [f"{major}.{minor}" for major, minor in compat.TESTED[name]] for name in ("torch", "triton")
)
dists = ["torch", "triton", "numpy", "pytest", "pytest-benchmark", "pytest-timeout", "liger-kernel",
         "fla-core", "spconv-triton", "einops", "onnxruntime", "tensorrt", "mamba-ssm", "fastvision"]
info = {"python": platform.python_version()}
for dist in dists:
    try:
        info[dist] = md.version(dist)
    except md.PackageNotFoundError:
        info[dist] = None
flags, notes = {}, []


def importable(module):
    try:
        importlib.import_module(module)
        return True
    except Exception as exc:  # noqa: BLE001  (a broken install is reported, the pass goes on)
        notes.append(f"{module} is installed but fails to import: {type(exc).__name__}: {exc}"[:200])
        return False


def minor(version):
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2])


flags["HAVE_TORCH"] = int(info["torch"] is not None and importable("torch"))
if flags["HAVE_TORCH"]:
    import torch

    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
flags["HAVE_TRITON"] = int(info["triton"] is not None and importable("triton"))
flags["HAVE_NVCC"] = int(os.access(os.path.join(cuda_home, "bin", "nvcc"), os.X_OK))
info["nvcc"] = os.path.join(cuda_home, "bin", "nvcc") if flags["HAVE_NVCC"] else None
flags["HAVE_PYTEST"] = int(info["pytest"] is not None)
flags["HAVE_PYTEST_BENCHMARK"] = int(info["pytest-benchmark"] is not None)
for name, (low, high) in (("torch", tested_torch), ("triton", tested_triton)):
    version = info[name]
    if version and not minor(low) <= minor(version) <= minor(high):
        notes.append(f"warning: {name} {version} is outside the tested range {low} .. {high}; continuing")
info["notes"] = notes
with open(out, "w") as handle:
    json.dump({**info, "flags": flags}, handle, indent=1)
for key in ("python", "torch", "torch_cuda", "triton", "nvcc", "numpy", "pytest", "pytest-benchmark",
            "liger-kernel", "fla-core", "spconv-triton", "einops", "mamba-ssm", "gpu"):
    print(f"# {key}: {info.get(key) or 'absent'}", file=sys.stderr)
for note in notes:
    print(f"# {note}", file=sys.stderr)
for key, value in flags.items():
    print(f"{key}={value}")
EOF
}
HAVE_TORCH=0 HAVE_TRITON=0 HAVE_NVCC=0 HAVE_PYTEST=0 HAVE_PYTEST_BENCHMARK=0
VERSION_FLAGS="$(check_versions 2>"$OUT/versions.txt")"
cat "$OUT/versions.txt"
eval "$VERSION_FLAGS"
record versions done 0 0 0 "$(grep -E '# (torch|triton):|warning' "$OUT/versions.txt" | tr '\n' ' ' | cut -c1-200)"
# Continue with what works: drop what this machine cannot do, and say why.
require=""
[ "$HAVE_TRITON" = 1 ] && require="triton"
[ "$HAVE_NVCC" = 1 ] && require="${require:+$require,}cuda"
if [ "$FASTVISION_REQUIRE_BACKENDS" = "triton,cuda" ] && [ "$require" != "triton,cuda" ]; then
  echo "# FASTVISION_REQUIRE_BACKENDS=${require:-(none)}: only the backends this machine can build are required"
  export FASTVISION_REQUIRE_BACKENDS="$require"
fi
if [ "$HAVE_PYTEST" = 0 ]; then
  SKIP="${SKIP}tests,memcheck,tests-rest,pytest-bench,"
  echo "# pytest is not installed: the test, memcheck and pytest-bench stages are skipped"
elif [ "$HAVE_PYTEST_BENCHMARK" = 0 ]; then
  SKIP="${SKIP}pytest-bench,"
  echo "# pytest-benchmark is not installed: the pytest-bench stage is skipped"
fi
if [ "$HAVE_TORCH" = 0 ]; then
  for group in $ALL_GROUPS; do record "$group" skipped 0 0 null "torch is not importable with $PY"; done
  exit 2
fi
# GPU_PASS_ALLOW_NO_GPU=1 runs the stages anyway: for checking the pass's own mechanics on a CPU machine.
if [ "$DRY" = 0 ] && [ "${GPU_PASS_ALLOW_NO_GPU:-0}" != 1 ] && { [ -z "$GPU_NAME" ] || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }; then
  for group in $ALL_GROUPS; do record "$group" skipped-no-gpu 0 0 null "no CUDA device visible"; done
  exit 2
fi

# ---- peers: the carried wheels, without dependencies or network; each on its own
peers() {
  local wheels=(bench/peers/*.whl) failed=0 wheel
  if [ ! -e "${wheels[0]}" ]; then
    echo "no wheels in bench/peers/: run bench/fetch_peers.sh where there is network and carry bench/peers"
    return 0
  fi
  for wheel in "${wheels[@]}"; do
    if "$PY" -m pip install -q --no-deps --no-index ${PEERS_DRY:-} "$wheel"; then
      echo "peer $(basename "$wheel"): $([ -n "${PEERS_DRY:-}" ] && echo "would install" || echo installed)"
    else
      echo "peer $(basename "$wheel"): FAILED to install"; failed=1
    fi
  done
  return $failed
}
export -f peers
if [ "$DRY" = 1 ]; then
  # The plan checks that the carried wheels would install here (pip --dry-run changes nothing).
  PEERS_DRY=--dry-run peers 2>&1 | tee "$OUT/peers_dry_run.log" | sed 's/^/# /'
fi
run peers peers 10 30 "$OUT/peers.log" bash -c peers

# ---- build: the visible architecture only
build() {
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
OP_TESTS="geglu add_layer_norm grn masked_gather sparse_max_pool2d selective_scan kernel_edges sparse_conv block_topk_attention topk_attention moe op_contract"
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

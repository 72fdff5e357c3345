#!/usr/bin/env bash
# Downloads the pure-Python peer libraries the GPU pass compares against into bench/peers/ (a
# folder that ignores itself in git), for machines with no network: the GPU machine gets them with
# the working tree (the run tool's `carry: ["bench/peers"]`), and bench/gpu_pass.sh installs them
# there with `pip install --no-deps --no-index`.
#
#   bash bench/fetch_peers.sh [--dest DIR] [--limit-mib N]
#
# Peers (wheels only, no dependencies; every benchmark row of a peer names the version installed):
#   liger-kernel   GEGLU (LigerGELUMulFunction) and LayerNorm, Triton (needs torch, triton)
#   fla-core       flash-linear-attention's ops, its native sparse attention the block-sparse peer
#                  (needs einops, fetched too)
#   spconv-triton  a Triton replacement of spconv's sparse convolution (needs numpy, torch)
#   einops         fla-core's one dependency, pure Python
# Not fetched: mamba-ssm and causal-conv1d (source only; an sm_90 build against torch 2.11 takes
# their CUDA sources hours on two cores: not attempted), flash-attn (source only, same), warpconvnet
# (CUDA build with CUTLASS, hours).
#
# Size check: the checkout's tracked files plus the wheels must stay under the carry limit
# (64 MiB, --limit-mib); the script fails and says so otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST="bench/peers"
LIMIT_MIB=64
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) DEST="$2"; shift 2 ;;
    --limit-mib) LIMIT_MIB="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "fetch_peers.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
PEERS=(liger-kernel fla-core spconv-triton einops)
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

mkdir -p "$DEST"
printf '*\n' >"$DEST/.gitignore"  # the folder ignores itself: wheels never get committed
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" "${PEERS[@]}"

# Keep the newest wheel of each peer only (a second run after a release leaves two).
"$PY" - "$DEST" <<'EOF'
import sys
from pathlib import Path

from packaging.utils import parse_wheel_filename

dest = Path(sys.argv[1])
newest = {}
for wheel in dest.glob("*.whl"):
    name, version, *_ = parse_wheel_filename(wheel.name)
    if name not in newest or version > newest[name][0]:
        newest[name] = (version, wheel)
for wheel in dest.glob("*.whl"):
    name, version, *_ = parse_wheel_filename(wheel.name)
    if newest[name][1] != wheel:
        wheel.unlink()
for name, (version, wheel) in sorted(newest.items()):
    print(f"{name} {version}: {wheel.name} ({wheel.stat().st_size / 2**20:.2f} MiB)")
EOF

tree_bytes=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
wheel_bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
total=$((tree_bytes + wheel_bytes))
printf 'tracked tree %.1f MiB + wheels %.1f MiB = %.1f MiB (limit %s MiB)\n' \
  "$(echo "$tree_bytes / 1048576" | bc -l)" "$(echo "$wheel_bytes / 1048576" | bc -l)" \
  "$(echo "$total / 1048576" | bc -l)" "$LIMIT_MIB"
if [ "$total" -ge $((LIMIT_MIB * 1048576)) ]; then
  echo "fetch_peers.sh: the tree plus the wheels exceed ${LIMIT_MIB} MiB: they cannot travel together" >&2
  exit 1
fi

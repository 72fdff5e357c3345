#!/usr/bin/env bash
# Installs fastvision (scripts/setup.sh) and runs the main job: `fastvision bench`, which checks
# every backend of every op against its reference and times it. Pass --quick for small sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${FASTVISION_VENV:-.venv}"
exec "$VENV/bin/fastvision" bench "$@"

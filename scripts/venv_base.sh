# Sourced by setup.sh and wheel_smoke.sh: installs the build tools, torch ($TORCH_SPEC) and numpy
# into the venv whose python is $PY, and defines PIP (pip install, a failed download retried).
# numpy is held below 2.4 when torch brought triton 3.6: that interpreter fails on numpy 2.4 at
# `range()` over a runtime scalar inside a kernel.
PIP=("$PY" -m pip install -q --retries 2)
"${PIP[@]}" --upgrade pip wheel "setuptools>=77"
# shellcheck disable=SC2086  # TORCH_SPEC may hold several requirements ("torch==2.11.0 triton==3.6.0")
"${PIP[@]}" $TORCH_SPEC ninja
NUMPY_SPEC=numpy
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('triton').startswith('3.6.') else 1)" \
    2>/dev/null; then
  NUMPY_SPEC="numpy<2.4"
fi
"${PIP[@]}" "$NUMPY_SPEC"

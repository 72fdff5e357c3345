"""The torch and triton versions the test suite runs on, and a warning when running outside them.

``TESTED`` is the range that ``pyproject.toml`` declares (the oldest tested release to the newest
tested release, by major.minor): torch 2.11 with triton 3.6 is the GPU machine's stack, torch 2.14
with triton 3.8 the development stack (CI runs the suite on both), torch 2.15 with triton 3.9 the newest
release (the suite and the kernel budget run on it by hand: README, "Supported versions"). Outside
the range the package may well work, but nothing has checked it.
"""

from __future__ import annotations

import importlib.metadata
import os
import re

# package -> (oldest tested, newest tested), as (major, minor); keep in step with pyproject.toml.
TESTED: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "torch": ((2, 11), (2, 15)),
    "triton": ((3, 6), (3, 9)),
}

# Triton releases whose interpreter (TRITON_INTERPRET=1) fails on numpy from this release on: under
# triton 3.6 with numpy 2.4, `range()` over a runtime scalar in a jit function raises "only
# 0-dimensional arrays can be converted to Python scalars" (numpy 2.3 works; triton 3.8 works with 2.4).
_INTERPRETER_NUMPY_LIMIT = {(3, 6): (2, 4)}


def parse_version(text: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string such as ``2.11.0+cu130`` or ``3.6.0rc1``; ``None``
    when it does not start with two numbers."""
    if not isinstance(text, str):
        raise TypeError(f"version must be a str, got {type(text).__name__}")
    match = re.match(r"\s*(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _installed(package: str) -> str | None:
    if package == "torch":
        import torch

        return torch.__version__
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_versions() -> dict[str, str | None]:
    """The installed version of each package in ``TESTED`` and of numpy (``None``: not installed)."""
    return {package: _installed(package) for package in (*TESTED, "numpy")}


def _range_text(package: str) -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = TESTED[package]
    return f"{lo_major}.{lo_minor} to {hi_major}.{hi_minor}"


def version_warnings(
    versions: dict[str, str | None] | None = None, interpreting: bool | None = None
) -> list[str]:
    """One line per problem with the versions found (default: the installed ones): a package of
    ``TESTED`` outside its tested range, and numpy too new for the installed triton's interpreter
    when ``interpreting`` (default: ``TRITON_INTERPRET=1`` is set). Empty when all is in range."""
    if versions is None:
        versions = installed_versions()
    if interpreting is None:
        interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    warnings = []
    for package, (oldest, newest) in TESTED.items():
        found = versions.get(package)
        if found is None:
            continue  # triton is optional (no Triton backend without it)
        parsed = parse_version(found)
        if parsed is None or not oldest <= parsed <= newest:
            warnings.append(
                f"{package} {found} is outside the tested range {_range_text(package)}: "
                "the test suite has not run on it"
            )
    triton_version = parse_version(versions.get("triton") or "")
    numpy_version = parse_version(versions.get("numpy") or "")
    limit = _INTERPRETER_NUMPY_LIMIT.get(triton_version) if triton_version else None
    if interpreting and limit and numpy_version and numpy_version >= limit:
        bound = f"{limit[0]}.{limit[1]}"
        warnings.append(
            f"numpy {versions['numpy']} with triton {versions['triton']}: this triton's interpreter "
            f"(TRITON_INTERPRET=1) fails on numpy >= {bound}; install 'numpy<{bound}'"
        )
    return warnings


def version_warning(
    versions: dict[str, str | None] | None = None, interpreting: bool | None = None
) -> str | None:
    """The warnings of :func:`version_warnings` as one string, or ``None`` when there are none."""
    found = version_warnings(versions, interpreting)
    return "; ".join(found) if found else None

"""Loads the compiled extension ``fastvision._C`` when it was built, and says what it holds."""

from __future__ import annotations

import os

import torch

if os.environ.get("FASTVISION_DISABLE_EXTENSION", "0") == "1":  # run as if it were not built
    _C = None
    EXTENSION_ERROR: str | None = "disabled by FASTVISION_DISABLE_EXTENSION=1"
else:
    try:
        from fastvision import _C  # noqa: F401  (importing registers the C++/CUDA ops)

        EXTENSION_ERROR = None
    except ImportError as exc:  # built without the extension, or a mismatched torch
        _C = None
        EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"


def extension_loaded() -> bool:
    return _C is not None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``fastvision::<op>`` has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    if _C is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastvision::{op}", dispatch_key)
    except RuntimeError:
        return False

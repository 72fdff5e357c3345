"""Loads the compiled extension ``fastvision._C`` when it was built, and says what it holds."""

from __future__ import annotations

import torch

try:
    from fastvision import _C  # noqa: F401  (importing registers the C++/CUDA ops)

    EXTENSION_ERROR: str | None = None
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

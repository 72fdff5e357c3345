"""NVTX ranges that mark module forwards in Nsight timelines.

Uses ``torch.cuda.nvtx`` where torch has it, else the ``nvtx`` package, else does nothing. Ranges
are skipped while torch.compile or torch.export trace, so they never cause a graph break.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


def _pick_backend() -> tuple[str, Callable[[str], object] | None, Callable[[], object] | None]:
    try:
        from torch.cuda import nvtx as torch_nvtx

        torch_nvtx.range_push("fastvision")  # raises on builds without NVTX support
        torch_nvtx.range_pop()
        return "torch.cuda.nvtx", torch_nvtx.range_push, torch_nvtx.range_pop
    except Exception:  # noqa: BLE001
        pass
    try:
        import nvtx

        return "nvtx", nvtx.push_range, nvtx.pop_range
    except ImportError:
        return "none", None, None


NVTX_BACKEND, _push, _pop = _pick_backend()


def _tracing() -> bool:
    compiler = torch.compiler
    return compiler.is_compiling() or (hasattr(compiler, "is_exporting") and compiler.is_exporting())


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """``with nvtx_range("fastvision.GEGLU"):`` marks the enclosed work in a profile."""
    if _push is None or _tracing():
        yield
        return
    _push(name)
    try:
        yield
    finally:
        _pop()

"""NVTX ranges that mark module forwards in Nsight timelines (imported by ``fastvision.nn`` and
``fastvision.models``; it imports nothing of the package).

Uses ``torch.cuda.nvtx`` where torch has it, else the ``nvtx`` package, else does nothing. Ranges
are skipped while torch.compile or torch.export trace, so they never cause a graph break. Inside
:func:`recording_functions` (``fastvision profile`` turns it on), each range is also a
``torch.profiler`` record, so module forwards show in its Chrome trace and per-module table;
otherwise a range costs nothing beyond the NVTX push.
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


# Set by recording_functions: nvtx_range then also opens a torch.profiler record of the same name.
_RECORD_FUNCTIONS = False


def recording_functions_enabled() -> bool:
    return _RECORD_FUNCTIONS


@contextlib.contextmanager
def recording_functions() -> Iterator[None]:
    """While active, every :func:`nvtx_range` is also a ``torch.profiler.record_function``."""
    global _RECORD_FUNCTIONS
    previous, _RECORD_FUNCTIONS = _RECORD_FUNCTIONS, True
    try:
        yield
    finally:
        _RECORD_FUNCTIONS = previous


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """``with nvtx_range("fastvision.GEGLU"):`` marks the enclosed work in a profile."""
    if (_push is None and not _RECORD_FUNCTIONS) or _tracing():
        yield
        return
    record = torch.profiler.record_function(name) if _RECORD_FUNCTIONS else contextlib.nullcontext()
    with record:
        if _push is not None:
            _push(name)
        try:
            yield
        finally:
            if _push is not None:
                _pop()

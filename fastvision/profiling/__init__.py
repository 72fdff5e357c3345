"""Profiling: NVTX ranges (``fastvision.profiling.ranges``, the low-level part the modules import)
and the ``fastvision profile`` application (``fastvision.profiling.model``, which imports the
models, training and benchmark code and is imported by nothing below the CLI).

This package's own namespace holds only the ranges, so importing it never loads the application;
``profile_model`` and the rest of the application are reached through ``fastvision.profiling.model``.
"""

from fastvision.profiling.ranges import NVTX_BACKEND, nvtx_range, recording_functions

__all__ = ["NVTX_BACKEND", "nvtx_range", "recording_functions"]

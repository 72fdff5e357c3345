"""Visualisation: braille samples in the terminal, attention overlays, embedding plots, denoising figures.

* :mod:`fastvision.viz.digits`: the digit readers (braille validation samples, attention maps,
  PCA/t-SNE embedding plots, ``save_model_figures``).
* :mod:`fastvision.viz.denoise`: noisy / denoised / clean figures of the denoisers.

The figures need matplotlib and scikit-learn, from the ``train`` extra
(``pip install 'fastvision[train]'``); they are imported when a figure is drawn, and a missing one
raises :class:`~fastvision.data.extras.MissingExtraError`. The names below load their submodule on
first access.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "digits": (
        "ANSI_GRAY",
        "ANSI_GREEN",
        "ANSI_RED",
        "ANSI_RESET",
        "BRAILLE_BASE",
        "BRAILLE_DOTS",
        "BrailleValidationHook",
        "attention_heatmaps",
        "braille_lines",
        "embedding_features",
        "predictions_from_outputs",
        "project_2d",
        "render_sample",
        "render_samples",
        "save_attention_maps",
        "save_embedding_plot",
        "save_model_figures",
        "show_validation_samples",
        "use_color",
    ),
    "denoise": ("denoising_figure_hook", "save_denoising_figure", "write_denoising_png"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'fastvision.viz' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fastvision.viz.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

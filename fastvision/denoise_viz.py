"""The denoising figures, now in :mod:`fastvision.viz.denoise`; this import path keeps working."""

from fastvision.viz.denoise import denoising_figure_hook, save_denoising_figure, write_denoising_png

__all__ = ["denoising_figure_hook", "save_denoising_figure", "write_denoising_png"]

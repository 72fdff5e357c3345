"""Denoising figures: rows of noisy / denoised / clean images with their PSNR, written as a PNG.

``save_denoising_figure(model, clean, path)`` adds noise itself; ``denoising_figure_hook(folder)``
returns a ``train(..., on_validation=...)`` hook that draws the first validation batch each epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastvision.data.extras import require
from fastvision.train.metrics import psnr


def _as_image(t: torch.Tensor):
    """``[C, H, W]`` in [0, 1] -> an HxW (grey) or HxWxC array for imshow."""
    array = t.detach().float().clamp(0, 1).cpu()
    return array[0].numpy() if array.shape[0] == 1 else array.permute(1, 2, 0).numpy()


def write_denoising_png(
    noisy: torch.Tensor, denoised: torch.Tensor, clean: torch.Tensor, path: str | Path, title: str = ""
) -> Path:
    """One row per sample: noisy input, model output, ground truth, each titled with its PSNR (dB)."""
    matplotlib = require("matplotlib", "denoising figures (fastvision.viz.denoise)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not (noisy.shape == denoised.shape == clean.shape) or clean.dim() != 4 or clean.shape[0] == 0:
        raise ValueError(
            "noisy, denoised and clean must share one non-empty [N, C, H, W] shape, got "
            f"{tuple(noisy.shape)}, {tuple(denoised.shape)}, {tuple(clean.shape)}"
        )
    rows = clean.shape[0]
    noisy_psnr = psnr(noisy.float().clamp(0, 1), clean.float())
    denoised_psnr = psnr(denoised.float().clamp(0, 1), clean.float())
    fig, axes = plt.subplots(rows, 3, figsize=(6.6, 2.2 * rows), squeeze=False)
    grey = {"cmap": "gray", "vmin": 0, "vmax": 1} if clean.shape[1] == 1 else {}
    for i in range(rows):
        panels = (
            (noisy[i], f"noisy {noisy_psnr[i].item():.1f} dB"),
            (denoised[i], f"denoised {denoised_psnr[i].item():.1f} dB"),
            (clean[i], "clean"),
        )
        for ax, (image, label) in zip(axes[i], panels, strict=True):
            ax.imshow(_as_image(image), interpolation="nearest", **grey)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@torch.no_grad()
def save_denoising_figure(
    model: nn.Module,
    clean: torch.Tensor,
    path: str | Path,
    noise_sigma: float = 0.2,
    num_samples: int = 6,
    seed: int = 0,
) -> Path:
    """Noise ``clean[:num_samples]`` (fixed ``seed``, as the denoise task does), denoise, draw."""
    clean = clean[:num_samples]
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed)).to(clean)
    noisy = (clean + noise_sigma * noise).clamp(0.0, 1.0)
    was_training = model.training
    model.eval()
    try:
        denoised = model(noisy).float().clamp(0.0, 1.0)
    finally:
        model.train(was_training)
    return write_denoising_png(noisy, denoised, clean, path, title=f"sigma {noise_sigma}")


def denoising_figure_hook(
    folder: str | Path, num_samples: int = 6
) -> Callable[[nn.Module, Any, Any, int], None]:
    """An ``on_validation`` hook for ``fastvision.train.train`` on a denoise model: writes
    ``folder/denoise_epoch<N>.png`` from the first validation batch (its noisy inputs and outputs)."""

    def hook(model: nn.Module, batch: Any, outputs: Any, epoch: int) -> None:
        clean = batch[0][:num_samples]
        write_denoising_png(
            outputs["noisy"][:num_samples],
            outputs["denoised"][:num_samples],
            clean,
            Path(folder) / f"denoise_epoch{epoch + 1:03d}.png",
            title=f"validation, epoch {epoch + 1}",
        )

    return hook

"""Batch augmentations applied on the training device."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_translate(
    images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None, tiles: int = 1
) -> torch.Tensor:
    """Shift each image of ``[B, C, H, W]`` by its own integer offset in ``[-max_shift, max_shift]``
    along both axes, filling the uncovered border with zeros (MNIST's background).

    ``tiles > 1`` cuts every image into a ``tiles x tiles`` grid of equal cells and shifts each cell
    on its own, within the cell: each digit of a 2x2 digit grid moves independently and stays in
    its quadrant. One padded copy and one gather for the whole batch: no per-sample Python loop.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if tiles < 1:
        raise ValueError(f"tiles must be >= 1, got {tiles}")
    if max_shift == 0 or images.shape[0] == 0:
        return images
    if tiles > 1:
        batch, channels, height, width = images.shape
        if height % tiles or width % tiles:
            raise ValueError(f"tiles={tiles} must divide the image size {height}x{width}")
        h, w = height // tiles, width // tiles
        cells = images.reshape(batch, channels, tiles, h, tiles, w).permute(0, 2, 4, 1, 3, 5)
        shifted = random_translate(cells.reshape(-1, channels, h, w), max_shift, generator)
        shifted = shifted.reshape(batch, tiles, tiles, channels, h, w).permute(0, 3, 1, 4, 2, 5)
        return shifted.reshape(batch, channels, height, width)
    batch, _, height, width = images.shape
    padded = F.pad(images, (max_shift, max_shift, max_shift, max_shift))
    offsets = torch.randint(
        0, 2 * max_shift + 1, (2, batch), device=images.device, generator=generator
    )  # offset into the padded image; max_shift means "no shift"
    rows = torch.arange(height, device=images.device) + offsets[0, :, None]  # [B, H]
    cols = torch.arange(width, device=images.device) + offsets[1, :, None]  # [B, W]
    index = torch.arange(batch, device=images.device)[:, None, None]
    shifted = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return shifted.permute(0, 3, 1, 2).contiguous()

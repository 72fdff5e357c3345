"""Four digits in a 2x2 grid: the input of the encoder-decoder digit-sequence model."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from fastvision.data.base import ImageTensorDataset

# Label order in the target vector; the model reads the grid in this order.
GRID_POSITIONS = ("top_left", "top_right", "bottom_left", "bottom_right")


class StackedDigits(Dataset):
    """Grids of 4 digits drawn (with replacement) from ``digits``; 28x28 digits give 56x56 grids.

    Item ``i`` is ``(image [C, 2H, 2W] float32, labels [4] int64)`` with labels in
    ``GRID_POSITIONS`` order. Which digits go into which grid is fixed by ``seed`` and stored as an
    index table, so only ``4 * num_samples`` integers are kept and images are composed on access.
    """

    def __init__(
        self, digits: ImageTensorDataset, num_samples: int, seed: int = 0, describe: str | None = None
    ):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.digits = digits
        generator = torch.Generator().manual_seed(seed)
        self.indices = torch.randint(len(digits), (num_samples, 4), generator=generator)
        self.seed = seed
        self.describe = describe or (
            f"{num_samples} 2x2 grids (seed {seed}) of digits from: {getattr(digits, 'describe', 'digits')}"
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        tl, tr, bl, br = (self.digits[int(i)] for i in self.indices[index])
        top = torch.cat([tl[0], tr[0]], dim=-1)
        bottom = torch.cat([bl[0], br[0]], dim=-1)
        image = torch.cat([top, bottom], dim=-2)
        labels = torch.stack([tl[1], tr[1], bl[1], br[1]])
        return image, labels

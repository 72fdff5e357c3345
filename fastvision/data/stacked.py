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
    ``pool`` (digit indices) restricts the draw to those digits; :meth:`split_holdout` uses it.
    """

    def __init__(
        self,
        digits: ImageTensorDataset,
        num_samples: int,
        seed: int = 0,
        describe: str | None = None,
        pool: torch.Tensor | None = None,
    ):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if pool is not None and (pool.dim() != 1 or len(pool) == 0):
            raise ValueError(f"pool must be a non-empty 1-D tensor of digit indices, got {tuple(pool.shape)}")
        self.digits = digits
        self.pool = None if pool is None else pool.long()
        self.seed = seed
        self.indices = self._draw(num_samples, seed)
        self.describe = describe or (
            f"{num_samples} 2x2 grids (seed {seed}) of digits from: {getattr(digits, 'describe', 'digits')}"
        )

    def _draw(self, num_samples: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        size = len(self.digits) if self.pool is None else len(self.pool)
        indices = torch.randint(size, (num_samples, 4), generator=generator)
        return indices if self.pool is None else self.pool[indices]

    def set_epoch(self, epoch: int) -> None:
        """Redraw the layout table for ``epoch``, deterministically from ``(seed, epoch)``.

        Epoch 0 is the constructor's draw. A fixed table of ``n`` grids uses each digit about
        ``4n / len(pool)`` times and never shows some of them; redrawing every epoch (the trainer's
        ``redraw_each_epoch``) puts every digit in fresh company at the same cost per epoch.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        seed = self.seed if epoch == 0 else self.seed * 1_000_003 + epoch
        self.indices = self._draw(len(self.indices), seed)

    def split_holdout(self, fraction: float, seed: int = 0) -> tuple[StackedDigits, StackedDigits]:
        """Training and validation grids on disjoint digits: ``fraction`` of the digits (and of the
        grids) go to validation, so no validation digit is ever seen in training. Holding out grids
        alone would reuse the training digits and overstate validation accuracy."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        order = torch.randperm(len(self.digits), generator=torch.Generator().manual_seed(seed))
        n_val_digits = max(1, round(len(order) * fraction))
        num_grids = len(self)
        n_val_grids = max(1, round(num_grids * fraction))
        if n_val_digits >= len(order) or n_val_grids >= num_grids:
            raise ValueError(f"too few digits ({len(order)}) or grids ({num_grids}) to hold out {fraction}")
        base = getattr(self.digits, "describe", "digits")
        train_pool, val_pool = order[n_val_digits:], order[:n_val_digits]
        n_train_grids = num_grids - n_val_grids
        train = StackedDigits(
            self.digits,
            n_train_grids,
            self.seed,
            f"{n_train_grids} 2x2 grids (seed {self.seed}) of {len(train_pool)} digits from: {base}",
            pool=train_pool,
        )
        val = StackedDigits(
            self.digits,
            n_val_grids,
            self.seed + 1,
            f"{n_val_grids} 2x2 grids of {len(val_pool)} held-out digits from: {base}",
            pool=val_pool,
        )
        return train, val

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        tl, tr, bl, br = (self.digits[int(i)] for i in self.indices[index])
        top = torch.cat([tl[0], tr[0]], dim=-1)
        bottom = torch.cat([bl[0], br[0]], dim=-1)
        image = torch.cat([top, bottom], dim=-2)
        labels = torch.stack([tl[1], tr[1], bl[1], br[1]])
        return image, labels

"""Image-quality metrics (per image, on [0, 1] tensors) and a distributed-safe metric accumulator."""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastvision.data.extras import require


def _skimage_metrics():
    return require("skimage.metrics", "the PSNR/SSIM image-quality metrics")


def psnr(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for each image of a ``[B, C, H, W]`` batch (scikit-image)."""
    peak_signal_noise_ratio = _skimage_metrics().peak_signal_noise_ratio
    pred, ref = _as_numpy(prediction), _as_numpy(target)
    values = [peak_signal_noise_ratio(r, p, data_range=data_range) for p, r in zip(pred, ref, strict=True)]
    return torch.tensor(values, dtype=torch.float32, device=prediction.device)


def ssim(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity for each image of a ``[B, C, H, W]`` batch, averaged over channels.

    scikit-image's ``structural_similarity`` with the Gaussian 11x11 window, sigma 1.5 and population
    covariance of Wang et al. (2004), the convention image-restoration papers report.
    """
    structural_similarity = _skimage_metrics().structural_similarity
    pred, ref = _as_numpy(prediction), _as_numpy(target)
    values = [
        structural_similarity(
            p, r, data_range=data_range, channel_axis=0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False,
        )
        for p, r in zip(pred, ref, strict=True)
    ]  # fmt: skip
    return torch.tensor(values, dtype=torch.float32, device=prediction.device)


def _as_numpy(images: torch.Tensor):
    if images.dim() != 4:
        raise ValueError(f"expected a [B, C, H, W] batch, got shape {tuple(images.shape)}")
    return images.detach().float().cpu().numpy().astype("float64")


class MetricTracker:
    """Accumulates per-batch metric *sums* and a sample count; ``compute()`` returns means.

    Summing (instead of averaging batch means) keeps the result exact with a short last batch
    and lets ranks be combined with a single all-reduce.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def update(self, sums: dict[str, torch.Tensor], count: int) -> None:
        for name, value in sums.items():
            value = value.detach().double()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += count

    def all_reduce(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or not self.sums:
            return
        names = sorted(self.sums)
        device = self.sums[names[0]].device
        count = torch.tensor(float(self.count), device=device, dtype=torch.float64)
        packed = torch.stack([self.sums[n].to(device) for n in names] + [count])
        dist.all_reduce(packed)
        self.sums = dict(zip(names, packed[:-1], strict=True))
        self.count = int(packed[-1].item())

    def compute(self) -> dict[str, float]:
        return {name: float(total) / max(1, self.count) for name, total in self.sums.items()}

"""Image-quality metrics (per image, on [0, 1] tensors) and a distributed-safe metric accumulator."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def psnr(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for each image of a ``[B, C, H, W]`` batch."""
    mse = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    kernel_1d = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel_1d = kernel_1d / kernel_1d.sum()
    kernel = kernel_1d[:, None] * kernel_1d[None, :]
    return kernel.expand(channels, 1, size, size).contiguous()


def ssim(
    prediction: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity for each image of a ``[B, C, H, W]`` batch, averaged over channels.

    Gaussian 11x11 window, sigma 1.5, K1=0.01, K2=0.03 (Wang et al. 2004); equal to
    ``skimage.metrics.structural_similarity(..., gaussian_weights=True, use_sample_covariance=False)``.
    Runs on the model's device, unlike a per-image scikit-image loop.
    """
    x, y = prediction.float(), target.float()
    if min(x.shape[-2:]) < window_size:
        size = tuple(x.shape[-2:])
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size}, got {size}")
    channels = x.shape[1]
    window = _gaussian_window(window_size, sigma, channels, x.device, x.dtype)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)  # "valid" filtering = skimage's border crop

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


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

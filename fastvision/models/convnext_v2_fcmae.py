"""ConvNeXt V2 with FCMAE masked pretraining (seed 002), sized for 28x28 images (Fashion-MNIST).

Encoder: a stem (``strides[0]`` x ``strides[0]`` patchify convolution + LayerNorm), then one stage
of ``ConvNeXtV2Block``s per entry of ``dims``, each after a transition (LayerNorm + a convolution
of kernel and stride ``strides[i]``; stride 1 only widens the channels). The default
``strides=(2, 2, 1)`` takes 28x28 to 14x14 (32 channels), 7x7 (64) and 7x7 (128), one block per
stage (``depths=(1, 1, 1)``: sized for CPU training).

FCMAE pretraining, ``model(images, mask)``: ``mask [B, h, w]`` bool (True = masked) marks the
patches of the ``h x w = H/p x W/p`` patch grid, ``p = prod(strides)`` (4: a 7x7 grid of 4x4-pixel
patches). The masked pixels are zeroed at the input, and the mask, resized after each downsampling,
is applied at every stage (after the stem and inside every block: FCMAE dense masking). A light
decoder fills the masked sites with a learned mask token, runs ``decoder_depth`` ConvNeXt V2
blocks, and ``MaskedInpaintingHead`` projects each site to its patch's ``p * p * C`` pixels and
gathers them at the masked patches (``fastvision.ops.masked_gather``). The loss is the mean squared
error on the masked patches' pixels only, optionally against per-patch normalised targets
(``norm_pix_loss``).

Classification, ``model(images)`` (``mask=None``): the same encoder weights run dense, then global
average pooling, LayerNorm and a linear classifier. ``grn=False`` builds the same network without
GRN (the ablation).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastvision.models.registry import exportable_output, image_inputs, register_model
from fastvision.nn import _checks
from fastvision.nn.convnext import ConvNeXtV2Block, LayerNorm2d, resize_mask
from fastvision.nn.heads import MaskedInpaintingHead
from fastvision.ops.masked_gather import masked_gather
from fastvision.profiling.ranges import nvtx_range


@exportable_output
class FCMAEOutput(NamedTuple):
    loss: torch.Tensor  # scalar: MSE over the masked patches' pixels
    prediction: torch.Tensor  # [B, C, H, W]: the decoder's prediction of every pixel
    pixel_mask: torch.Tensor  # [B, H, W] bool: the masked pixels


def _int_tuple(name: str, values) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not values:
        raise TypeError(f"{name} must be a non-empty tuple of ints, got {values!r}")
    return tuple(_checks.positive_int(f"{name}[{i}]", v) for i, v in enumerate(values))


class ConvNeXtV2FCMAE(nn.Module):
    """ConvNeXt V2 encoder with an FCMAE decoder and a classification head (see the module docstring)."""

    tasks = ("classification", "fcmae")  # the training tasks this model's forward serves

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        dims: tuple[int, ...] = (32, 64, 128),
        depths: tuple[int, ...] = (1, 1, 1),
        strides: tuple[int, ...] = (2, 2, 1),
        decoder_dim: int = 64,
        decoder_depth: int = 1,
        kernel_size: int = 7,
        drop_path: float = 0.0,
        grn: bool = True,
        norm_pix_loss: bool = False,
    ):
        super().__init__()
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        self.num_classes = _checks.positive_int("num_classes", num_classes)
        self.image_size = _checks.positive_int("image_size", image_size)
        dims, depths, strides = (
            _int_tuple("dims", dims),
            _int_tuple("depths", depths),
            _int_tuple("strides", strides),
        )
        if not len(dims) == len(depths) == len(strides):
            raise ValueError(
                f"dims, depths and strides must have one entry per stage, got {len(dims)}, {len(depths)}, "
                f"{len(strides)}"
            )
        self.patch_size = math.prod(strides)
        if image_size % self.patch_size:
            raise ValueError(
                f"image_size must be a multiple of the total stride prod(strides) = {self.patch_size}, "
                f"got {image_size}"
            )
        self.grid_size = image_size // self.patch_size
        decoder_dim = _checks.positive_int("decoder_dim", decoder_dim)
        if isinstance(decoder_depth, bool) or not isinstance(decoder_depth, int) or decoder_depth < 0:
            raise ValueError(f"decoder_depth must be an int >= 0, got {decoder_depth!r}")
        _checks.dropout("drop_path", drop_path)
        self.use_grn = _checks.boolean("grn", grn)
        self.norm_pix_loss = _checks.boolean("norm_pix_loss", norm_pix_loss)
        self.dims, self.depths, self.strides = dims, depths, strides

        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(
            nn.Sequential(
                nn.Conv2d(in_channels, dims[0], strides[0], stride=strides[0]), LayerNorm2d(dims[0])
            )
        )
        for i in range(1, len(dims)):
            self.downsample_layers.append(
                nn.Sequential(
                    LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], strides[i], stride=strides[i])
                )
            )
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        start = 0
        for dim, depth in zip(dims, depths, strict=True):
            self.stages.append(
                nn.ModuleList(
                    ConvNeXtV2Block(dim, rates[start + j], kernel_size, grn=grn) for j in range(depth)
                )
            )
            start += depth

        # Classification head (mask=None).
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

        # FCMAE decoder (a mask given).
        self.decoder_proj = nn.Conv2d(dims[-1], decoder_dim, 1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder = nn.ModuleList(
            ConvNeXtV2Block(decoder_dim, 0.0, kernel_size, grn=grn) for _ in range(decoder_depth)
        )
        self.pred = MaskedInpaintingHead(decoder_dim, self.patch_size**2 * in_channels)
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------------------- masks
    def random_mask(
        self, batch: int, ratio: float = 0.6, generator: torch.Generator | None = None, device=None
    ) -> torch.Tensor:
        """A random patch mask ``[batch, grid, grid]`` bool with exactly ``round(ratio * grid**2)``
        masked patches per sample (MAE-style: the lowest of uniform scores are masked)."""
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"ratio must be in (0, 1), got {ratio}")
        patches = self.grid_size**2
        masked = min(patches - 1, max(1, round(ratio * patches)))
        scores = torch.rand(batch, patches, generator=generator)
        ranks = scores.argsort(dim=1).argsort(dim=1)
        return (ranks < masked).view(batch, self.grid_size, self.grid_size).to(device)

    def _check_images(self, images: torch.Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape [B, {', '.join(map(str, expected))}], got {list(images.shape)}"
            )

    # ----------------------------------------------------------------------------------- forward
    def encode(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder features ``[B, dims[-1], h, w]``; with ``mask`` (patch grid), FCMAE dense masking."""
        self._check_images(images)
        x = images
        if mask is not None:
            x = x * (~resize_mask(mask, images.shape[-2:])).unsqueeze(1).to(x.dtype)
        for i, (down, stage) in enumerate(zip(self.downsample_layers, self.stages, strict=True)):
            x = down(x)
            stage_mask = None if mask is None else resize_mask(mask, x.shape[-2:])
            if i == 0 and stage_mask is not None:
                x = x * (~stage_mask).unsqueeze(1).to(x.dtype)
            for block in stage:
                x = block(x, stage_mask)
        return x

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, norm_pix_loss: bool | None = None
    ) -> torch.Tensor | FCMAEOutput:
        """``mask=None``: class logits ``[B, num_classes]``; with a patch mask: ``FCMAEOutput``."""
        if mask is None:
            with nvtx_range("fastvision.ConvNeXtV2.classify"):
                features = self.encode(images)
                return self.head(self.norm(features.mean(dim=(-2, -1))))
        self._check_images(images)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(
                f"mask must be a bool patch mask [B, {self.grid_size}, {self.grid_size}], got {got}"
            )
        expected = [images.shape[0], self.grid_size, self.grid_size]
        if list(mask.shape) != expected:
            raise ValueError(
                f"mask must have the patch-grid shape [B, h, w] = {expected}, got {list(mask.shape)}"
            )
        with nvtx_range("fastvision.ConvNeXtV2.fcmae"):
            return self._fcmae(images, mask, self.norm_pix_loss if norm_pix_loss is None else norm_pix_loss)

    def _fcmae(self, images: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool) -> FCMAEOutput:
        features = self.encode(images, mask)
        x = self.decoder_proj(features)
        hidden = mask.unsqueeze(1).to(x.dtype)
        x = x * (1.0 - hidden) + self.mask_token.to(x.dtype) * hidden
        for block in self.decoder:
            x = block(x)
        # Every patch's slot (M = h * w) fits any mask with no device-to-host synchronization;
        # the slots past a sample's count are invalid and left out of the loss.
        dense, gathered = self.pred(x, mask, max_count=mask.shape[1] * mask.shape[2])
        target = F.pixel_unshuffle(images, self.patch_size)  # [B, p*p*C, h, w], same channel order
        target = masked_gather(target, mask, gathered.values.shape[1]).values
        if norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True, unbiased=False)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (gathered.values.float() - target.float()).square().mean(dim=-1)  # [B, M]
        valid = gathered.valid.to(per_patch.dtype)
        loss = (per_patch * valid).sum() / valid.sum().clamp_min(1.0)
        prediction = F.pixel_shuffle(dense, self.patch_size)
        return FCMAEOutput(loss, prediction, resize_mask(mask, images.shape[-2:]))

    @torch.no_grad()
    def inpaint(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``images`` with the masked patches replaced by the prediction (pixel-space training only)."""
        out = self.forward(images, mask, norm_pix_loss=False)
        keep = (~out.pixel_mask).unsqueeze(1).to(images.dtype)
        return images * keep + out.prediction.to(images.dtype) * (1 - keep)


_TRAIN_DEFAULTS = {
    "epochs": 10,
    "batch_size": 128,
    "lr": 2e-3,
    "weight_decay": 0.05,
    "scheduler": "cosine",
    "warmup_epochs": 1,
    "ema_decay": 0.999,
    "mask_ratio": 0.6,
}


@register_model(
    "convnext_v2_fcmae",
    task="classification",
    dataset="fashion_mnist",
    example_inputs=image_inputs(1, 28),
    description="ConvNeXt V2 (32-64-128, 251k params): FCMAE masked pretraining (task fcmae), classification",
    train_defaults=_TRAIN_DEFAULTS,
)
def convnext_v2_fcmae(**kwargs) -> ConvNeXtV2FCMAE:
    return ConvNeXtV2FCMAE(**kwargs)


@register_model(
    "convnext_v2_fcmae_nogrn",
    task="classification",
    dataset="fashion_mnist",
    example_inputs=image_inputs(1, 28),
    description="convnext_v2_fcmae without GRN (the ablation)",
    train_defaults=_TRAIN_DEFAULTS,
)
def convnext_v2_fcmae_nogrn(**kwargs) -> ConvNeXtV2FCMAE:
    return ConvNeXtV2FCMAE(**{**kwargs, "grn": False})

"""Implicit neural representations of images (seed 004): MAMBA-GINR encoder + SCENT processor/decoder,
and the seed's two comparisons.

Every model maps a 32x32 image to latent tokens once (``encode``) and then decodes RGB at any continuous
query coordinates (``decode``): pixel centres in ``[-1, 1]`` (``fastvision.nn.inr.coordinate_grid``), so
one encoding renders at 32x32 (reconstruction) or at 128x128 and 256x256 (super-resolution).

* ``mamba_ginr_scent`` (the seed's hybrid): 2x2 patches -> 256 patch tokens, concatenated with 256
  learnable position (LP) tokens, one pre-norm residual BiMamba layer over the 512 tokens, the last 256
  kept as latents ``[B, 256, 256]``; a SCENT processor of 4 self-attention blocks (8 heads x 64, GEGLU
  x4); the SCENT decoder: Gaussian Fourier features of the query coordinates projected to 512, cross-
  attention to the latents, 3 stacked pre-norm GEGLU feed-forwards (512 -> 2048 -> 512), a skip that
  adds the projected Fourier encoding back, and a projection to RGB.
* ``mamba_ginr``: the same BiMamba + LP-token encoder with a light decoder and no processor: Fourier
  features, a one-head cross-attention to the latents, and 3 residual ReLU MLP blocks of width 256
  (a stand-in for MAMBA-GINR's LAINR decoder of residual blocks).
* ``scent``: a Perceiver-style encoder (256 learnable latents cross-attending once to the 256 patch
  tokens with learned positions, then a GEGLU feed-forward), then the hybrid's processor and decoder.

The ``*_small`` variants are the same architectures with fewer and narrower tokens (4x4 patches, 64 patch
and 64 latent tokens, width 128, decoder width 256), sized to train on a CPU while the selective scan runs
its reference loop; they are what ``bench/results/training/inr/`` reports.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from fastvision.models.registry import image_inputs, register_model
from fastvision.nn import _checks
from fastvision.nn.inr import (
    CrossAttention,
    FeedForwardBlock,
    GaussianFourierFeatures,
    SelfAttentionBlock,
    coordinate_grid,
)
from fastvision.nn.mamba import BiMamba
from fastvision.profiling.ranges import nvtx_range


class PatchTokens(nn.Module):
    """``[B, C, H, W] -> [B, (H / p) * (W / p), dim]`` by a ``p x p`` strided convolution."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.image_size = _checks.positive_int("image_size", image_size)
        self.patch_size = _checks.positive_int("patch_size", patch_size)
        self.in_channels = _checks.positive_int("in_channels", in_channels)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size must be a multiple of patch_size, got image_size={image_size}, "
                f"patch_size={patch_size}"
            )
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.proj = nn.Conv2d(
            self.in_channels, _checks.positive_int("dim", dim), patch_size, stride=patch_size
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape [batch, {', '.join(map(str, expected))}], got {tuple(images.shape)}"
            )
        return self.proj(images).flatten(2).transpose(1, 2)


class BiMambaEncoder(nn.Module):
    """MAMBA-GINR's encoder: patch tokens then learnable position (LP) tokens, ``depth`` pre-norm residual
    BiMamba layers over the concatenation, the LP tokens' outputs (the last ``num_latents``) as latents."""

    def __init__(self, image_size, patch_size, in_channels, dim, num_latents, depth, d_state, d_conv, expand):
        super().__init__()
        self.patches = PatchTokens(image_size, patch_size, in_channels, dim)
        self.num_latents = _checks.positive_int("num_latents", num_latents)
        self.lp_tokens = nn.Parameter(torch.zeros(self.num_latents, dim))
        nn.init.trunc_normal_(self.lp_tokens, std=0.02)
        depth = _checks.positive_int("encoder_depth", depth)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.layers = nn.ModuleList(BiMamba(dim, d_state, d_conv, expand) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(images)
        x = torch.cat((tokens, self.lp_tokens.expand(tokens.shape[0], -1, -1).to(tokens.dtype)), dim=1)
        for norm, layer in zip(self.norms, self.layers, strict=True):
            x = x + layer(norm(x))
        return self.norm_out(x[:, -self.num_latents :])


class PerceiverEncoder(nn.Module):
    """SCENT-style encoder: learnable latents cross-attend to patch tokens (with learned positions),
    then a pre-norm GEGLU feed-forward: ``[B, C, H, W] -> [B, num_latents, dim]``."""

    def __init__(self, image_size, patch_size, in_channels, dim, num_latents, cross_heads, cross_dim_head,
                 ff_mult):  # fmt: skip
        super().__init__()
        self.patches = PatchTokens(image_size, patch_size, in_channels, dim)
        self.pos = nn.Parameter(torch.zeros(self.patches.num_patches, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.latents = nn.Parameter(torch.zeros(_checks.positive_int("num_latents", num_latents), dim))
        nn.init.trunc_normal_(self.latents, std=0.02)
        self.cross = CrossAttention(dim, dim, cross_heads, cross_dim_head)
        self.ff = FeedForwardBlock(dim, ff_mult)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        context = self.patches(images) + self.pos
        latents = self.latents.expand(images.shape[0], -1, -1).to(context.dtype)
        latents = latents + self.cross(latents, context)
        return self.ff(latents)


class LatentProcessor(nn.Module):
    """SCENT's processor: ``depth`` pre-norm self-attention blocks (SDPA, GEGLU FF), then LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        depth = _checks.positive_int("processor_depth", depth)
        self.blocks = nn.ModuleList(SelfAttentionBlock(dim, heads, dim_head, ff_mult) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            latents = block(latents)
        return self.norm(latents)


class SCENTDecoder(nn.Module):
    """Queries ``[B, Q, 2]`` + latents ``[B, M, dim]`` -> ``[B, Q, out_channels]``.

    ``q0 = Linear(fourier(coords))``; ``x = q0 + cross_attention(q0, latents)``; ``depth`` pre-norm GEGLU
    feed-forwards; the skip ``x + q0``; LayerNorm and a projection to the output channels.
    """

    def __init__(self, latent_dim, decoder_dim, fourier_features, fourier_scale, cross_heads, cross_dim_head,
                 depth, ff_mult, out_channels):  # fmt: skip
        super().__init__()
        decoder_dim = _checks.positive_int("decoder_dim", decoder_dim)
        self.fourier = GaussianFourierFeatures(2, fourier_features, fourier_scale)
        self.query_proj = nn.Linear(self.fourier.out_dim, decoder_dim)
        self.cross = CrossAttention(decoder_dim, latent_dim, cross_heads, cross_dim_head)
        depth = _checks.positive_int("decoder_depth", depth)
        self.blocks = nn.ModuleList(FeedForwardBlock(decoder_dim, ff_mult) for _ in range(depth))
        self.norm = nn.LayerNorm(decoder_dim)
        self.to_out = nn.Linear(decoder_dim, _checks.positive_int("out_channels", out_channels))

    def forward(self, coords: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        q0 = self.query_proj(self.fourier(coords))
        x = q0 + self.cross(q0, latents)
        for block in self.blocks:
            x = block(x)
        return self.to_out(self.norm(x + q0))


class ResidualBlock(nn.Module):
    """``x + Linear(relu(Linear(relu(x))))``: the residual MLP block of a light INR decoder."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ResidualINRDecoder(nn.Module):
    """MAMBA-GINR's light decoder: Fourier features -> Linear, plus a one-head cross-attention to the
    latents (the modulation), ``depth`` residual ReLU blocks, a projection to the output channels."""

    def __init__(self, latent_dim, hidden, fourier_features, fourier_scale, dim_head, depth, out_channels):
        super().__init__()
        hidden = _checks.positive_int("decoder_dim", hidden)
        self.fourier = GaussianFourierFeatures(2, fourier_features, fourier_scale)
        self.query_proj = nn.Linear(self.fourier.out_dim, hidden)
        self.cross = CrossAttention(hidden, latent_dim, 1, dim_head)
        depth = _checks.positive_int("decoder_depth", depth)
        self.blocks = nn.Sequential(*(ResidualBlock(hidden) for _ in range(depth)))
        self.to_out = nn.Sequential(
            nn.ReLU(), nn.Linear(hidden, _checks.positive_int("out_channels", out_channels))
        )

    def forward(self, coords: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        q0 = self.query_proj(self.fourier(coords))
        return self.to_out(self.blocks(q0 + self.cross(q0, latents)))


class ImplicitImageModel(nn.Module):
    """An encoder to latents, an optional processor, and a coordinate decoder.

    * ``encode(images [B, C, S, S]) -> latents [B, M, dim]`` (encoder, then processor);
    * ``decode(latents, coords [B, Q, 2] or [Q, 2]) -> [B, Q, C]`` at continuous coordinates in ``[-1, 1]``;
    * ``forward(images, coords=None)``: ``decode(encode(images), coords)``; with ``coords=None`` the
      image's own pixel grid, returned as ``[B, C, S, S]``;
    * ``render(images, size, chunk=16384) -> [B, C, size, size]``: decode a ``size x size`` grid, at most
      ``chunk`` queries per image at a time (memory stays bounded at 256x256 and beyond).
    """

    tasks = ("inr",)

    def __init__(self, encoder: nn.Module, processor: nn.Module | None, decoder: nn.Module, image_size: int,
                 in_channels: int):  # fmt: skip
        super().__init__()
        self.encoder, self.processor, self.decoder = encoder, processor, decoder
        self.image_size, self.in_channels = image_size, in_channels

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        latents = self.encoder(images)
        return latents if self.processor is None else self.processor(latents)

    def decode(self, latents: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        if coords.dim() == 2:
            coords = coords.unsqueeze(0).expand(latents.shape[0], -1, -1)
        if coords.dim() != 3 or coords.shape[-1] != 2 or coords.shape[0] != latents.shape[0]:
            raise ValueError(
                f"coords must have shape [Q, 2] or [{latents.shape[0]}, Q, 2], got {tuple(coords.shape)}"
            )
        return self.decoder(coords.to(latents.dtype), latents)

    def forward(self, images: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        with nvtx_range(f"fastvision.{type(self).__name__}"):
            latents = self.encode(images)
            if coords is not None:
                return self.decode(latents, coords)
            size = images.shape[-1]
            grid = coordinate_grid(size, size, device=images.device)
            return self.decode(latents, grid).transpose(1, 2).reshape(images.shape[0], -1, size, size)

    def render(self, images: torch.Tensor, size: int, chunk: int = 16384) -> torch.Tensor:
        size, chunk = _checks.positive_int("size", size), _checks.positive_int("chunk", chunk)
        latents = self.encode(images)
        grid = coordinate_grid(size, size, device=images.device)
        parts = [self.decode(latents, grid[i : i + chunk]) for i in range(0, grid.shape[0], chunk)]
        return torch.cat(parts, dim=1).transpose(1, 2).reshape(images.shape[0], -1, size, size)


def _common(image_size, patch_size, in_channels):
    return (
        _checks.positive_int("image_size", image_size),
        _checks.positive_int("patch_size", patch_size),
        _checks.positive_int("in_channels", in_channels),
    )


class MambaGINRSCENT(ImplicitImageModel):
    """The seed's hybrid: BiMamba + LP-token encoder, SCENT processor, SCENT decoder."""

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 3,
        dim: int = 256,
        num_latents: int = 256,
        encoder_depth: int = 1,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        processor_depth: int = 4,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        decoder_dim: int = 512,
        decoder_depth: int = 3,
        fourier_features: int = 256,
        fourier_scale: float = 10.0,
        cross_heads: int = 2,
        cross_dim_head: int = 64,
    ):
        image_size, patch_size, in_channels = _common(image_size, patch_size, in_channels)
        encoder = BiMambaEncoder(
            image_size, patch_size, in_channels, dim, num_latents, encoder_depth, d_state, d_conv, expand
        )
        processor = LatentProcessor(dim, processor_depth, heads, dim_head, ff_mult)
        decoder = SCENTDecoder(dim, decoder_dim, fourier_features, fourier_scale, cross_heads, cross_dim_head,
                               decoder_depth, ff_mult, in_channels)  # fmt: skip
        super().__init__(encoder, processor, decoder, image_size, in_channels)


class MambaGINR(ImplicitImageModel):
    """MAMBA-GINR: BiMamba + LP-token encoder, no processor, a light residual-block decoder."""

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 3,
        dim: int = 256,
        num_latents: int = 256,
        encoder_depth: int = 1,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        decoder_dim: int = 256,
        decoder_depth: int = 3,
        fourier_features: int = 128,
        fourier_scale: float = 10.0,
        cross_dim_head: int = 64,
    ):
        image_size, patch_size, in_channels = _common(image_size, patch_size, in_channels)
        encoder = BiMambaEncoder(
            image_size, patch_size, in_channels, dim, num_latents, encoder_depth, d_state, d_conv, expand
        )
        decoder = ResidualINRDecoder(dim, decoder_dim, fourier_features, fourier_scale, cross_dim_head,
                                     decoder_depth, in_channels)  # fmt: skip
        super().__init__(encoder, None, decoder, image_size, in_channels)


class SCENT(ImplicitImageModel):
    """SCENT: Perceiver-style cross-attention encoder into learnable latents, processor, decoder."""

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 3,
        dim: int = 256,
        num_latents: int = 256,
        encoder_heads: int = 1,
        encoder_dim_head: int = 64,
        processor_depth: int = 4,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        decoder_dim: int = 512,
        decoder_depth: int = 3,
        fourier_features: int = 256,
        fourier_scale: float = 10.0,
        cross_heads: int = 2,
        cross_dim_head: int = 64,
    ):
        image_size, patch_size, in_channels = _common(image_size, patch_size, in_channels)
        encoder = PerceiverEncoder(image_size, patch_size, in_channels, dim, num_latents, encoder_heads,
                                   encoder_dim_head, ff_mult)  # fmt: skip
        processor = LatentProcessor(dim, processor_depth, heads, dim_head, ff_mult)
        decoder = SCENTDecoder(dim, decoder_dim, fourier_features, fourier_scale, cross_heads, cross_dim_head,
                               decoder_depth, ff_mult, in_channels)  # fmt: skip
        super().__init__(encoder, processor, decoder, image_size, in_channels)


# The CPU-sized configuration shared by the three *_small variants (same architectures, fewer and narrower
# tokens): 4x4 patches (64 patch tokens, 64 latents), width 128, 4 heads x 32, decoder width 256.
SMALL = {"patch_size": 4, "dim": 128, "num_latents": 64, "decoder_dim": 256, "fourier_features": 128}
SMALL_PROCESSOR = {"heads": 4, "dim_head": 32, "cross_dim_head": 32}

INR_DEFAULTS = {
    "epochs": 20,
    "batch_size": 32,
    "optimizer": "adamw",
    "lr": 5e-4,
    "weight_decay": 1e-4,
    "scheduler": "cosine",
    "warmup_epochs": 1.0,
    "grad_clip": 1.0,
    "ema_decay": 0.0,
}


def _register(name: str, cls: type[ImplicitImageModel], description: str, **fixed) -> None:
    def build(**kwargs) -> ImplicitImageModel:
        return cls(**{**fixed, **kwargs})

    build.__name__ = name
    size = fixed.get("image_size", inspect.signature(cls).parameters["image_size"].default)
    register_model(
        name,
        task="inr",
        dataset="photos",
        description=description,
        train_defaults=INR_DEFAULTS,
        example_inputs=image_inputs(3, size),
    )(build)


_register(
    "mamba_ginr_scent", MambaGINRSCENT, "MAMBA-GINR encoder (BiMamba + LP tokens) + SCENT processor/decoder"
)
_register("mamba_ginr", MambaGINR, "MAMBA-GINR: BiMamba + LP-token encoder, light residual-block decoder")
_register("scent", SCENT, "SCENT: Perceiver cross-attention encoder, self-attention processor, SCENT decoder")
_register("mamba_ginr_scent_small", MambaGINRSCENT, "mamba_ginr_scent, CPU-sized", **SMALL, **SMALL_PROCESSOR)
_register(
    "mamba_ginr_small", MambaGINR, "mamba_ginr, CPU-sized",
    **{**SMALL, "decoder_dim": 128, "fourier_features": 64}, cross_dim_head=32,
)  # fmt: skip
_register("scent_small", SCENT, "scent, CPU-sized", **SMALL, **SMALL_PROCESSOR, encoder_dim_head=32)

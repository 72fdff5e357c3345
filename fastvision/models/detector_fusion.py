"""The multi-face detector model of seed 002, on the simulated detector of ``fastvision.data.detector``.

Input: one event's counts ``[B, S]`` in the detector's flat sensor order, the live-sensor map
``[B, S]`` (False: dead) and, for masked pretraining, the hidden sensors ``[B, S]``. Each sensor
becomes two features: ``log1p(count) / 4`` and a 0/1 "observed" flag (zero, and flag 0, for dead
or hidden sensors).

* Rectangular faces (inner 93x44, outer, upstream, downstream): one ConvNeXt V2 branch each
  (weights not shared: the sizes differ). The face is padded to a multiple of the total stride
  (padding counts as hidden); a 2x2 patchify stem, then per stage ``ConvNeXtV2Block``s with FCMAE
  dense masking (a site is hidden when every sensor under it is), a 2x2 strided downsample between
  stages. The face's token is the masked mean of the last stage's visible sites, LayerNorm, Linear.
* Hexagonal faces (top, bottom): one graph-attention branch shared by both (the same lattice):
  node features plus Gaussian Fourier features of the node's position, ``GraphAttentionBlock``s
  over the lattice graph with hidden nodes left out as keys, and a masked-mean token.
* Fusion: the six tokens (``token_dim``, 1024 by default) plus a learnable face embedding, two
  pre-norm transformer blocks (``SelfAttentionBlock``), LayerNorm.
* Regression ``model(counts, live)``: the mean of the fused tokens goes to a
  ``HeteroscedasticHead`` (separate mean and log-variance networks) predicting the standardised
  ``(E, x, y, z)`` (``Detector.target_scale``); ``regression_loss`` is MSE, β-NLL (β = 0.5) or the
  faithful loss, chosen by ``loss``. With ``variance_stop_gradient`` (the default for the faithful
  loss) the variance network reads the fused representation through a stop-gradient, as in Stirn
  et al.: the encoder is trained by the mean's loss alone.
* Inpainting ``model(counts, live, hidden)``: per face, a decoder joins the upsampled last stage,
  the first stage and the face's fused token, runs one dense ConvNeXt V2 block and predicts each
  sensor's mean count and log-variance (in units of ``count_scale`` photoelectrons); the
  predictions at the hidden sensors are gathered with ``fastvision.ops.masked_gather`` (the
  hexagonal faces as a ``1 x N`` grid of nodes). The loss (same family as ``loss``) covers the
  hidden sensors only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastvision.data.detector import FACE_NAMES, Detector, HexFace, RectFace
from fastvision.models.registry import exportable_output, register_model
from fastvision.nn import _checks
from fastvision.nn.convnext import ConvNeXtV2Block, LayerNorm2d
from fastvision.nn.graph import GraphAttentionBlock
from fastvision.nn.heads import HeteroscedasticHead
from fastvision.nn.inr import GaussianFourierFeatures, SelfAttentionBlock
from fastvision.nn.losses import beta_nll_loss, faithful_nll_loss
from fastvision.nn.positional import LearnablePositionalEncoding
from fastvision.ops.masked_gather import masked_gather

LOSSES = ("mse", "beta_nll", "faithful")


@exportable_output
class RegressionOutput(NamedTuple):
    mu: torch.Tensor  # [B, 4] standardised (E, x, y, z)
    log_var: torch.Tensor  # [B, 4] log-variance of the standardised targets


@exportable_output
class InpaintOutput(NamedTuple):
    loss: torch.Tensor  # scalar, over the hidden sensors
    mean: torch.Tensor  # [B, S] predicted mean count (photoelectrons) of every sensor
    log_var: torch.Tensor  # [B, S] predicted log-variance of the count (photoelectrons^2)
    hidden: torch.Tensor  # [B, S] bool: the sensors the loss covered


def _int_tuple(name: str, values) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not values:
        raise TypeError(f"{name} must be a non-empty tuple of ints, got {values!r}")
    return tuple(_checks.positive_int(f"{name}[{i}]", v) for i, v in enumerate(values))


def _masked_mean(x: torch.Tensor, visible: torch.Tensor, dim) -> torch.Tensor:
    w = visible.to(x.dtype)
    return (x * w).sum(dim) / w.sum(dim).clamp_min(1.0)


def heteroscedastic_loss(kind: str, y: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor, beta: float):
    """The loss family of the model: MSE of ``mu`` (``log_var`` unused), β-NLL or faithful NLL."""
    if kind == "mse":
        return F.mse_loss(mu, y)
    if kind == "beta_nll":
        return beta_nll_loss(y, mu, log_var, beta)
    return faithful_nll_loss(y, mu, log_var)


class RectFaceBranch(nn.Module):
    """ConvNeXt V2 encoder of one rectangular face and its inpainting decoder (module docstring)."""

    def __init__(self, shape, dims, depths, kernel_size, token_dim, decoder_dim, drop_path):
        super().__init__()
        self.shape = tuple(shape)
        self.stride = 2 ** len(dims)
        self.padded = tuple(math.ceil(s / self.stride) * self.stride for s in self.shape)
        self.stem = nn.Sequential(nn.Conv2d(2, dims[0], 2, stride=2), LayerNorm2d(dims[0]))
        self.downs = nn.ModuleList(
            nn.Sequential(LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dims[i], 2, stride=2))
            for i in range(1, len(dims))
        )
        self.stages = nn.ModuleList(
            nn.ModuleList(ConvNeXtV2Block(d, drop_path, kernel_size) for _ in range(n))
            for d, n in zip(dims, depths, strict=True)
        )
        self.token = nn.Sequential(nn.LayerNorm(dims[-1]), nn.Linear(dims[-1], token_dim))
        self.dec_last = nn.Conv2d(dims[-1], decoder_dim, 1)
        self.dec_first = nn.Conv2d(dims[0], decoder_dim, 1)
        self.dec_token = nn.Linear(token_dim, decoder_dim)
        self.dec_block = ConvNeXtV2Block(decoder_dim, 0.0, kernel_size)
        self.dec_out = nn.Conv2d(decoder_dim, 2 * 4, 1)  # (mean, log_var) of each sensor of a 2x2 patch

    def _pad(self, x: torch.Tensor, value: float) -> torch.Tensor:
        ph, pw = self.padded[0] - self.shape[0], self.padded[1] - self.shape[1]
        return F.pad(x, (0, pw, 0, ph), value=value)

    def encode(self, feats: torch.Tensor, visible: torch.Tensor):
        """``feats [B, 2, H, W]``, ``visible [B, H, W]`` -> (token [B, token_dim], first, last features)."""
        x = self._pad(feats, 0.0)
        vis = self._pad(visible.to(feats.dtype), 0.0)[:, None]
        first = None
        for i, stage in enumerate(self.stages):
            x = self.stem(x) if i == 0 else self.downs[i - 1](x)
            vis = F.max_pool2d(vis, 2)  # a site is visible when any sensor under it is
            hidden = vis[:, 0] < 0.5
            x = x * vis
            for block in stage:
                x = block(x, hidden)
            if i == 0:
                first = x
        token = self.token(_masked_mean(x, vis, (-2, -1)))
        return token, first, x

    def decode(self, token: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Per-sensor ``[B, 2, H, W]`` (mean, log_var) predictions."""
        up = F.interpolate(self.dec_last(last), size=first.shape[-2:], mode="nearest")
        x = up + self.dec_first(first) + self.dec_token(token)[:, :, None, None]
        x = F.pixel_shuffle(self.dec_out(self.dec_block(x)), 2)
        return x[:, :, : self.shape[0], : self.shape[1]]


class HexFaceBranch(nn.Module):
    """Graph-attention encoder of a hexagonal face and its node inpainting decoder."""

    def __init__(self, face: HexFace, dim, depth, heads, token_dim, decoder_dim):
        super().__init__()
        pos = face.positions.to(torch.float32)
        pos = (pos - pos.mean(0)) / pos.std(0).clamp_min(1e-6)
        self.register_buffer("positions", pos, persistent=False)
        self.fourier = GaussianFourierFeatures(2, 16, scale=0.5)
        self.embed = nn.Linear(2 + self.fourier.out_dim, dim)
        adjacency = face.adjacency()
        self.blocks = nn.ModuleList(GraphAttentionBlock(dim, adjacency, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.token = nn.Linear(dim, token_dim)
        self.dec_token = nn.Linear(token_dim, dim)
        self.dec = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, decoder_dim), nn.GELU(), nn.Linear(decoder_dim, 2)
        )

    def encode(self, feats: torch.Tensor, visible: torch.Tensor):
        """``feats [B, N, 2]``, ``visible [B, N]`` -> (token, node features)."""
        b = feats.shape[0]
        pe = self.fourier(self.positions).to(feats.dtype).expand(b, -1, -1)
        x = self.embed(torch.cat([feats, pe], dim=-1))
        hidden = ~visible
        for block in self.blocks:
            x = block(x, hidden)
        x = self.norm(x)
        return self.token(_masked_mean(x, visible[..., None], 1)), x

    def decode(self, token: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """Per-node ``[B, 2, 1, N]`` (mean, log_var) predictions, laid out as a one-row grid."""
        out = self.dec(nodes + self.dec_token(token)[:, None])  # [B, N, 2]
        return out.transpose(1, 2)[:, :, None, :]


class DetectorFusion(nn.Module):
    """ConvNeXt V2 face branches + graph attention + transformer fusion (module docstring)."""

    tasks = ("detector_regression", "detector_pretrain")

    def __init__(
        self,
        detector: Detector | None = None,
        dims: tuple[int, ...] = (32, 64, 128),
        depths: tuple[int, ...] = (1, 1, 2),
        kernel_size: int = 5,
        hex_dim: int = 64,
        hex_depth: int = 2,
        token_dim: int = 1024,
        fusion_heads: int = 8,
        fusion_depth: int = 2,
        decoder_dim: int = 64,
        head_hidden: int | None = 256,
        loss: str = "faithful",
        beta: float = 0.5,
        count_scale: float = 10.0,
        drop_path: float = 0.0,
        variance_stop_gradient: bool | None = None,
    ):
        super().__init__()
        if detector is not None and not isinstance(detector, Detector):
            raise TypeError(
                f"detector must be a fastvision.data.detector.Detector, got {type(detector).__name__}"
            )
        self.detector = detector if detector is not None else Detector()
        dims, depths = _int_tuple("dims", dims), _int_tuple("depths", depths)
        if len(dims) != len(depths):
            raise ValueError(
                f"dims and depths must have one entry per stage, got {len(dims)} and {len(depths)}"
            )
        kernel_size = _checks.positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        hex_dim = _checks.positive_int("hex_dim", hex_dim)
        hex_depth = _checks.positive_int("hex_depth", hex_depth)
        self.token_dim = _checks.positive_int("token_dim", token_dim)
        fusion_heads = _checks.positive_int("fusion_heads", fusion_heads)
        _checks.heads_divide(token_dim, fusion_heads)
        fusion_depth = _checks.positive_int("fusion_depth", fusion_depth)
        decoder_dim = _checks.positive_int("decoder_dim", decoder_dim)
        head_hidden = None if head_hidden is None else _checks.positive_int("head_hidden", head_hidden)
        self.loss_kind = _checks.choice("loss", loss, LOSSES)
        self.beta = _checks.real("beta", beta)
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.count_scale = _checks.positive_float("count_scale", count_scale)
        if variance_stop_gradient is None:
            variance_stop_gradient = self.loss_kind == "faithful"
        self.variance_stop_gradient = _checks.boolean("variance_stop_gradient", variance_stop_gradient)
        _checks.dropout("drop_path", drop_path)
        hex_heads = 4 if hex_dim % 4 == 0 else 1

        det = self.detector
        self.num_sensors = det.num_sensors
        self.face_slices = det.face_slices
        self.rect = nn.ModuleDict(
            {
                name: RectFaceBranch(
                    det.faces[name].shape, dims, depths, kernel_size, token_dim, decoder_dim, drop_path
                )
                for name in FACE_NAMES
                if isinstance(det.faces[name], RectFace)
            }
        )
        hex_faces = [name for name in FACE_NAMES if isinstance(det.faces[name], HexFace)]
        self.hex_names = tuple(hex_faces)
        self.hex = HexFaceBranch(
            det.faces[hex_faces[0]], hex_dim, hex_depth, hex_heads, token_dim, decoder_dim
        )
        self.face_embed = LearnablePositionalEncoding(len(FACE_NAMES), token_dim)
        self.fusion = nn.ModuleList(
            SelfAttentionBlock(token_dim, fusion_heads, token_dim // fusion_heads)
            for _ in range(fusion_depth)
        )
        self.fusion_norm = nn.LayerNorm(token_dim)
        self.head = HeteroscedasticHead(token_dim, 4, head_hidden)
        offset, scale = det.target_scale()
        self.register_buffer("target_offset", offset, persistent=False)
        self.register_buffer("target_scale", scale, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # --------------------------------------------------------------------------------- helpers
    def standardize(self, params: torch.Tensor) -> torch.Tensor:
        """Event parameters ``[B, 4]`` (MeV, cm) -> the standardised regression targets."""
        return (params - self.target_offset) / self.target_scale

    def destandardize(self, mu: torch.Tensor, log_var: torch.Tensor | None = None):
        """Standardised ``mu`` (and ``log_var``) -> physical units (and the standard deviation)."""
        out = mu * self.target_scale + self.target_offset
        if log_var is None:
            return out
        return out, torch.exp(0.5 * log_var) * self.target_scale

    def random_mask(
        self, live: torch.Tensor, ratio: float = 0.6, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """FCMAE mask ``[B, S]``: ``round(ratio * live)`` of each face's live sensors, per event."""
        if not 0.0 < float(ratio) < 1.0:
            raise ValueError(f"ratio must be in (0, 1), got {ratio}")
        scores = torch.rand(live.shape, generator=generator).to(live.device)
        scores = scores.masked_fill(~live, 2.0)
        mask = torch.zeros_like(live)
        for sl in self.face_slices.values():
            n_live = live[:, sl].sum(1, keepdim=True)
            k = (n_live.to(torch.float32) * ratio).round().clamp(min=1).to(torch.long)
            k = torch.minimum(k, (n_live - 1).clamp_min(0))
            ranks = scores[:, sl].argsort(dim=1).argsort(dim=1)
            mask[:, sl] = ranks < k
        return mask

    def _check_inputs(self, counts, live, hidden):
        if not isinstance(counts, torch.Tensor) or not counts.is_floating_point():
            raise TypeError("counts must be a floating-point tensor [B, S]")
        if counts.dim() != 2 or counts.shape[1] != self.num_sensors:
            raise ValueError(f"counts must have shape [B, {self.num_sensors}], got {list(counts.shape)}")
        for name, m in (("live", live), ("hidden", hidden)):
            if m is None:
                continue
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise TypeError(f"{name} must be a bool tensor [B, S]")
            if tuple(m.shape) != tuple(counts.shape):
                raise ValueError(f"{name} must have shape {list(counts.shape)}, got {list(m.shape)}")

    # --------------------------------------------------------------------------------- forward
    def _encode(self, counts: torch.Tensor, visible: torch.Tensor):
        feats = torch.stack([torch.log1p(counts.clamp_min(0.0)) / 4.0, visible.to(counts.dtype)], dim=1)
        feats = feats * visible[:, None].to(counts.dtype)
        tokens, cache = [], {}
        for name in FACE_NAMES:
            sl = self.face_slices[name]
            if name in self.rect:
                h, w = self.detector.faces[name].shape
                token, first, last = self.rect[name].encode(
                    feats[:, :, sl].unflatten(2, (h, w)), visible[:, sl].unflatten(1, (h, w))
                )
                cache[name] = (first, last)
            else:
                token, nodes = self.hex.encode(feats[:, :, sl].transpose(1, 2), visible[:, sl])
                cache[name] = (nodes,)
            tokens.append(token)
        x = self.face_embed(torch.stack(tokens, dim=1))
        for block in self.fusion:
            x = block(x)
        return self.fusion_norm(x), cache

    def forward(
        self, counts: torch.Tensor, live: torch.Tensor | None = None, hidden: torch.Tensor | None = None
    ) -> RegressionOutput | InpaintOutput:
        """``hidden=None``: ``RegressionOutput``; else masked-sensor inpainting, ``InpaintOutput``."""
        self._check_inputs(counts, live, hidden)
        if live is None:
            live = torch.ones_like(counts, dtype=torch.bool)
        visible = live if hidden is None else live & ~hidden
        tokens, cache = self._encode(counts, visible)
        if hidden is None:
            pooled = tokens.mean(dim=1)
            # Faithful regression (Stirn et al.): the variance network reads the shared
            # representation through a stop-gradient, so only the mean's loss shapes the encoder.
            var_in = pooled.detach() if self.variance_stop_gradient else pooled
            return RegressionOutput(self.head.mean(pooled), self.head.log_var(var_in))
        return self._inpaint(counts, tokens, cache, hidden & live)

    def regression_loss(self, out: RegressionOutput, params: torch.Tensor) -> torch.Tensor:
        return heteroscedastic_loss(self.loss_kind, self.standardize(params), out.mu, out.log_var, self.beta)

    def _inpaint(self, counts, tokens, cache, hidden) -> InpaintOutput:
        preds, losses_in = [], []
        target = (counts / self.count_scale)[:, None]  # [B, 1, S]
        for i, name in enumerate(FACE_NAMES):
            sl = self.face_slices[name]
            if name in self.rect:
                h, w = self.detector.faces[name].shape
                dense = self.rect[name].decode(tokens[:, i], *cache[name])  # [B, 2, h, w]
                grid = (h, w)
            else:
                dense = self.hex.decode(tokens[:, i], *cache[name])  # [B, 2, 1, N]
                grid = (1, sl.stop - sl.start)
            mask = hidden[:, sl].unflatten(1, grid)
            slots = grid[0] * grid[1]  # every sensor's slot: no device-to-host synchronization
            got = masked_gather(dense.contiguous(), mask, slots)
            want = masked_gather(target[:, :, sl].unflatten(2, grid).contiguous(), mask, slots)
            losses_in.append((got.values[got.valid], want.values[got.valid]))
            preds.append(dense.flatten(2))
        values = torch.cat([g for g, _ in losses_in])  # [K, 2]
        wanted = torch.cat([t for _, t in losses_in])[:, 0]
        if values.shape[0] == 0:  # nothing hidden: a zero loss that keeps the graph
            loss = sum(p.sum() for p in preds) * 0.0
        else:
            loss = heteroscedastic_loss(self.loss_kind, wanted, values[:, 0], values[:, 1], self.beta)
        dense = torch.cat(preds, dim=2)  # [B, 2, S]
        mean = dense[:, 0] * self.count_scale
        log_var = dense[:, 1] + 2 * math.log(self.count_scale)
        return InpaintOutput(loss, mean, log_var, hidden)


# -------------------------------------------------------------------------------- registration
_TRAIN_DEFAULTS = {
    "epochs": 20,
    "batch_size": 64,
    "lr": 1e-3,
    "weight_decay": 0.05,
    "scheduler": "cosine",
    "warmup_epochs": 1,
    "ema_decay": 0.999,
    "grad_clip": 1.0,
    "mask_ratio": 0.6,
}

# CPU-sized: two stages (16, 32), 64-d tokens; the sizes of the committed CPU results.
CPU_SIZE = {
    "dims": (16, 32),
    "depths": (1, 1),
    "hex_dim": 32,
    "hex_depth": 2,
    "token_dim": 64,
    "fusion_heads": 4,
    "decoder_dim": 32,
    "head_hidden": 64,
}


def _example_counts(batch: int, generator: torch.Generator) -> tuple[torch.Tensor]:
    """Photoelectron counts ``[B, S]`` of the default detector: mostly empty, a few bright sensors."""
    sensors = Detector().num_sensors
    rate = torch.rand(batch, sensors, generator=generator).pow(8) * 50
    return (torch.poisson(rate, generator=generator),)


def _variant(name: str, size: dict, loss: str, description: str, **extra) -> None:
    @register_model(
        name,
        task="detector_regression",
        dataset="detector",
        description=description,
        example_inputs=_example_counts,
        train_defaults=_TRAIN_DEFAULTS,
    )
    def build(**kwargs) -> DetectorFusion:
        return DetectorFusion(**{**size, "loss": loss, **extra, **kwargs})


_variant(
    "detector_fusion",
    {},
    "faithful",
    "six-face detector: ConvNeXt V2 faces, graph attention, 1024-d token fusion, faithful heads",
)
for _loss in LOSSES:
    _variant(
        f"detector_fusion_cpu_{_loss}",
        CPU_SIZE,
        _loss,
        f"detector_fusion at CPU size (16-32 ConvNeXt, 64-d tokens), {_loss} loss",
    )
_variant(
    "detector_fusion_cpu_faithful_shared",
    CPU_SIZE,
    "faithful",
    "detector_fusion_cpu_faithful whose variance network also trains the encoder (no stop-gradient)",
    variance_stop_gradient=False,
)

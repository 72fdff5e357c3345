"""The seed-002 modules: GRN, ConvNeXtV2Block (FCMAE dense masking), SE/CBAM, the inpainting and
heteroscedastic heads, beta-NLL and faithful NLL losses, positional encodings (tiny CPU inputs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvision.nn as fnn
from fastvision.nn.convnext import resize_mask
from fastvision.ops import grn_reference, masked_gather_reference


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Fresh random values in every parameter (GRN's zero init would hide its math)."""
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


# ------------------------------------------------------------------------------------------ GRN


def test_grn_matches_reference_and_official_form():
    g = _gen(0)
    x = torch.randn(2, 5, 3, 8, generator=g)
    layer = _randomize(fnn.GRN(8), 1)
    torch.testing.assert_close(layer(x), grn_reference(x, layer.gamma, layer.beta, 1e-6))
    # ConvNeXt V2's own formulation
    gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(layer(x), layer.gamma * (x * nx) + layer.beta + x)


def test_grn_starts_as_identity_and_ignores_masked_sites():
    g = _gen(2)
    x = torch.randn(2, 4, 4, 6, generator=g)
    assert torch.equal(fnn.GRN(6)(x), x)
    layer = _randomize(fnn.GRN(6), 3)
    mask = torch.rand(2, 4, 4, generator=g) < 0.5
    changed = x.clone()
    changed[mask] = 100.0 * torch.randn(int(mask.sum()), 6, generator=g)
    # Masked sites do not enter Gx, so the visible sites' output does not see them.
    torch.testing.assert_close(layer(x, mask)[~mask], layer(changed, mask)[~mask])
    torch.testing.assert_close(layer(x, mask), grn_reference(x, layer.gamma, layer.beta, 1e-6, mask))


def test_grn_rejects_bad_inputs():
    layer = fnn.GRN(4)
    with pytest.raises(ValueError, match="channels-last"):
        layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(TypeError, match="mask"):
        layer(torch.randn(2, 3, 3, 4), torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(2, 3, 3, 4), torch.zeros(2, 3, 4, dtype=torch.bool))


# ------------------------------------------------------------------------------- ConvNeXt V2 block


def _seed_block_forward(block: fnn.ConvNeXtV2Block, x: torch.Tensor, mask_2d: torch.Tensor | None):
    """The seed's block, written out with float masks (``x * (1 - mask_2d)``) and ConvNeXt V2's GRN."""
    inp = x
    x = block.dwconv(x)
    if mask_2d is not None:
        x = x * (1.0 - mask_2d)
    x = x.permute(0, 2, 3, 1)
    x = block.act(block.pwconv1(block.norm(x)))
    squares = x.square()
    if mask_2d is not None:
        squares = squares * (1.0 - mask_2d.permute(0, 2, 3, 1))
    gx = squares.sum(dim=(1, 2), keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    x = block.grn.gamma * (x * nx) + block.grn.beta + x
    x = block.pwconv2(x).permute(0, 3, 1, 2)
    if mask_2d is not None:
        return inp * (1.0 - mask_2d) + x
    return inp + x


@pytest.mark.parametrize("masked", [False, True])
def test_block_matches_the_seed(masked):
    g = _gen(4)
    block = _randomize(fnn.ConvNeXtV2Block(8, kernel_size=5), 5)
    x = torch.randn(2, 8, 6, 5, generator=g)
    mask = (torch.rand(2, 6, 5, generator=g) < 0.6) if masked else None
    mask_2d = mask.unsqueeze(1).float() if masked else None
    torch.testing.assert_close(block(x, mask), _seed_block_forward(block, x, mask_2d), atol=1e-5, rtol=1e-5)


def test_block_mask_reaches_every_masked_operation():
    g = _gen(6)
    block = _randomize(fnn.ConvNeXtV2Block(4, kernel_size=3), 7)
    mask = torch.rand(2, 5, 5, generator=g) < 0.5
    x = torch.randn(2, 4, 5, 5, generator=g) * (~mask).unsqueeze(1)  # zero at masked sites, as encoded
    out = block(x, mask)
    # The masked sites' output is the branch of a zeroed depthwise output: the same vector at every
    # masked site of a sample (the residual is masked, and the GRN statistics are per sample).
    for b in range(2):
        sites = out[b].permute(1, 2, 0)[mask[b]]
        torch.testing.assert_close(sites, sites[:1].expand_as(sites))
    # An all-False mask is the dense block.
    torch.testing.assert_close(block(x, torch.zeros(2, 5, 5, dtype=torch.bool)), block(x))


def test_block_without_grn_and_backward():
    block = fnn.ConvNeXtV2Block(4, grn=False)
    assert block.grn is None and "grn=False" in repr(block)
    x = torch.randn(1, 4, 7, 7, requires_grad=True)
    block(x, torch.rand(1, 7, 7) < 0.5).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_drop_path_is_per_sample_and_off_in_eval():
    layer = fnn.DropPath(0.5)
    x = torch.ones(64, 3, 2, 2)
    torch.manual_seed(0)
    y = layer(x)
    per_sample = y.flatten(1)
    assert set(per_sample[:, 0].tolist()) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()  # one decision per sample
    assert torch.equal(layer.eval()(x), x)


def test_resize_mask_repeats_patches_and_subsamples_exactly():
    g = _gen(8)
    patches = torch.rand(2, 7, 7, generator=g) < 0.6
    pixels = resize_mask(patches, (28, 28))
    assert torch.equal(pixels, patches.repeat_interleave(4, 1).repeat_interleave(4, 2))
    assert torch.equal(resize_mask(pixels, (7, 7)), patches)
    assert resize_mask(patches, (7, 7)) is patches


# ------------------------------------------------------------------------------------- attention


def test_se_block_is_the_seeds_layout():
    g = _gen(9)
    se = fnn.SEBlock(32, reduction=16)
    assert [type(m) for m in se.fc] == [
        nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.Sigmoid,
    ]  # fmt: skip
    assert se.fc[2].out_features == 2
    x = torch.randn(3, 32, 4, 5, generator=g)
    scale = torch.sigmoid(se.fc[4](F.relu(se.fc[2](x.mean(dim=(2, 3))))))
    torch.testing.assert_close(se(x), x * scale[:, :, None, None])


def test_cbam_channel_then_spatial_with_avg_and_max():
    g = _gen(10)
    cbam = _randomize(fnn.CBAM(8, reduction=2, spatial_kernel=3), 11)
    x = torch.randn(2, 8, 5, 6, generator=g)
    mlp = cbam.channel.mlp
    channel = torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
    y = x * channel
    pooled = torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1)
    expected = y * torch.sigmoid(F.conv2d(pooled, cbam.spatial.conv.weight, padding=1))
    torch.testing.assert_close(cbam(x), expected)
    with pytest.raises(ValueError, match=r"\[B, 8, H, W\]"):
        cbam(torch.randn(2, 4, 5, 6))


# ----------------------------------------------------------------------------------------- heads


def test_masked_inpainting_head_gathers_predictions_at_masked_sites():
    g = _gen(12)
    head = fnn.MaskedInpaintingHead(6, 3)
    x = torch.randn(2, 6, 5, 4, generator=g, requires_grad=True)
    mask = torch.rand(2, 5, 4, generator=g) < 0.4
    dense, gathered = head(x, mask)
    expected = masked_gather_reference(head.proj(x), mask)
    for got, want in zip(gathered, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert dense.shape == (2, 3, 5, 4)
    # Only the masked sites receive a gradient through the gathered values.
    gathered.values.sum().backward()
    site_grad = x.grad.abs().sum(1)
    assert (site_grad[~mask] == 0).all() and (site_grad[mask] > 0).all()
    # A fixed slot count truncates and reports the true counts.
    fixed = head(x.detach(), mask, max_count=2).gathered
    assert fixed.values.shape == (2, 2, 3) and torch.equal(fixed.counts, mask.flatten(1).sum(1))


def test_heteroscedastic_head_has_separate_networks():
    head = fnn.HeteroscedasticHead(5, 2, hidden=7)
    mean_params = {id(p) for p in head.mean.parameters()}
    assert mean_params.isdisjoint(id(p) for p in head.log_var.parameters())
    mu, log_var = head(torch.randn(3, 4, 5))
    assert mu.shape == log_var.shape == (3, 4, 2)
    mu.sum().backward()
    assert all(p.grad is None for p in head.log_var.parameters())
    assert isinstance(fnn.HeteroscedasticHead(5, hidden=None).mean, nn.Linear)


# ---------------------------------------------------------------------------------------- losses


def _seed_faithful(y_true, mu, log_var):
    var = torch.exp(log_var)
    var_stopped = var.detach()
    loss_mean = 0.5 * ((y_true - mu) ** 2) / var_stopped
    loss_var = 0.5 * (log_var + ((y_true - mu.detach()) ** 2) / var)
    return (loss_mean + loss_var).mean()


def _seed_beta_nll(y_true, mu, log_var, beta=0.5):
    var = torch.exp(log_var)
    nll = 0.5 * (log_var + ((y_true - mu) ** 2) / var)
    weight = var.detach() ** beta
    return (weight * nll).mean()


def _inputs(seed):
    g = _gen(seed)
    y = torch.randn(6, 3, generator=g, dtype=torch.float64)
    mu = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    log_var = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    return y, mu, log_var


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_losses_are_the_seeds_with_their_gradients(beta):
    for ours, seed_form, kwargs in (
        (fnn.faithful_nll_loss, _seed_faithful, {}),
        (fnn.beta_nll_loss, _seed_beta_nll, {"beta": beta}),
    ):
        y, mu, log_var = _inputs(13)
        got = ours(y, mu, log_var, **kwargs)
        grads = torch.autograd.grad(got, (mu, log_var))
        want = seed_form(y, mu, log_var, **kwargs)
        torch.testing.assert_close(got, want)
        for a, b in zip(grads, torch.autograd.grad(want, (mu, log_var)), strict=True):
            torch.testing.assert_close(a, b)


def test_loss_gradients_follow_the_stop_gradients():
    y, mu, log_var = _inputs(14)
    n = y.numel()
    var = log_var.detach().exp()
    # Faithful: the mean's gradient is the squared error's scaled by the stopped variance.
    (d_mu,) = torch.autograd.grad(fnn.faithful_nll_loss(y, mu, log_var), mu)
    torch.testing.assert_close(d_mu, (mu.detach() - y) / var / n)
    # beta = 1: the mean's gradient is that of 0.5 * squared error.
    (d_mu,) = torch.autograd.grad(fnn.beta_nll_loss(y, mu, log_var, beta=1.0), mu)
    torch.testing.assert_close(d_mu, (mu.detach() - y) / n)
    with pytest.raises(TypeError, match="beta"):
        fnn.beta_nll_loss(y, mu, log_var, beta="0.5")


# ----------------------------------------------------------------------------- positional encodings


def _seed_sinusoidal(num_positions, embed_dim):
    position = torch.arange(num_positions).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, embed_dim, 2) * (-np.log(10000.0) / embed_dim))
    pe = torch.zeros(num_positions, embed_dim)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe.unsqueeze(0)


def test_sinusoidal_embeddings():
    torch.testing.assert_close(fnn.sinusoidal_pos_embed(11, 16), _seed_sinusoidal(11, 16).float())
    pe = fnn.sinusoidal_pos_embed_2d(3, 5, 8)
    assert pe.shape == (1, 15, 8)
    one_d = fnn.sinusoidal_pos_embed(5, 4)[0]
    grid = pe[0].view(3, 5, 8)
    torch.testing.assert_close(grid[:, :, :4], fnn.sinusoidal_pos_embed(3, 4)[0][:, None].expand(3, 5, 4))
    torch.testing.assert_close(grid[:, :, 4:], one_d[None].expand(3, 5, 4))
    with pytest.raises(ValueError, match="embed_dim"):
        fnn.sinusoidal_pos_embed(4, 7)
    with pytest.raises(ValueError, match="embed_dim"):
        fnn.sinusoidal_pos_embed_2d(2, 2, 6)


def test_positional_modules_add_their_table():
    x = torch.randn(2, 6, 8)
    learned = fnn.LearnablePositionalEncoding(6, 8)
    assert 0 < learned.pos_embed.abs().max() < 0.2  # the seed's trunc_normal_(std=0.02)
    torch.testing.assert_close(learned(x), x + learned.pos_embed)
    torch.testing.assert_close(fnn.SinusoidalPositionalEncoding(6, 8)(x), x + fnn.sinusoidal_pos_embed(6, 8))
    two_d = fnn.SinusoidalPositionalEncoding2d(2, 3, 8)
    torch.testing.assert_close(two_d(x), x + fnn.sinusoidal_pos_embed_2d(2, 3, 8))
    assert not list(two_d.parameters()) and not two_d.state_dict()
    with pytest.raises(ValueError, match=r"\[B, 6, 8\]"):
        learned(torch.randn(2, 5, 8))


# ------------------------------------------------------------------------------ constructor checks

BAD_ARGUMENTS = [
    (fnn.GRN, (0,), {}, ValueError, "dim"),
    (fnn.GRN, (4.0,), {}, TypeError, "dim"),
    (fnn.GRN, (4,), {"eps": 0.0}, ValueError, "eps"),
    (fnn.ConvNeXtV2Block, (0,), {}, ValueError, "dim"),
    (fnn.ConvNeXtV2Block, (8,), {"drop_path": 1.0}, ValueError, "p"),
    (fnn.ConvNeXtV2Block, (8,), {"kernel_size": 4}, ValueError, "kernel_size"),
    (fnn.ConvNeXtV2Block, (8,), {"kernel_size": 7.0}, TypeError, "kernel_size"),
    (fnn.ConvNeXtV2Block, (8,), {"grn": 1}, TypeError, "grn"),
    (fnn.DropPath, (-0.1,), {}, ValueError, "p"),
    (fnn.LayerNorm2d, (0,), {}, ValueError, "channels"),
    (fnn.SEBlock, (8,), {"reduction": 16}, ValueError, "reduction"),
    (fnn.SEBlock, (8.5,), {}, TypeError, "channels"),
    (fnn.SEBlock, (32,), {"reduction": 0}, ValueError, "reduction"),
    (fnn.CBAM, (32,), {"spatial_kernel": 6}, ValueError, "spatial_kernel"),
    (fnn.CBAM, (32,), {"reduction": "16"}, TypeError, "reduction"),
    (fnn.MaskedInpaintingHead, (0, 4), {}, ValueError, "in_channels"),
    (fnn.MaskedInpaintingHead, (4, 0), {}, ValueError, "out_channels"),
    (fnn.MaskedInpaintingHead, (4, 4), {"max_count": -1}, ValueError, "max_count"),
    (fnn.MaskedInpaintingHead, (4, 4), {"max_count": 2.0}, TypeError, "max_count"),
    (fnn.HeteroscedasticHead, (0,), {}, ValueError, "in_features"),
    (fnn.HeteroscedasticHead, (4,), {"hidden": 0}, ValueError, "hidden"),
    (fnn.LearnablePositionalEncoding, (0, 8), {}, ValueError, "num_positions"),
    (fnn.LearnablePositionalEncoding, (4, 8), {"init_std": math.nan}, ValueError, "init_std"),
    (fnn.SinusoidalPositionalEncoding, (4, 7), {}, ValueError, "embed_dim"),
    (fnn.SinusoidalPositionalEncoding2d, (0, 4, 8), {}, ValueError, "height"),
]


@pytest.mark.parametrize(("module", "args", "kwargs", "error", "name"), BAD_ARGUMENTS)
def test_constructor_arguments_are_checked(module, args, kwargs, error, name):
    with pytest.raises(error, match=name):
        module(*args, **kwargs)

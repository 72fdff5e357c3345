"""INR modules (fastvision.nn.inr), the seed-004 models, the photos dataset and the inr task. Tiny sizes."""

from __future__ import annotations

import math

import pytest
import torch

import fastvision.nn as fnn
from fastvision.data.base import ImageTensorDataset
from fastvision.models import create_model, get_model_spec, list_models
from fastvision.models.mamba_ginr_scent import SCENT, MambaGINR, MambaGINRSCENT
from fastvision.train.config import TrainConfig

# The parameter counts of the registered models (the README's table).
PARAMETERS = {
    "mamba_ginr_scent": 15_727_875,
    "mamba_ginr": 1_080_323,
    "scent": 16_166_147,
    "mamba_ginr_scent_small": 3_690_627,
    "mamba_ginr_small": 282_627,
    "scent_small": 3_778_691,
}
TINY = {
    "image_size": 8,
    "patch_size": 4,
    "dim": 16,
    "num_latents": 4,
    "fourier_features": 8,
    "decoder_dim": 16,
}
TINY_ATTENTION = {"heads": 2, "dim_head": 8, "cross_dim_head": 8, "processor_depth": 1, "decoder_depth": 1}


def test_gaussian_fourier_features():
    torch.manual_seed(0)
    ff = fnn.GaussianFourierFeatures(2, 5, scale=3.0)
    x = torch.rand(4, 7, 2)
    out = ff(x)
    assert out.shape == (4, 7, 10) and ff.out_dim == 10
    projected = 2 * math.pi * x @ ff.B
    torch.testing.assert_close(out, torch.cat((projected.sin(), projected.cos()), -1))
    assert "B" in dict(ff.named_buffers()) and not list(ff.parameters())
    assert list(fnn.GaussianFourierFeatures(2, 5, learnable=True).parameters())
    with pytest.raises(ValueError, match="x must"):
        ff(torch.rand(3, 3))


def test_cross_attention_matches_softmax_attention():
    torch.manual_seed(1)
    cross = fnn.CrossAttention(6, 4, heads=2, dim_head=3)
    x, context = torch.randn(2, 5, 6), torch.randn(2, 7, 4)
    q = cross.attn.to_q(cross.norm(x)).view(2, 5, 2, 3).transpose(1, 2)
    k, v = cross.attn.to_kv(cross.norm_context(context)).chunk(2, -1)
    k, v = (t.view(2, 7, 2, 3).transpose(1, 2) for t in (k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(3), dim=-1)
    expected = cross.attn.to_out((weights @ v).transpose(1, 2).reshape(2, 5, 6))
    torch.testing.assert_close(cross(x, context), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="context"):
        cross(x, torch.randn(2, 7, 5))


def test_self_attention_block_is_residual_prenorm():
    torch.manual_seed(2)
    block = fnn.SelfAttentionBlock(8, heads=2, dim_head=4, ff_mult=2)
    x = torch.randn(3, 5, 8)
    mid = x + block.attn(block.norm1(x))
    torch.testing.assert_close(block(x), mid + block.ff(block.norm2(mid)))
    assert block.ff.activation_name == "geglu"
    with pytest.raises(ValueError, match="x must"):
        block(torch.randn(3, 5, 7))


@pytest.mark.parametrize(
    "cls, args, kwargs, error, name",
    [
        (fnn.GaussianFourierFeatures, (0, 4), {}, ValueError, "in_dim"),
        (fnn.GaussianFourierFeatures, (2, 4.0), {}, TypeError, "num_features"),
        (fnn.GaussianFourierFeatures, (2, 4), {"scale": 0.0}, ValueError, "scale"),
        (fnn.GaussianFourierFeatures, (2, 4), {"learnable": 1}, TypeError, "learnable"),
        (fnn.CrossAttention, (0, 4), {}, ValueError, "query_dim"),
        (fnn.CrossAttention, (4, 4), {"heads": 0}, ValueError, "heads"),
        (fnn.CrossAttention, (4, 4), {"dim_head": "8"}, TypeError, "dim_head"),
        (fnn.CrossAttention, (4, 4), {"dropout": 1.0}, ValueError, "dropout"),
        (fnn.SelfAttentionBlock, (8,), {"ff_mult": 0}, ValueError, "ff_mult"),
        (fnn.SelfAttentionBlock, (8.5,), {}, TypeError, "dim"),
        (MambaGINRSCENT, (), {"image_size": 30, "patch_size": 4}, ValueError, "patch_size"),
        (MambaGINRSCENT, (), {"num_latents": 0}, ValueError, "num_latents"),
        (SCENT, (), {"decoder_dim": -1}, ValueError, "decoder_dim"),
        (MambaGINR, (), {"decoder_depth": 0}, ValueError, "decoder_depth"),
    ],
)
def test_constructor_checks(cls, args, kwargs, error, name):
    with pytest.raises(error, match=name):
        cls(*args, **kwargs)


def test_coordinate_grid_pixel_centres():
    grid = fnn.coordinate_grid(2, 4)
    assert grid.shape == (8, 2)
    torch.testing.assert_close(grid[:4, 0], torch.full((4,), -0.5))
    torch.testing.assert_close(grid[:4, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))


def test_registered_models_and_parameter_counts():
    assert set(PARAMETERS) <= set(list_models())
    for name, count in PARAMETERS.items():
        spec = get_model_spec(name)
        assert spec.task == "inr" and spec.dataset == "photos"
        assert sum(p.numel() for p in create_model(name).parameters()) == count, name


def test_seed_hybrid_layout():
    model = create_model("mamba_ginr_scent")
    assert model.encoder.patches.num_patches == 256 and model.encoder.lp_tokens.shape == (256, 256)
    assert len(model.processor.blocks) == 4 and model.processor.blocks[0].attn.heads == 8
    assert len(model.decoder.blocks) == 3 and model.decoder.blocks[0].ff.proj_out.in_features == 2048


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (MambaGINRSCENT, {**TINY, **TINY_ATTENTION, "d_state": 4}),
        (MambaGINR, {**TINY, "d_state": 4, "cross_dim_head": 8, "decoder_depth": 1}),
        (SCENT, {**TINY, **TINY_ATTENTION, "encoder_dim_head": 8}),
    ],
)
def test_models_decode_any_resolution(cls, kwargs):
    torch.manual_seed(3)
    model = cls(**kwargs)
    images = torch.rand(2, 3, 8, 8)
    out = model(images)
    assert out.shape == (2, 3, 8, 8)
    grid = fnn.coordinate_grid(8, 8)
    torch.testing.assert_close(out.flatten(2).transpose(1, 2), model(images, grid))
    torch.testing.assert_close(out, model.render(images, 8, chunk=5))
    assert model.render(images, 20, chunk=64).shape == (2, 3, 20, 20)
    assert model(images, torch.rand(2, 9, 2) * 2 - 1).shape == (2, 9, 3)
    model(images).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="coords"):
        model(images, torch.rand(2, 9, 3))


def test_inr_task_trains_through_the_trainer(tmp_path):
    from fastvision.train.trainer import train

    images = (torch.rand(24, 3, 32, 32) * 255).to(torch.uint8)
    train_set = ImageTensorDataset(images[:16], torch.zeros(16), describe="random train")
    test_set = ImageTensorDataset(images[16:], torch.zeros(8), describe="random test")
    cfg = TrainConfig(epochs=1, batch_size=8, query_samples=64, val_fraction=0.25, ema_decay=0.0)
    run_dir, datasets = tmp_path / "run", (train_set, test_set)
    summary = train(
        "scent_small", cfg, device="cpu", run_dir=run_dir, datasets=datasets, progress=False, log=None
    )
    assert summary["task"] == "inr" and {"psnr", "ssim", "loss"} <= set(summary["test_metrics"])
    assert (tmp_path / "run" / "best.pt").exists()

    # the comparison against bicubic upsampling, on a folder of two photographs (one held out)
    pil = pytest.importorskip("PIL.Image")
    from fastvision.train.inr_eval import compare, merge

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        pil.fromarray((torch.rand(80, 90, 3) * 255).to(torch.uint8).numpy()).save(photos / f"p{i}.png")
    result = compare({"scent": run_dir}, str(photos), tmp_path / "out", sizes=(64,), crops_per_photo={64: 2},
                     test_samples=3)  # fmt: skip
    entry = result["models"]["scent"]
    assert result["test_photographs"] == ["p1.png"] and entry["parameters"] == PARAMETERS["scent_small"]
    assert {"psnr", "ssim", "images_per_s"} <= set(entry["super_resolution_64"]) and "64" in result["bicubic"]
    assert (tmp_path / "out" / "super_resolution_64.png").exists()
    assert "bicubic upsampling" in (tmp_path / "out" / "RESULTS.md").read_text()
    merged = merge([tmp_path / "out"], tmp_path / "merged")
    assert merged["models"] == result["models"] and (tmp_path / "merged" / "super_resolution_64.png").exists()


def test_query_samples_is_checked():
    with pytest.raises(ValueError, match="query_samples"):
        TrainConfig(query_samples=0)
    assert TrainConfig(query_samples=16).query_samples == 16


def test_photo_folder_split_by_photograph(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    from fastvision.data import build_dataset
    from fastvision.data.photos import downsample, load_photographs, super_resolution_pairs

    generator = torch.Generator().manual_seed(4)
    for i in range(5):
        array = (torch.rand(300, 280 + 10 * i, 3, generator=generator) * 255).to(torch.uint8).numpy()
        pil.fromarray(array).save(tmp_path / f"photo{i}.png")
    train_names, _ = load_photographs("train", tmp_path)
    test_names, test_photos = load_photographs("test", tmp_path)
    assert test_names == ["photo3.png"] and "photo3.png" not in train_names and len(train_names) == 4
    data = build_dataset("photos", "train", tmp_path, num_samples=6, seed=1)
    image, label = data[0]
    assert image.shape == (3, 32, 32) and 0 <= int(label) < 4 and "photo0.png" in data.describe
    low, high, names = super_resolution_pairs(128, tmp_path, crops_per_photo=2)
    assert low.shape == (2, 3, 32, 32) and high.shape == (2, 3, 128, 128) and names == ["photo3.png"] * 2
    torch.testing.assert_close(low, downsample(high, 32))
    with pytest.raises(ValueError, match="512 pixels"):
        super_resolution_pairs(512, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_photographs("train", tmp_path / "missing")

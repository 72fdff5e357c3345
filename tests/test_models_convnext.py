"""convnext_v2_fcmae: the model (FCMAE masking, loss on masked pixels, dense fine-tuning with the
same weights), the fcmae task, pretrain -> fine-tune through the trainer, and the seed's training
features on this model. Embedded stand-in digits or tiny synthetic inputs only."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from fastvision.models import create_model, get_model_spec, list_models
from fastvision.models.convnext_v2_fcmae import ConvNeXtV2FCMAE, FCMAEOutput
from fastvision.train import TrainConfig, Trainer, evaluate_checkpoint, get_task, load_checkpoint
from fastvision.train.cli import add_subcommands, config_from_args
from fastvision.train.inpainting_eval import evaluate_inpainting
from fastvision.train.tasks import masked_pixel_mse, mean_fill

PARAMETERS = {"convnext_v2_fcmae": 251_418, "convnext_v2_fcmae_nogrn": 249_114}


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _small(**kwargs) -> ConvNeXtV2FCMAE:
    torch.manual_seed(0)
    return ConvNeXtV2FCMAE(dims=(8, 16, 16), decoder_dim=8, **kwargs)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_registered_with_parameter_count(name):
    assert name in list_models()
    spec = get_model_spec(name)
    assert (spec.task, spec.dataset) == ("classification", "fashion_mnist")
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]
    assert model.use_grn == (name == "convnext_v2_fcmae")
    assert model.patch_size == 4 and model.grid_size == 7 and model.tasks == ("classification", "fcmae")


def test_classification_and_fcmae_forward():
    model = _small()
    images = _images(3)
    assert model(images).shape == (3, 10)
    mask = model.random_mask(3, 0.6, generator=torch.Generator().manual_seed(1))
    assert mask.shape == (3, 7, 7) and (mask.flatten(1).sum(1) == round(0.6 * 49)).all()
    out = model(images, mask)
    assert isinstance(out, FCMAEOutput) and out.prediction.shape == (3, 1, 28, 28)
    assert torch.equal(out.pixel_mask, mask.repeat_interleave(4, 1).repeat_interleave(4, 2))
    # The loss is the MSE over the masked pixels only (every sample has the same number of them).
    torch.testing.assert_close(out.loss, masked_pixel_mse(out.prediction, images, out.pixel_mask).mean())


def test_masked_pixels_never_reach_the_encoder():
    model = _small()
    images = _images(2, seed=2)
    mask = model.random_mask(2, 0.6, generator=torch.Generator().manual_seed(3))
    hidden = F.interpolate(mask[:, None].float(), scale_factor=4) > 0
    changed = torch.where(hidden, _images(2, seed=4), images)
    torch.testing.assert_close(model.encode(images, mask), model.encode(changed, mask))
    a, b = model(images, mask), model(changed, mask)
    torch.testing.assert_close(a.prediction, b.prediction)
    # ... while the dense (fine-tuning) path sees them.
    assert not torch.allclose(model.encode(images), model.encode(changed))


def test_loss_gradient_comes_from_masked_pixels_only():
    model = _small()
    images = _images(2, seed=5)
    mask = model.random_mask(2, 0.6, generator=torch.Generator().manual_seed(6))
    captured = []
    model.pred.register_forward_hook(lambda module, args, output: captured.append(output.dense))
    out = model(images, mask)
    (grad,) = torch.autograd.grad(out.loss, captured[0])  # the head's per-patch pixel predictions
    grad = F.pixel_shuffle(grad, 4)
    assert (grad[~out.pixel_mask.unsqueeze(1)] == 0).all()
    assert (grad[out.pixel_mask.unsqueeze(1)] != 0).any()


def test_norm_pix_loss_and_inpaint():
    model = _small()
    images = _images(2, seed=7)
    mask = model.random_mask(2, 0.5, generator=torch.Generator().manual_seed(8))
    plain, normed = model(images, mask).loss, model(images, mask, norm_pix_loss=True).loss
    assert torch.isfinite(normed) and not torch.isclose(plain, normed)
    filled = model.inpaint(images, mask)
    keep = ~model(images, mask).pixel_mask.unsqueeze(1)
    assert torch.equal(filled[keep], images[keep])


def test_model_argument_and_input_checks():
    with pytest.raises(ValueError, match="image_size"):
        ConvNeXtV2FCMAE(image_size=30)
    with pytest.raises(ValueError, match="one entry per stage"):
        ConvNeXtV2FCMAE(dims=(8, 16), depths=(1, 1, 1))
    with pytest.raises(TypeError, match="grn"):
        ConvNeXtV2FCMAE(grn="no")
    with pytest.raises(ValueError, match="decoder_depth"):
        ConvNeXtV2FCMAE(decoder_depth=-1)
    model = _small()
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="patch-grid"):
        model(_images(2), torch.zeros(2, 28, 28, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        model(_images(2), torch.zeros(2, 7, 7))
    with pytest.raises(ValueError, match="ratio"):
        model.random_mask(2, 1.0)


# ------------------------------------------------------------------------------------ the task


def test_fcmae_task_metrics_and_baseline():
    model = _small()
    images = _images(4, seed=9)
    task = get_task("fcmae")
    cfg = TrainConfig(mask_ratio=0.6)
    result = task.eval_step(model, (images, torch.zeros(4)), cfg, torch.Generator().manual_seed(0))
    assert set(result.sums) == {"loss", "masked_mse", "mean_fill_mse"} and result.count == 4
    torch.testing.assert_close(result.sums["masked_mse"] / 4, result.loss)
    hidden = result.outputs.pixel_mask
    filled = mean_fill(images, hidden)
    visible = images[0, 0][~hidden[0]]
    torch.testing.assert_close(filled[0, 0][hidden[0]], visible.mean().expand(int(hidden[0].sum())))
    # The same generator seed scores the same masks.
    again = task.eval_step(model, (images, torch.zeros(4)), cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.loss, result.loss)


def test_inpainting_evaluation_baselines():
    pytest.importorskip("skimage")
    model = _small()
    images = _images(3, seed=10) * 0.2 + 0.4  # smooth enough for biharmonic to beat noise
    summary, filled = evaluate_inpainting(model, images, seed=0, batch_size=2)
    assert set(summary) == {"model", "mean_fill", "biharmonic"}
    assert all(entry["n"] == 3 for entry in summary.values())
    assert filled["biharmonic"].shape == images.shape
    keep = ~filled["mask"].unsqueeze(1)
    for name in ("model", "mean_fill", "biharmonic"):
        torch.testing.assert_close(filled[name][keep], images[keep])


# ---------------------------------------------------------------------------- through the trainer


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from fastvision.data import load_embedded_digits

    train, test = load_embedded_digits("train"), load_embedded_digits("test")
    return Subset(train, range(40)), Subset(test, range(16))


def _config(**overrides) -> TrainConfig:
    values = {
        "epochs": 1, "batch_size": 16, "lr": 1e-3, "val_fraction": 0.25, "warmup_epochs": 0.0,
        "ema_decay": 0.999,
    }  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def _trainer(digits, tmp_path, name="run", model="convnext_v2_fcmae", **overrides) -> Trainer:
    cfg = _config(**overrides)
    run_dir = tmp_path / name
    return Trainer(model, cfg, datasets=digits, run_dir=run_dir, device="cpu", progress=False, log=None)


def test_pretrain_then_finetune_from_the_ema_weights(digits, tmp_path):
    pretrain = _trainer(digits, tmp_path, "pretrain", task="fcmae")
    summary = pretrain.fit()
    assert summary["task"] == "fcmae"
    assert set(summary["test_metrics"]) == {"loss", "masked_mse", "mean_fill_mse"}
    state = load_checkpoint(tmp_path / "pretrain" / "best.pt")
    assert state["task"] == "fcmae" and state["config"]["mask_ratio"] == 0.6

    finetune = _trainer(digits, tmp_path, "finetune", init_from=str(tmp_path / "pretrain" / "best.pt"))
    for name, value in finetune.model.state_dict().items():
        torch.testing.assert_close(value, state["ema"]["module"][name], msg=name)
    summary = finetune.fit()
    assert summary["task"] == "classification" and "accuracy" in summary["test_metrics"]
    # A resumed fine-tuning run keeps its own weights rather than the init_from ones.
    resumed = Trainer(
        "convnext_v2_fcmae", finetune.cfg.replace(epochs=2), datasets=digits, run_dir=tmp_path / "finetune",
        device="cpu", resume=True, progress=False, log=None,
    )  # fmt: skip
    resumed._restore(tmp_path / "finetune" / "last.pt")
    own = load_checkpoint(tmp_path / "finetune" / "last.pt")["model"]
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, own[name], msg=name)
    best = tmp_path / "pretrain" / "best.pt"
    result = evaluate_checkpoint("convnext_v2_fcmae", best, dataset=digits[1], device="cpu", progress=False)
    assert set(result["test_metrics"]) == {"loss", "masked_mse", "mean_fill_mse"}


def test_init_from_another_architecture_is_a_clear_error(digits, tmp_path):
    _trainer(digits, tmp_path, "nogrn", model="convnext_v2_fcmae_nogrn", task="fcmae", train_samples=16).fit()
    with pytest.raises(ValueError, match="best.pt: the EMA weights do not fit this model"):
        _trainer(digits, tmp_path, "grn", init_from=str(tmp_path / "nogrn" / "best.pt"))


def test_task_override_needs_a_model_that_serves_it(digits, tmp_path):
    with pytest.raises(ValueError, match="cannot train on task 'fcmae'"):
        _trainer(digits, tmp_path, model="vit_mnist", task="fcmae")
    for bad in ({"task": "inpaint"}, {"mask_ratio": 1.0}, {"mask_ratio": 0.0}, {"init_from": ""}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _config(**bad)


@pytest.mark.parametrize(
    "overrides",
    [
        # 24 training samples in batches of 16 with 2 accumulation steps: one step of a 16 + 8
        # group, the leftover batch included.
        {"grad_accum_steps": 2, "scheduler": "cosine", "warmup_epochs": 0.5},
        {"scheduler": "onecycle", "max_lr": 2e-3},
        {"scheduler": "plateau", "lr_patience": 0},
        {"scheduler": "none", "amp": "bf16"},
        {"optimizer": "schedulefree", "scheduler": "none"},
    ],
    ids=["accum-leftover-cosine", "onecycle", "plateau", "none-bf16", "schedulefree"],
)
def test_seed_training_features_on_fcmae(digits, tmp_path, overrides):
    if overrides.get("optimizer") == "schedulefree":
        pytest.importorskip("schedulefree")
    trainer = _trainer(digits, tmp_path, task="fcmae", train_samples=24, **overrides)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.fit()
    assert trainer.global_step == (1 if overrides.get("grad_accum_steps") == 2 else 2)
    assert torch.isfinite(torch.tensor(summary["test_metrics"]["loss"]))
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    if overrides.get("optimizer") != "schedulefree":
        assert trainer.ema is not None and trainer.ema.decay == 0.999


def test_fcmae_under_single_process_ddp(digits, tmp_path):
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        trainer = _trainer(digits, tmp_path, task="fcmae", train_samples=30)  # two steps
        assert isinstance(trainer.ddp_model, torch.nn.parallel.DistributedDataParallel)
        assert trainer.fit()["world_size"] == 1
    finally:
        dist.destroy_process_group()


def test_cli_flags_reach_the_config():
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers())
    args = parser.parse_args(
        ["train", "convnext_v2_fcmae", "--task", "fcmae", "--mask-ratio", "0.75", "--norm-pix-loss",
         "--init-from", "x.pt"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.task, cfg.mask_ratio, cfg.norm_pix_loss, cfg.init_from) == ("fcmae", 0.75, True, "x.pt")
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size) == (2e-3, 0.05, 128)  # the model's defaults

"""Every training-config field is range-checked in one place, and a diverging run stops loudly."""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fastvision.cli import run_command
from fastvision.models import register_model
from fastvision.train import TrainConfig, Trainer
from fastvision.train.cli import add_subcommands
from fastvision.train.trainer import NonFiniteLossError, resolve_config

INF, NAN = math.inf, math.nan

# field -> values that must be refused (each with an error naming the field)
BAD_VALUES = {
    "epochs": [0, -1, 1.5],
    "batch_size": [0, -8],
    "grad_accum_steps": [0, -1],
    "lr": [0.0, -1e-3, INF, NAN],
    "weight_decay": [-0.01, INF, NAN],
    "optimizer": ["sgd", 3],
    "scheduler": ["linear"],
    "warmup_epochs": [-1.0, 1e12, 11.0, NAN, INF],
    "lr_min": [-1e-6, INF, NAN],
    "max_lr": [-1.0, 0.0, INF, NAN],
    "pct_start": [0.0, 1.0, NAN],
    "lr_patience": [-1],
    "lr_factor": [0.0, 1.0, 2.0, NAN],
    "ema_decay": [1.0, -0.1, NAN],
    "amp": ["fp8"],
    "grad_clip": [-1.0, INF, NAN],
    "seed": [-1, 2**40],
    "num_workers": [-1],
    "val_fraction": [1.0, -0.1, NAN],
    "train_samples": [-5, 0],
    "val_samples": [0, -1],
    "test_samples": [0, -3],
    "query_samples": [0, -5, 2.5],
    "shift_augment": [-1],
    "shift_tiles": [0, -2],
    "redraw_each_epoch": ["yes", 1],
    "noise_sigma": [-0.1, INF, NAN],
    "aux_loss_weight": [-0.01, INF, NAN],
    "task": ["inpaint", 3],
    "init_from": ["", 5],
    "mask_ratio": [0.0, 1.0, -0.5, NAN],
    "norm_pix_loss": ["yes", 1],
}


def test_every_field_has_refused_values():
    assert set(BAD_VALUES) == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize(
    "field, value", [(field, value) for field, values in BAD_VALUES.items() for value in values]
)
def test_out_of_range_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"invalid training config: {field}\b"):
        TrainConfig(**{field: value})  # epochs defaults to 10


def test_good_edge_values_are_accepted():
    TrainConfig(epochs=2, warmup_epochs=2.0, lr_min=0.0, weight_decay=0.0, lr_patience=0, grad_clip=0.0)
    TrainConfig(scheduler="onecycle", max_lr=1e-2, train_samples=1, val_samples=1, test_samples=1)
    TrainConfig(seed=2**32 - 1, noise_sigma=0.0, aux_loss_weight=0.0, shift_augment=3, shift_tiles=2)


def test_yaml_infinity_names_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  lr: .inf\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*lr must be finite"):
        TrainConfig.from_yaml(path)
    path.write_text("scheduler: onecycle\nmax_lr: -1\n")
    with pytest.raises(ValueError, match=r"max_lr must be > 0"):
        TrainConfig.from_yaml(path)


def test_config_layers_are_validated_once_as_a_whole(tmp_path):
    """A YAML warm-up longer than the model's default epochs is fine when the command line adds epochs."""
    path = tmp_path / "long.yaml"
    path.write_text("warmup_epochs: 12\n")
    register_model("test_rel_cfg_cls", task="classification", dataset="mnist", description="test")(
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    )
    assert resolve_config("test_rel_cfg_cls", path, epochs=20).warmup_epochs == 12
    with pytest.raises(ValueError, match="warmup_epochs must be <= epochs"):
        resolve_config("test_rel_cfg_cls", path)


def tiny_data(n_train=24, n_test=8, size=4, nan_images=False):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (n_train + n_test,), generator=g)
    images = torch.randn(n_train + n_test, 1, size, size, generator=g)
    if nan_images:
        images[:] = NAN
    return (
        TensorDataset(images[:n_train], labels[:n_train]),
        TensorDataset(images[n_train:], labels[n_train:]),
    )


def quick(**overrides):
    base = dict(epochs=2, batch_size=8, lr=1e-2, scheduler="none", ema_decay=0.0, val_fraction=0.0)
    return TrainConfig(**{**base, **overrides})


def trainer(model_name, cfg, data, tmp_path):
    return Trainer(
        model_name, cfg, datasets=data, device="cpu", run_dir=tmp_path / "run", progress=False, log=None
    )


register_model("test_rel_linear", task="classification", dataset="mnist", description="test")(
    lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
)


@pytest.mark.parametrize("shift, tiles", [(4, 1), (100, 1), (2, 2), (1, 3)])
def test_shift_augment_must_fit_the_images(tmp_path, shift, tiles):
    with pytest.raises(ValueError, match="shift_augment|shift_tiles"):
        trainer("test_rel_linear", quick(shift_augment=shift, shift_tiles=tiles), tiny_data(), tmp_path)


def test_shift_augment_that_fits_is_accepted(tmp_path):
    trainer("test_rel_linear", quick(shift_augment=3), tiny_data(), tmp_path)
    trainer("test_rel_linear", quick(shift_augment=1, shift_tiles=2), tiny_data(), tmp_path)


class NaNAfter(nn.Module):
    """A linear classifier whose training forward returns NaN from its ``after``-th call on."""

    def __init__(self, after: int, in_features: int = 16, classes: int = 3):
        super().__init__()
        self.linear = nn.Linear(in_features, classes)
        self.after, self.calls = after, 0

    def forward(self, x):
        out = self.linear(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls >= self.after:
                return out * NAN
        return out


register_model("test_rel_nan_at_1", task="classification", dataset="mnist", description="test")(
    lambda: NaNAfter(1)
)
register_model("test_rel_nan_at_5", task="classification", dataset="mnist", description="test")(
    lambda: NaNAfter(5)
)


def test_nan_loss_stops_the_run_naming_epoch_and_step(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 1 \(of 2\), optimizer step 1"):
        trainer("test_rel_nan_at_1", quick(), tiny_data(), tmp_path).fit()
    # 3 batches per epoch: the 5th forward is the 2nd batch of epoch 2, optimizer step 5.
    run = trainer("test_rel_nan_at_5", quick(), tiny_data(), tmp_path / "b")
    with pytest.raises(NonFiniteLossError, match=r"epoch 2 \(of 2\), optimizer step 5 \(batch 2 of 3"):
        run.fit()
    assert all(torch.isfinite(p).all() for p in run.model.parameters())  # the NaN step was not taken


def test_nan_loss_inside_an_accumulation_group(tmp_path):
    # grad_accum_steps=3: the NaN 2nd batch of epoch 2 is caught at the group's step (step 2).
    run = trainer("test_rel_nan_at_5", quick(grad_accum_steps=3), tiny_data(), tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2 \(of 2\), optimizer step 2 \(batch 3 of 3"):
        run.fit()


def test_nan_loss_under_ddp(tmp_path):
    """The ranks combine their flags before raising (one gloo rank here), so none waits forever."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        run = trainer("test_rel_nan_at_5", quick(), tiny_data(), tmp_path)
        assert run.ctx.enabled
        with pytest.raises(NonFiniteLossError, match=r"epoch 2 \(of 2\), optimizer step 5"):
            run.fit()
    finally:
        dist.destroy_process_group()


def test_nan_inputs_stop_the_run(tmp_path):
    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        trainer("test_rel_linear", quick(), tiny_data(nan_images=True), tmp_path).fit()


# ----------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def cli():
    parser = argparse.ArgumentParser(prog="fastvision")
    add_subcommands(parser.add_subparsers(dest="command", required=True))

    def run(*argv):
        args = parser.parse_args(list(argv))
        return run_command(args)

    return run


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--train-samples", "-5"], "train_samples"),
        (["--test-samples", "0"], "test_samples"),
        (["--lr", "inf"], "lr"),
        (["--weight-decay", "-1"], "weight_decay"),
        (["--warmup-epochs", "1e12"], "warmup_epochs"),
        (["--noise-sigma", "inf"], "noise_sigma"),
    ],
)
def test_cli_train_refuses_bad_values(cli, capsys, tmp_path, flags, field):
    code = cli("train", "test_rel_linear", "--device", "cpu", "--run-dir", str(tmp_path / "run"), *flags)
    err = capsys.readouterr().err
    assert code != 0 and field in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cli_train_with_a_diverging_model_exits_nonzero(cli, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("FASTVISION_DATA", raising=False)
    register_model("test_rel_cli_nan", task="classification", dataset="mnist", description="test")(
        lambda: NaNAfter(1, in_features=28 * 28, classes=10)
    )
    code = cli(
        "train", "test_rel_cli_nan", "--device", "cpu", "--run-dir", str(tmp_path / "run"), "--epochs", "1",
        "--train-samples", "16", "--val-samples", "8", "--test-samples", "8", "--batch-size", "8",
        "--no-progress", "--no-viz",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "loss became nan at epoch 1" in err


def test_cli_evaluate_refuses_zero_test_samples(cli, capsys, tmp_path):
    run = trainer("test_rel_linear", quick(epochs=1), tiny_data(), tmp_path)
    run.fit()
    code = cli("evaluate", "test_rel_linear", "--checkpoint", str(tmp_path / "run" / "best.pt"),
               "--device", "cpu", "--test-samples", "0")  # fmt: skip
    assert code != 0 and "test_samples must be >= 1" in capsys.readouterr().err

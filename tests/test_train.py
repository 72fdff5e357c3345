"""Tests for fastvision.train on tiny models and synthetic data (CPU, a few seconds in all)."""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from fastvision.cli import run_command
from fastvision.models import register_model
from fastvision.train import (
    ModelEMA,
    TrainConfig,
    Trainer,
    build_optimizer,
    build_scheduler,
    evaluate_checkpoint,
    get_task,
    load_checkpoint,
    psnr,
    restore_scheduler,
    save_checkpoint,
    ssim,
    train,
)
from fastvision.train.cli import add_subcommands

# ---------------------------------------------------------------------------------------- tiny models


class TinyClassifier(nn.Module):
    def __init__(self, log_probs: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 3))
        self.log_probs = log_probs

    def forward(self, x):
        scores = self.net(x)
        return F.log_softmax(scores, dim=1) if self.log_probs else scores


class TinySequenceModel(nn.Module):
    """Reads each 4x4 quadrant of an 8x8 image; teacher forcing mixes in the previous target."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 10)
        self.prev = nn.Embedding(11, 10)  # 10 = start token

    def quadrants(self, x):
        q = x[:, 0].unfold(1, 4, 4).unfold(2, 4, 4)  # [B, 2, 2, 4, 4]
        return q.reshape(x.shape[0], 4, 16)

    def forward(self, x, targets):
        start = torch.full_like(targets[:, :1], 10)
        previous = torch.cat([start, targets[:, :-1]], dim=1)
        return self.head(self.quadrants(x)) + self.prev(previous)

    @torch.no_grad()
    def generate(self, x):
        tokens = torch.full((x.shape[0], 1), 10, dtype=torch.long, device=x.device)
        features = self.head(self.quadrants(x))
        for position in range(4):
            step = features[:, position] + self.prev(tokens[:, -1])
            tokens = torch.cat([tokens, step.argmax(-1, keepdim=True)], dim=1)
        return tokens[:, 1:]


class TinyDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.drop = nn.Dropout(0.1)  # consumes RNG: exact resume must restore it

    def forward(self, x):
        out = x + self.conv(self.drop(x))
        self.aux_loss = self.conv.weight.pow(2).mean()
        return out


register_model("test_tiny_cls", task="classification", dataset="mnist", description="test")(TinyClassifier)
register_model("test_tiny_cls_logp", task="classification", dataset="mnist", description="test")(
    lambda: TinyClassifier(log_probs=True)
)
register_model("test_tiny_seq", task="digit_sequence", dataset="stacked_mnist", description="test")(
    TinySequenceModel
)
register_model("test_tiny_denoise", task="denoise", dataset="cifar10", description="test")(TinyDenoiser)


class Synthetic(Dataset):
    def __init__(self, images, targets, describe="synthetic"):
        self.images, self.targets, self.describe = images, targets, describe

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def classification_data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    images = torch.randn(n, 1, 8, 8, generator=g) * 0.3 + labels.view(-1, 1, 1, 1).float()
    return Synthetic(images, labels)


def sequence_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 10, (n, 4), generator=g)
    images = torch.randn(n, 1, 8, 8, generator=g)
    return Synthetic(images, targets)


def denoise_data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Synthetic(torch.rand(n, 3, 16, 16, generator=g), torch.zeros(n, dtype=torch.long))


def quick_config(**overrides):
    base = dict(epochs=2, batch_size=8, lr=1e-2, scheduler="none", ema_decay=0.0, val_fraction=0.25)
    return TrainConfig(**{**base, **overrides})


def make_trainer(model_name, data, tmp_path, cfg, **kwargs):
    kwargs.setdefault("run_dir", tmp_path / "run")
    return Trainer(model_name, cfg, datasets=data, device="cpu", progress=False, log=None, **kwargs)


# ---------------------------------------------------------------------------------------------- config


def test_config_from_yaml_flat_and_nested(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("batch_size: 512\ngrad_accum_steps: 4\nlr: 3e-4\nscheduler: onecycle\nmax_lr: 1e-3\n")
    cfg = TrainConfig.from_yaml(flat)
    assert (cfg.batch_size, cfg.grad_accum_steps, cfg.lr, cfg.max_lr) == (512, 4, 3e-4, 1e-3)
    nested = tmp_path / "nested.yaml"
    nested.write_text("training:\n  scheduler: plateau\n  lr_patience: 2\n")
    cfg = TrainConfig.from_yaml(nested, base=TrainConfig(epochs=3))
    assert (cfg.scheduler, cfg.lr_patience, cfg.epochs) == ("plateau", 2, 3)
    switches = tmp_path / "switches.yaml"
    switches.write_text("redraw_each_epoch: true\nshift_tiles: 2\n")
    cfg = TrainConfig.from_yaml(switches)
    assert (cfg.redraw_each_epoch, cfg.shift_tiles) == (True, 2)


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: 8\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown training config key.*learning_rate"):
        TrainConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="expects int"):
        TrainConfig.from_dict({"epochs": 1.5})
    with pytest.raises(ValueError, match="redraw_each_epoch.*expects bool"):
        TrainConfig.from_dict({"redraw_each_epoch": "yes"})
    with pytest.raises(ValueError, match="scheduler must be one of"):
        TrainConfig(scheduler="linear")
    with pytest.raises(ValueError, match="scheduler: none"):
        TrainConfig(optimizer="schedulefree", scheduler="cosine")


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        TrainConfig.from_yaml(path)


# ----------------------------------------------------------------------------------------- schedulers


def lr_trace(cfg, steps_per_epoch):
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    trace = []
    for _ in range(cfg.epochs * steps_per_epoch):
        trace.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return trace


def test_cosine_schedule_with_warmup():
    cfg = TrainConfig(epochs=10, lr=1e-3, lr_min=1e-5, scheduler="cosine", warmup_epochs=2)
    trace = lr_trace(cfg, steps_per_epoch=5)
    warmup, decay = trace[:10], trace[10:]
    assert warmup[0] == pytest.approx(1e-4) and warmup[-1] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(warmup, warmup[1:], strict=False))
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    mid = 10 + 20  # halfway through the decay
    assert trace[mid] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5), rel=1e-6)
    assert decay[-1] < 2e-5


def test_onecycle_schedule():
    cfg = TrainConfig(epochs=10, lr=1e-4, max_lr=1e-3, pct_start=0.3, lr_min=1e-6, scheduler="onecycle")
    trace = lr_trace(cfg, steps_per_epoch=10)
    assert trace[0] == pytest.approx(1e-4)
    peak = max(range(len(trace)), key=trace.__getitem__)
    assert trace[peak] == pytest.approx(1e-3) and 25 <= peak <= 32
    assert trace[-1] < 2e-6


def test_plateau_schedule():
    cfg = TrainConfig(lr=1e-3, scheduler="plateau", lr_patience=1, lr_factor=0.5, lr_min=3e-4)
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=10)
    lrs = []
    for val_loss in [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]:
        scheduler.step(val_loss)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 3e-4, 3e-4])


def test_none_schedule():
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    assert build_scheduler(optimizer, TrainConfig(scheduler="none"), 10) is None


def _stepped_scheduler(cfg, steps_per_epoch, steps):
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def _restored(cfg, steps_per_epoch, optimizer, scheduler):
    # The trainer's order: build both from the config, then load the optimizer, then the schedule.
    new_optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    new_scheduler = build_scheduler(new_optimizer, cfg, steps_per_epoch)
    new_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    restore_scheduler(new_scheduler, copy.deepcopy(scheduler.state_dict()))
    return new_optimizer, new_scheduler


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle"])
def test_restore_scheduler_same_config_continues_exactly(scheduler):
    cfg = TrainConfig(epochs=6, lr=1e-3, scheduler=scheduler, warmup_epochs=1, max_lr=2e-3)
    expected = lr_trace(cfg, steps_per_epoch=5)
    optimizer, sched = _stepped_scheduler(cfg, 5, steps=13)
    optimizer, sched = _restored(cfg, 5, optimizer, sched)
    resumed = []
    for _ in range(30 - 13):
        resumed.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    assert resumed == pytest.approx(expected[13:], rel=1e-12)


def test_restore_scheduler_follows_more_epochs():
    # A finished 4-epoch cosine run resumed with epochs=8 decays over the new length, not at lr 0.
    short, longer = (TrainConfig(epochs=e, lr=1e-3, scheduler="cosine", warmup_epochs=1) for e in (4, 8))
    optimizer, sched = _stepped_scheduler(short, 5, steps=20)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    optimizer, sched = _restored(longer, 5, optimizer, sched)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_trace(longer, 5)[20], rel=1e-12)
    assert optimizer.param_groups[0]["lr"] > 1e-4


def test_restore_onecycle_with_other_length_is_a_clear_error():
    short, longer = (TrainConfig(epochs=e, lr=1e-3, scheduler="onecycle") for e in (4, 8))
    optimizer, sched = _stepped_scheduler(short, 5, steps=7)
    with pytest.raises(ValueError, match="onecycle.*epochs"):
        _restored(longer, 5, optimizer, sched)


# ---------------------------------------------------------------------------------- loop mechanics


def captured_gradients(trainer):
    """Run one epoch, recording the (flattened) gradient and the weights at each optimizer step."""
    grads, weights = [], []
    original = trainer._optimizer_step

    def step():
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]).clone())
        weights.append(copy.deepcopy(trainer.model.state_dict()))
        original()

    trainer._optimizer_step = step
    trainer.train_one_epoch(0)
    return grads, weights


def test_grad_accumulation_matches_large_batch(tmp_path):
    data = (classification_data(16), classification_data(8, seed=1))
    cfg = quick_config(val_fraction=0.0, weight_decay=0.0)
    accumulated = make_trainer("test_tiny_cls", data, tmp_path, cfg.replace(batch_size=4, grad_accum_steps=4))
    large = make_trainer("test_tiny_cls", data, tmp_path, cfg.replace(batch_size=16))
    (grads_accumulated, _), (grads_large, _) = captured_gradients(accumulated), captured_gradients(large)
    assert len(grads_accumulated) == len(grads_large) == 1
    torch.testing.assert_close(grads_accumulated[0], grads_large[0], rtol=1e-5, atol=1e-7)
    for a, b in zip(accumulated.model.parameters(), large.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_grad_accumulation_flushes_leftover_batches(tmp_path):
    # 10 samples, batch 4, accumulate 2: batches of 4, 4, 2 -> one full step and one leftover step.
    data = (classification_data(10), classification_data(4, seed=1))
    cfg = quick_config(val_fraction=0.0, batch_size=4, grad_accum_steps=2)
    trainer = make_trainer("test_tiny_cls", data, tmp_path, cfg)
    order = [trainer.train_set.indices[i] for i in trainer.train_loader.sampler]
    grads, weights = captured_gradients(trainer)
    assert len(grads) == 2 and trainer.global_step == 2

    # Each step's gradient is the mean-loss gradient of exactly its own samples: for the leftover
    # group that is its 2 samples at full weight (not shrunk by 1/grad_accum_steps).
    for grad, state, samples in zip(grads, weights, (order[:8], order[8:]), strict=True):
        reference = TinyClassifier()
        reference.load_state_dict(state)
        loss = F.cross_entropy(reference(data[0].images[samples]), data[0].targets[samples])
        expected = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(reference.parameters()))])
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_ema_update_and_warmup():
    model = nn.Linear(2, 1)
    ema = ModelEMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    decay = 2 / 11  # warm-up: min(0.999, (1 + 1) / (10 + 1))
    # ema = d * old + (1 - d) * new, with old = new - 1
    torch.testing.assert_close(ema.module.weight, model.weight.detach() - decay)


def test_atomic_checkpoint_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"value": torch.tensor(1)}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"value": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["value"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


class Crash(Exception):
    pass


def test_exact_resume(tmp_path):
    """2 epochs straight == crash during epoch 2, then resume (cosine + warm-up, EMA, RNG-using task)."""
    data = (denoise_data(24), denoise_data(8, seed=1))
    cfg = quick_config(scheduler="cosine", warmup_epochs=0.5, ema_decay=0.9, grad_accum_steps=2, batch_size=4)
    straight = make_trainer("test_tiny_denoise", data, tmp_path, cfg, run_dir=tmp_path / "a")
    straight.fit()

    def crash_in_second_epoch(model, batch, outputs, epoch):
        if epoch == 1:
            raise Crash

    interrupted = make_trainer(
        "test_tiny_denoise", data, tmp_path, cfg, run_dir=tmp_path / "b", on_validation=crash_in_second_epoch
    )
    with pytest.raises(Crash):
        interrupted.fit()
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    resumed = make_trainer("test_tiny_denoise", data, tmp_path, cfg, run_dir=tmp_path / "b", resume=True)
    assert resumed.start_epoch == 0  # restored in fit()
    resumed.fit()

    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for key in ("model",):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), name
    for name in a["ema"]["module"]:
        assert torch.equal(a["ema"]["module"][name], b["ema"]["module"][name]), name
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == a["global_step"]
    metrics_a = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    metrics_b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics_b] == [1, 2]
    assert metrics_a[-1]["val_loss"] == metrics_b[-1]["val_loss"]
    with (tmp_path / "b" / "metrics.csv").open(newline="") as f:  # the crashed epoch's row is gone too
        rows = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert [float(row["val_loss"]) for row in rows] == [m["val_loss"] for m in metrics_b]
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["test_metrics"] == pytest.approx(
        json.loads((tmp_path / "a" / "summary.json").read_text())["test_metrics"]
    )


def tiny_digit_grids(n_digits=40, n_grids=48, seed=0):
    """4x4 "digits" whose pixels encode their label, composed into 8x8 grids for test_tiny_seq."""
    from fastvision.data import ImageTensorDataset, StackedDigits

    labels = torch.arange(n_digits) % 10
    images = (labels * 25).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    return StackedDigits(ImageTensorDataset(images, labels, describe="tiny digits"), n_grids, seed=seed)


def test_redraw_each_epoch_resumes_exactly(tmp_path):
    """Layouts redrawn per epoch depend on (seed, epoch) only, so a resumed run sees the same grids."""
    data = (tiny_digit_grids(), tiny_digit_grids(n_grids=16, seed=1))
    cfg = quick_config(redraw_each_epoch=True, shift_augment=1, shift_tiles=2, epochs=3)
    seen: dict[str, list[torch.Tensor]] = {"a": [], "b": []}  # the layout of each validated epoch
    trainers = {}

    def record(key):
        def hook(model, batch, outputs, epoch):
            seen[key].append(trainers[key].redraw_source.indices.clone())
            if key == "b" and epoch == 1 and len(seen["b"]) == 2:
                raise Crash

        return hook

    def start(key, **kwargs):
        trainers[key] = make_trainer(
            "test_tiny_seq", data, tmp_path, cfg, run_dir=tmp_path / key, on_validation=record(key), **kwargs
        )
        return trainers[key]

    start("a").fit()
    with pytest.raises(Crash):
        start("b").fit()
    start("b", resume=True).fit()  # repeats epoch 1, then runs epoch 2
    assert len(seen["a"]) == 3 and len(seen["b"]) == 4
    assert not torch.equal(seen["a"][0], seen["a"][1]) and not torch.equal(seen["a"][1], seen["a"][2])
    for a_layout, b_layout in zip(seen["a"], [seen["b"][0], seen["b"][2], seen["b"][3]], strict=True):
        assert torch.equal(a_layout, b_layout)
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_redraw_each_epoch_needs_a_composed_dataset(tmp_path):
    data = (classification_data(16), classification_data(8, seed=1))
    with pytest.raises(ValueError, match="redraw_each_epoch"):
        make_trainer("test_tiny_cls", data, tmp_path, quick_config(redraw_each_epoch=True))


def test_refuses_to_clobber_existing_run(tmp_path):
    data = (classification_data(16), classification_data(8, seed=1))
    make_trainer("test_tiny_cls", data, tmp_path, quick_config(epochs=1)).fit()
    with pytest.raises(FileExistsError, match="resume"):
        make_trainer("test_tiny_cls", data, tmp_path, quick_config(epochs=1))


# ----------------------------------------------------------------------------------------------- tasks


def test_classification_task_accepts_logits_and_log_probs():
    task = get_task("classification")
    logits_model, logp_model = TinyClassifier(), TinyClassifier(log_probs=True)
    logp_model.load_state_dict(logits_model.state_dict())
    batch = (classification_data(8).images, classification_data(8).targets)
    cfg = TrainConfig()
    a, b = task.train_step(logits_model, batch, cfg), task.train_step(logp_model, batch, cfg)
    torch.testing.assert_close(a.loss, b.loss)
    expected_correct = (logits_model(batch[0]).argmax(1) == batch[1]).sum()
    assert a.sums["accuracy"] == b.sums["accuracy"] == expected_correct and a.count == 8


def test_digit_sequence_metrics():
    class Fixed(nn.Module):
        def forward(self, x, targets):
            return F.one_hot(targets, 10).float() * 5

        def generate(self, x):
            return torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])

    targets = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    result = get_task("digit_sequence").eval_step(
        Fixed(), (torch.zeros(2, 1, 8, 8), targets), TrainConfig(), torch.Generator()
    )
    assert result.sums["digit_accuracy"].item() == pytest.approx(1 + 0.75)
    assert result.sums["grid_accuracy"].item() == 1
    assert result.sums["teacher_forced_digit_accuracy"].item() == pytest.approx(2)


def test_denoise_task_adds_aux_loss_and_reports_baseline():
    task, model = get_task("denoise"), TinyDenoiser().eval()
    cfg = TrainConfig(noise_sigma=0.2, aux_loss_weight=0.5)
    clean = denoise_data(4).images
    result = task.eval_step(model, (clean, None), cfg, torch.Generator().manual_seed(0))
    mse = result.sums["mse"] / 4
    torch.testing.assert_close(result.loss, mse.float() + 0.5 * model.aux_loss.detach())
    noisy = result.outputs["noisy"]
    torch.testing.assert_close(result.sums["noisy_psnr"], psnr(noisy, clean).sum())
    assert 5 < result.sums["noisy_psnr"].item() / 4 < 30


def test_image_metrics_behave():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 3, 24, 24, generator=g)
    slightly = (clean + 0.05 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    very = (clean + 0.3 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    assert torch.allclose(ssim(clean, clean), torch.ones(2))
    assert (ssim(slightly, clean) > ssim(very, clean)).all()
    assert (psnr(slightly, clean) > psnr(very, clean)).all()
    assert psnr(clean, clean + 0.1)[0].item() == pytest.approx(20.0, abs=1e-3)  # MSE 0.01 -> 20 dB


# -------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(
    ("model_name", "make_data", "monitor"),
    [
        ("test_tiny_cls_logp", classification_data, "accuracy"),
        ("test_tiny_seq", sequence_data, "grid_accuracy"),
        ("test_tiny_denoise", denoise_data, "psnr"),
    ],
)
def test_training_run_writes_metrics_checkpoints_and_summary(tmp_path, model_name, make_data, monitor):
    calls = []
    cfg = quick_config(scheduler="cosine", ema_decay=0.99, grad_clip=1.0)
    summary = train(
        model_name,
        cfg,
        datasets=(make_data(), make_data(seed=1)),
        device="cpu",
        run_dir=tmp_path / "run",
        progress=False,
        log=None,
        on_validation=lambda model, batch, outputs, epoch: calls.append(epoch),
    )
    run = tmp_path / "run"
    assert calls == [0, 1]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2] and f"val_{monitor}" in lines[0]
    with (run / "metrics.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(lines[0])
    assert float(table[1][f"val_{monitor}"]) == lines[1][f"val_{monitor}"]
    assert (run / "last.pt").exists() and (run / "best.pt").exists()
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["model"] == model_name and on_disk["dataset"]["train"].endswith(" samples of synthetic")
    assert monitor in on_disk["test_metrics"] and on_disk["device"] == "cpu"
    assert on_disk["test_metrics"] == pytest.approx(summary["test_metrics"])
    assert all(math.isfinite(v) for v in summary["test_metrics"].values())

    evaluated = evaluate_checkpoint(
        model_name, run / "best.pt", dataset=make_data(seed=1), device="cpu", progress=False
    )
    assert evaluated["test_metrics"] == pytest.approx(summary["test_metrics"])
    assert evaluated["weights"] == "ema"


def test_training_learns(tmp_path):
    cfg = quick_config(epochs=10, lr=1e-2, val_fraction=0.0)
    summary = train(
        "test_tiny_cls",
        cfg,
        datasets=(classification_data(96), classification_data(48, seed=1)),
        device="cpu",
        run_dir=tmp_path / "run",
        progress=False,
        log=None,
    )
    assert summary["test_metrics"]["accuracy"] > 0.9


def test_bf16_autocast_runs(tmp_path):
    data = (classification_data(16), classification_data(8, seed=1))
    summary = make_trainer("test_tiny_cls", data, tmp_path, quick_config(epochs=1, amp="bf16")).fit()
    assert math.isfinite(summary["test_metrics"]["loss"])


def test_single_process_ddp_with_gloo(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        data = (classification_data(16), classification_data(8, seed=1))
        trainer = make_trainer("test_tiny_cls", data, tmp_path, quick_config(epochs=1, grad_accum_steps=2))
        assert trainer.ctx.enabled and isinstance(trainer.ddp_model, nn.parallel.DistributedDataParallel)
        summary = trainer.fit()
        assert summary["world_size"] == 1 and (tmp_path / "run" / "summary.json").exists()
    finally:
        dist.destroy_process_group()


def test_cli_train_and_evaluate(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FASTVISION_DATA", raising=False)
    parser = argparse.ArgumentParser(prog="fastvision")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    register_model("test_cli_cls", task="classification", dataset="mnist", description="test")(
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    )
    config = tmp_path / "cfg.yaml"
    config.write_text("training:\n  lr: 1e-3\n  scheduler: none\n")
    run_dir = tmp_path / "run"
    args = parser.parse_args(
        ["train", "test_cli_cls", "--config", str(config), "--epochs", "1", "--device", "cpu",
         "--run-dir", str(run_dir), "--batch-size", "32", "--train-samples", "64", "--val-samples", "32",
         "--test-samples", "32", "--no-progress"]
    )  # fmt: skip
    assert run_command(args) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("\n{") + 1 :])  # epoch log lines, then the JSON result
    summary = json.loads((run_dir / "summary.json").read_text())
    assert printed["test_metrics"] == pytest.approx(summary["test_metrics"])
    assert summary["dataset"]["train"].startswith("64 samples of sklearn 8x8 digits upscaled")
    assert summary["dataset"]["val"].startswith("32 samples held out of sklearn")  # samples per split
    assert summary["config"]["lr"] == 1e-3 and summary["samples"] == {"train": 64, "val": 32, "test": 32}

    checkpoint = str(run_dir / "best.pt")
    args = parser.parse_args(["evaluate", "test_cli_cls", "--checkpoint", checkpoint, "--device", "cpu"])
    assert run_command(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 32 and result["test_metrics"] == pytest.approx(summary["test_metrics"])
    assert "figures" not in result

    figures = tmp_path / "figures"  # a model without attention_maps / embed: metrics, no figures
    args = parser.parse_args(
        ["evaluate", "test_cli_cls", "--checkpoint", checkpoint, "--device", "cpu", "--figures", str(figures)]
    )
    assert run_command(args) == 0
    assert json.loads(capsys.readouterr().out)["figures"] == []


def test_cli_augmentation_switches_override_model_defaults():
    from fastvision.train.cli import config_from_args

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers())

    def config_of(*flags):
        return config_from_args(parser.parse_args(["train", "digit_seq_transformer", *flags]))

    defaults = config_of()
    assert (defaults.shift_tiles, defaults.redraw_each_epoch) == (2, True)
    plain = config_of("--shift-tiles", "1", "--no-redraw-each-epoch")
    assert (plain.shift_tiles, plain.redraw_each_epoch) == (1, False)


def test_schedulefree_optimizer(tmp_path):
    pytest.importorskip("schedulefree")
    data = (classification_data(32), classification_data(8, seed=1))
    trainer = make_trainer("test_tiny_cls", data, tmp_path, quick_config(epochs=1, optimizer="schedulefree"))
    assert trainer.schedule_free and trainer.ema is None and trainer.scheduler is None
    assert math.isfinite(trainer.fit()["test_metrics"]["loss"])


def test_schedulefree_missing_package_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "schedulefree", None)  # makes `import schedulefree` fail
    with pytest.raises(RuntimeError, match="pip install schedulefree"):
        build_optimizer(TinyClassifier(), TrainConfig(optimizer="schedulefree", scheduler="none"))


def test_shift_augment_applies_to_training_batches_only():
    from fastvision.train.tasks import ClassificationTask

    class Recorder(torch.nn.Module):
        def forward(self, images):
            self.seen = images
            return torch.zeros(images.shape[0], 10, requires_grad=True)

    images, labels = torch.rand(8, 1, 12, 12) + 1.0, torch.zeros(8, dtype=torch.long)
    model, task = Recorder(), ClassificationTask()
    task.eval_step(model, (images, labels), TrainConfig(shift_augment=3), torch.Generator())
    assert torch.equal(model.seen, images)
    task.train_step(model, (images, labels), TrainConfig(shift_augment=0))
    assert torch.equal(model.seen, images)
    task.train_step(model, (images, labels), TrainConfig(shift_augment=3))
    assert model.seen.shape == images.shape
    assert (model.seen == 0).any()  # zero-filled borders appear once images move
    with pytest.raises(ValueError, match="shift_augment"):
        TrainConfig(shift_augment=-1)
    with pytest.raises(ValueError, match="shift_tiles"):
        TrainConfig(shift_tiles=0)

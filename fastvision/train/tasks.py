"""Tasks: how a batch becomes a loss and metrics, keyed by ``ModelSpec.task``.

* ``classification``: ``model(images)`` returns class scores ``[B, K]``, either logits (the ViT)
  or log-probabilities (the sparse U-Net's ``log_softmax``). Both go through ``cross_entropy``
  unchanged: log_softmax is idempotent, so CE(log_softmax(z)) == CE(z) and no flag is needed.
* ``digit_sequence``: ``model(images, targets)`` (teacher forcing) returns logits ``[B, 4, 10]``;
  validation also greedy-decodes with ``model.generate(images) -> [B, 4]``.
* ``denoise``: the model maps ``clamp(x + sigma * noise, 0, 1)`` back to ``x``; an optional tensor
  attribute ``model.aux_loss`` (set during forward, e.g. MoE load balancing) is added with
  ``aux_loss_weight``. Metrics include the noisy input's PSNR/SSIM as the do-nothing baseline.
* ``fcmae``: masked-image pretraining. A random patch mask of ``mask_ratio`` of the model's patch
  grid (``model.random_mask``) hides part of each image; ``model(images, mask, norm_pix_loss)``
  returns the loss on the masked pixels. Validation scores fixed masks (a fixed-seed generator)
  and reports the pixel MSE on masked pixels next to the mean-fill baseline (each masked pixel
  filled with the mean of its image's visible pixels).
* ``inr``: implicit representation by reconstruction. ``model(images, coords)`` decodes RGB
  ``[B, Q, C]`` at pixel-centre coordinates in ``[-1, 1]``; training scores ``query_samples`` random
  pixels per image (all when unset) by MSE, validation renders every pixel (``model(images)``,
  ``[B, C, H, W]``) and reports its PSNR/SSIM.

* ``detector_regression``: a batch ``(counts [B, S], params [B, 4], live [B, S])`` of the simulated
  detector; ``model(counts, live)`` predicts the standardised (E, x, y, z) mean and log-variance and
  ``model.regression_loss`` scores them (MSE, β-NLL or faithful). Metrics: the standardised MSE, the
  RMSE of each parameter in MeV / cm, and the share of targets inside the predicted ±1σ and ±2σ.
* ``detector_pretrain``: FCMAE-style masked pretraining on the same batches: ``mask_ratio`` of each
  face's live sensors are hidden (``model.random_mask``), ``model(counts, live, hidden)`` returns
  the loss on the hidden sensors. Validation (fixed masks) reports the hidden sensors' count MSE next
  to the average of their visible neighbours (``Detector.neighbour_average``).

Metrics are returned as per-batch *sums* (see ``MetricTracker``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastvision.data.augment import random_translate
from fastvision.train.config import TrainConfig
from fastvision.train.metrics import psnr, ssim


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying module of a DistributedDataParallel / compiled wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar to back-propagate (train) or report (eval)
    sums: dict[str, torch.Tensor]  # detached metric sums over the batch
    count: int  # samples in the batch
    outputs: Any = None  # model outputs, handed to the on_validation hook


def _augment(batch, cfg: TrainConfig):
    """``(images, labels)`` with the training-only augmentations of ``cfg`` applied to the images."""
    images, labels = batch
    return random_translate(images, cfg.shift_augment, tiles=cfg.shift_tiles), labels


class Task:
    name = ""
    monitor = "loss"  # validation metric that selects the best checkpoint
    monitor_mode = "min"
    shifts_images = False  # train_step applies cfg.shift_augment / shift_tiles to the images

    def train_step(self, model: nn.Module, batch, cfg: TrainConfig) -> StepResult:
        raise NotImplementedError

    def eval_step(self, model: nn.Module, batch, cfg: TrainConfig, generator: torch.Generator) -> StepResult:
        raise NotImplementedError


class ClassificationTask(Task):
    name = "classification"
    monitor, monitor_mode = "accuracy", "max"
    shifts_images = True

    def _step(self, model: nn.Module, batch) -> StepResult:
        images, labels = batch
        scores = model(images)
        loss = F.cross_entropy(scores.float(), labels)
        correct = (scores.argmax(dim=1) == labels).sum()
        n = labels.shape[0]
        return StepResult(loss, {"loss": loss.detach() * n, "accuracy": correct}, n, scores)

    def train_step(self, model, batch, cfg):
        return self._step(model, _augment(batch, cfg))

    def eval_step(self, model, batch, cfg, generator):
        return self._step(model, batch)


class DigitSequenceTask(Task):
    name = "digit_sequence"
    monitor, monitor_mode = "grid_accuracy", "max"
    shifts_images = True

    def _teacher_forced(self, model: nn.Module, batch):
        images, targets = batch
        logits = model(images, targets)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    def train_step(self, model, batch, cfg):
        targets = batch[1]
        logits, loss = self._teacher_forced(model, _augment(batch, cfg))
        n = targets.shape[0]
        correct = (logits.argmax(-1) == targets).float().mean(1).sum()
        return StepResult(loss, {"loss": loss.detach() * n, "digit_accuracy": correct}, n, logits)

    def eval_step(self, model, batch, cfg, generator):
        images, targets = batch
        logits, loss = self._teacher_forced(model, batch)
        predicted = unwrap(model).generate(images)  # greedy decoding: what inference actually does
        hits = predicted == targets
        n = targets.shape[0]
        sums = {
            "loss": loss.detach() * n,
            "teacher_forced_digit_accuracy": (logits.argmax(-1) == targets).float().mean(1).sum(),
            "digit_accuracy": hits.float().mean(1).sum(),
            "grid_accuracy": hits.all(1).sum(),
        }
        return StepResult(loss, sums, n, {"logits": logits, "predicted": predicted})


class DenoiseTask(Task):
    name = "denoise"
    monitor, monitor_mode = "psnr", "max"

    @staticmethod
    def _loss(model: nn.Module, clean: torch.Tensor, noisy: torch.Tensor, cfg: TrainConfig):
        denoised = model(noisy)
        mse = F.mse_loss(denoised.float(), clean.float())
        aux = getattr(unwrap(model), "aux_loss", None)
        loss = mse + cfg.aux_loss_weight * aux.float() if isinstance(aux, torch.Tensor) else mse
        return denoised, mse, loss

    def train_step(self, model, batch, cfg):
        clean = batch[0]
        noisy = (clean + cfg.noise_sigma * torch.randn_like(clean)).clamp_(0.0, 1.0)
        _, mse, loss = self._loss(model, clean, noisy, cfg)
        n = clean.shape[0]
        return StepResult(loss, {"loss": loss.detach() * n, "mse": mse.detach() * n}, n)

    def eval_step(self, model, batch, cfg, generator):
        clean = batch[0]
        # Validation noise comes from a fixed-seed generator so every epoch scores the same inputs.
        noise = torch.randn(clean.shape, generator=generator).to(clean.device, clean.dtype)
        noisy = (clean + cfg.noise_sigma * noise).clamp_(0.0, 1.0)
        denoised, mse, loss = self._loss(model, clean, noisy, cfg)
        output = denoised.float().clamp(0.0, 1.0)
        n = clean.shape[0]
        sums = {
            "loss": loss.detach() * n,
            "mse": mse.detach() * n,
            "psnr": psnr(output, clean).sum(),
            "ssim": ssim(output, clean).sum(),
            "noisy_psnr": psnr(noisy, clean).sum(),
            "noisy_ssim": ssim(noisy, clean).sum(),
        }
        return StepResult(loss, sums, n, {"noisy": noisy, "denoised": output})


def masked_pixel_mse(
    prediction: torch.Tensor, images: torch.Tensor, pixel_mask: torch.Tensor
) -> torch.Tensor:
    """Per-image mean squared error over the masked pixels ``pixel_mask [B, H, W]``: ``[B]``."""
    hidden = pixel_mask.unsqueeze(1).expand_as(images).to(torch.float32)
    error = (prediction.float() - images.float()).square() * hidden
    return error.flatten(1).sum(1) / hidden.flatten(1).sum(1).clamp_min(1.0)


def mean_fill(images: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """``images`` with every masked pixel set to the mean of its image's (and channel's) visible pixels."""
    visible = (~pixel_mask).unsqueeze(1).to(images.dtype)
    mean = (images * visible).sum((2, 3), keepdim=True) / visible.sum((2, 3), keepdim=True).clamp_min(1.0)
    return images * visible + mean * (1 - visible)


class FCMAETask(Task):
    name = "fcmae"
    monitor, monitor_mode = "loss", "min"

    @staticmethod
    def _run(model: nn.Module, images: torch.Tensor, cfg: TrainConfig, generator: torch.Generator | None):
        net = unwrap(model)
        if not hasattr(net, "random_mask"):
            raise ValueError(f"task 'fcmae' needs a model with random_mask(); {type(net).__name__} has none")
        mask = net.random_mask(images.shape[0], cfg.mask_ratio, generator=generator, device=images.device)
        return model(images, mask, norm_pix_loss=cfg.norm_pix_loss)

    def train_step(self, model, batch, cfg):
        out = self._run(model, batch[0], cfg, None)
        n = batch[0].shape[0]
        return StepResult(out.loss, {"loss": out.loss.detach() * n}, n)

    def eval_step(self, model, batch, cfg, generator):
        images = batch[0]
        out = self._run(model, images, cfg, generator)
        n, hidden = images.shape[0], out.pixel_mask
        sums = {
            "loss": out.loss.detach() * n,
            "masked_mse": masked_pixel_mse(out.prediction, images, hidden).sum(),
            "mean_fill_mse": masked_pixel_mse(mean_fill(images, hidden), images, hidden).sum(),
        }
        return StepResult(out.loss, sums, n, out)


class INRTask(Task):
    name = "inr"
    monitor, monitor_mode = "psnr", "max"

    def train_step(self, model, batch, cfg):
        from fastvision.nn.inr import coordinate_grid

        images = batch[0]
        n, channels, height, width = images.shape
        coords = coordinate_grid(height, width, device=images.device).expand(n, -1, -1)
        pixels = images.flatten(2).transpose(1, 2)  # [B, H * W, C], the grid's order
        if cfg.query_samples is not None and cfg.query_samples < height * width:
            order = torch.rand(n, height * width, device=images.device).argsort(dim=1)
            chosen = order[:, : cfg.query_samples]
            coords = coords.gather(1, chosen[..., None].expand(-1, -1, 2))
            pixels = pixels.gather(1, chosen[..., None].expand(-1, -1, channels))
        predicted = model(images, coords)
        loss = F.mse_loss(predicted.float(), pixels.float())
        return StepResult(loss, {"loss": loss.detach() * n, "mse": loss.detach() * n}, n)

    def eval_step(self, model, batch, cfg, generator):
        images = batch[0]
        rendered = model(images).float()
        loss = F.mse_loss(rendered, images.float())
        output = rendered.clamp(0.0, 1.0)
        n = images.shape[0]
        sums = {
            "loss": loss.detach() * n,
            "psnr": psnr(output, images).sum(),
            "ssim": ssim(output, images).sum(),
        }
        return StepResult(loss, sums, n, {"reconstruction": output})


class DetectorRegressionTask(Task):
    name = "detector_regression"
    monitor, monitor_mode = "mse", "min"

    def _step(self, model: nn.Module, batch) -> StepResult:
        counts, params, live = batch
        net = unwrap(model)
        out = model(counts, live)
        loss = net.regression_loss(out, params)
        target = net.standardize(params)
        err = (out.mu.detach().float() - target).square()
        z = (out.mu.detach().float() - target).abs() * torch.exp(-0.5 * out.log_var.detach().float())
        n = counts.shape[0]
        sums = {"loss": loss.detach() * n, "mse": err.mean(1).sum()}
        physical = err * net.target_scale.square()
        for i, label in enumerate(("energy", "x", "y", "z")):
            sums[f"{label}_sq_err"] = physical[:, i].sum()  # mean: MSE in MeV^2 / cm^2
        sums["within_1sigma"] = (z <= 1.0).float().mean(1).sum()
        sums["within_2sigma"] = (z <= 2.0).float().mean(1).sum()
        return StepResult(loss, sums, n, out)

    def train_step(self, model, batch, cfg):
        return self._step(model, batch)

    def eval_step(self, model, batch, cfg, generator):
        return self._step(model, batch)


class DetectorPretrainTask(Task):
    name = "detector_pretrain"
    monitor, monitor_mode = "loss", "min"

    @staticmethod
    def _run(model: nn.Module, batch, cfg: TrainConfig, generator: torch.Generator | None):
        counts, _, live = batch
        hidden = unwrap(model).random_mask(live, cfg.mask_ratio, generator=generator)
        return model(counts, live, hidden)

    def train_step(self, model, batch, cfg):
        out = self._run(model, batch, cfg, None)
        n = batch[0].shape[0]
        return StepResult(out.loss, {"loss": out.loss.detach() * n}, n)

    def eval_step(self, model, batch, cfg, generator):
        counts, _, live = batch
        out = self._run(model, batch, cfg, generator)
        hidden = out.hidden
        detector = unwrap(model).detector
        baseline = detector.neighbour_average(counts, live & ~hidden)
        weight = hidden.float()
        per_event = weight.sum(1).clamp_min(1.0)
        n = counts.shape[0]
        sums = {
            "loss": out.loss.detach() * n,
            "masked_mse": (((out.mean.float() - counts).square() * weight).sum(1) / per_event).sum(),
            "neighbour_mse": (((baseline - counts).square() * weight).sum(1) / per_event).sum(),
        }
        return StepResult(out.loss, sums, n, out)


TASKS: dict[str, type[Task]] = {
    t.name: t
    for t in (
        ClassificationTask,
        DigitSequenceTask,
        DenoiseTask,
        FCMAETask,
        INRTask,
        DetectorRegressionTask,
        DetectorPretrainTask,
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}") from None

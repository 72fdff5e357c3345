"""Optimizers and learning-rate schedules built from a ``TrainConfig``."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastvision.train.config import TrainConfig

PER_STEP_SCHEDULERS = ("cosine", "onecycle")  # stepped after every optimizer step; plateau steps per epoch


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only weight matrices/kernels: decaying biases and norm gains just fights the normalisation."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    try:
        import schedulefree
    except ImportError:
        raise RuntimeError(
            "optimizer 'schedulefree' needs the schedulefree package: pip install schedulefree"
        ) from None
    return schedulefree.AdamWScheduleFree(groups, lr=cfg.lr)


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    # Schedule-free optimizers must be switched with .train()/.eval() around training and evaluation.
    return hasattr(optimizer, "train") and hasattr(optimizer, "eval") and callable(optimizer.eval)


class WarmupCosine:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``floor`` at ``total_steps``.

    A picklable object rather than a closure so ``LambdaLR.state_dict`` records its settings.
    """

    def __init__(self, warmup_steps: int, total_steps: int, floor: float):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.floor = floor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def restore_scheduler(scheduler, state: dict) -> None:
    """Load a checkpointed scheduler ``state`` into ``scheduler`` built from the current config.

    Only the step count carries over for the warm-up/cosine schedule: its shape comes from the
    current config, so a run resumed with more ``epochs`` keeps decaying towards the new end
    instead of sitting at the old schedule's final LR. With an unchanged config the LR is the one
    the interrupted run would have used next. A one-cycle schedule cannot be stretched mid-run.
    """
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        state = {k: v for k, v in state.items() if k not in ("base_lrs", "_last_lr")}
        state["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)  # keep the current config's schedule
        scheduler.load_state_dict(state)
        groups = scheduler.optimizer.param_groups
        for group, base_lr, schedule in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            group["lr"] = base_lr * schedule(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in groups]
        return
    one_cycle = isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
    if one_cycle and state["total_steps"] != scheduler.total_steps:
        raise ValueError(
            f"cannot resume a onecycle schedule of {state['total_steps']} steps as one of "
            f"{scheduler.total_steps}: keep `epochs` (and the batch settings) of the interrupted run"
        )
    scheduler.load_state_dict(state)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """The configured schedule, or None. ``steps_per_epoch`` counts optimizer steps, not batches."""
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    if cfg.scheduler == "cosine":
        warmup_steps = min(total_steps - 1, round(cfg.warmup_epochs * steps_per_epoch))
        schedule = WarmupCosine(warmup_steps, total_steps, floor=cfg.lr_min / cfg.lr)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if cfg.scheduler == "onecycle":
        # The seed's convention: `lr` is the starting LR and `max_lr` the peak (defaults to lr).
        max_lr = cfg.max_lr or cfg.lr
        div_factor = max_lr / cfg.lr if max_lr > cfg.lr else 25.0
        start_lr = max_lr / div_factor
        final_div_factor = start_lr / cfg.lr_min if cfg.lr_min > 0 else 1e4
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=max_lr,
            total_steps=total_steps,
            pct_start=cfg.pct_start,
            div_factor=div_factor,
            final_div_factor=final_div_factor,
        )
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.lr_min
        )
    return None

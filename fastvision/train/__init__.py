"""Training: ``TrainConfig``, ``train``/``Trainer``, ``evaluate_checkpoint`` and the task definitions."""

from fastvision.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastvision.train.config import TrainConfig
from fastvision.train.ema import ModelEMA
from fastvision.train.metrics import MetricTracker, psnr, ssim
from fastvision.train.optim import build_optimizer, build_scheduler, restore_scheduler
from fastvision.train.tasks import TASKS, Task, get_task
from fastvision.train.trainer import (
    NonFiniteLossError,
    Trainer,
    evaluate_checkpoint,
    resolve_config,
    run_evaluation,
    train,
)

__all__ = [
    "TASKS",
    "CheckpointError",
    "MetricTracker",
    "ModelEMA",
    "NonFiniteLossError",
    "Task",
    "TrainConfig",
    "Trainer",
    "build_optimizer",
    "build_scheduler",
    "restore_scheduler",
    "evaluate_checkpoint",
    "get_task",
    "load_checkpoint",
    "psnr",
    "resolve_config",
    "run_evaluation",
    "save_checkpoint",
    "ssim",
    "train",
]

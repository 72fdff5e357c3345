"""The training loop: ``train(model_name, cfg, ...)`` and ``evaluate_checkpoint(...)``.

A run directory holds ``metrics.jsonl`` (one line per epoch, also as the table ``metrics.csv``),
``last.pt`` / ``best.pt`` and ``summary.json`` (final test metrics). Only rank 0 writes.

Checkpoints are written atomically with a SHA-256 digest (``fastvision.train.checkpoint``). On an
improving epoch ``last.pt`` is written first and records ``best_epoch``; ``best.pt`` is then a
byte-identical copy. A kill between the two leaves a ``last.pt`` whose ``best_epoch`` is its own
epoch, and resuming rewrites ``best.pt`` from it, so the pair always agrees: ``best.pt`` holds the
epoch ``last.pt`` names as best.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler, Subset
from tqdm.auto import tqdm

from fastvision.models import create_model, get_model_spec
from fastvision.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    copy_checkpoint,
    encode_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
    write_atomic,
)
from fastvision.train.config import TrainConfig
from fastvision.train.distributed import DistContext, resolve_device, setup_distributed
from fastvision.train.ema import ModelEMA
from fastvision.train.metrics import MetricTracker
from fastvision.train.optim import (
    PER_STEP_SCHEDULERS,
    build_optimizer,
    build_scheduler,
    is_schedule_free,
    restore_scheduler,
)
from fastvision.train.tasks import Task, get_task

ValidationHook = Callable[[nn.Module, Any, Any, int], None]

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
METRICS_FILE = "metrics.jsonl"
METRICS_CSV = "metrics.csv"  # rewritten from METRICS_FILE after every change, for spreadsheets
SUMMARY_FILE = "summary.json"
# Keys a checkpoint must hold to resume a run, and to evaluate its weights.
RESUME_KEYS = (
    "model_name", "task", "epoch", "global_step", "model", "ema", "optimizer", "scheduler", "scaler",
    "best_score", "best_epoch", "rng", "config", "wall_time_s",
)  # fmt: skip
WEIGHTS_KEYS = ("model_name", "epoch", "model", "ema", "config")


def check_model_task(model: nn.Module, model_name: str, own_task: str, task: str) -> None:
    """A task other than the model's own needs the model to list it in its ``tasks`` attribute."""
    supported = tuple(getattr(model, "tasks", (own_task,)))
    if task not in supported:
        raise ValueError(
            f"model {model_name!r} cannot train on task {task!r}; its tasks: {', '.join(supported)}"
        )


def check_model_name(state: dict[str, Any], path: str | Path, model_name: str) -> None:
    if state["model_name"] != model_name:
        saved = state["model_name"]
        shown = saved if isinstance(saved, str) else type(saved).__name__
        raise CheckpointError(path, f"is a checkpoint of {shown!r}, not {model_name!r}")


def check_counters(state: dict[str, Any], path: str | Path) -> None:
    """The counters a checkpoint stores have their types and ranges (a crafted or foreign file
    could hold a string epoch, a negative step, a best epoch after the last)."""

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    epoch = state["epoch"]
    if not integer(epoch):
        shown = f"{type(epoch).__name__} {epoch!r:.40}"
        raise CheckpointError(path, f"its 'epoch' must be a non-negative integer, got {shown}")
    checks = [
        ("global_step", integer, "a non-negative integer"),
        ("best_epoch", lambda v: v is None or (integer(v) and v <= epoch), f"empty or an integer <= {epoch}"),
        ("best_score", lambda v: v is None or number(v), "empty or a number"),
        ("wall_time_s", lambda v: number(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ]
    for key, ok, rule in checks:
        if key in state and not ok(state[key]):
            value = state[key]
            shown = f"{type(value).__name__} {value!r:.40}"
            raise CheckpointError(path, f"its {key!r} must be {rule}, got {shown}")


def checkpoint_config(state: dict[str, Any], path: str | Path) -> TrainConfig:
    """The training config a checkpoint stores, validated like a config file."""
    values = state["config"]
    if not isinstance(values, dict):
        shown = type(values).__name__
        raise CheckpointError(path, f"its 'config' is a {shown}, not a mapping of training options")
    try:
        return TrainConfig.from_dict(values)
    except (ValueError, TypeError) as error:
        raise CheckpointError(path, f"its stored training config is unusable: {error}") from None


def init_weights(model: nn.Module, path: str | Path, device: torch.device) -> str:
    """Load the weights of a verified checkpoint of the same architecture into ``model``: the EMA
    weights when the checkpoint has them (those validation selected), else the live ones.
    Returns a one-line description of what was loaded."""
    state = load_checkpoint(path, map_location=device, required=WEIGHTS_KEYS)
    use_ema = state["ema"] is not None
    what = "the EMA weights" if use_ema else "the weights"
    load_weights(model, _weights_of(state, path, use_ema), path, what)
    kind = "EMA" if use_ema else "live"
    task = state.get("task", "?")
    return f"{path} ({state['model_name']}, task {task}, epoch {state['epoch']}, {kind} weights)"


def _weights_of(state: dict[str, Any], path: str | Path, use_ema: bool) -> Any:
    """The state dict a checkpoint holds for the live (or the EMA) weights, checked to be one."""
    if use_ema:
        ema = state["ema"]
        if not isinstance(ema, dict) or not isinstance(ema.get("module"), dict):
            raise CheckpointError(path, "its 'ema' field is not an EMA state (a mapping with 'module')")
        return ema["module"]
    if not isinstance(state["model"], dict):
        raise CheckpointError(path, f"its 'model' field is a {type(state['model']).__name__}, not weights")
    return state["model"]


def load_weights(model: nn.Module, weights: Any, path: str | Path, what: str = "the weights") -> None:
    """``model.load_state_dict(weights)``, where a mismatch (missing, unexpected or wrong-shape
    tensors) is one :class:`CheckpointError` line naming the file and the first few differences."""
    if not isinstance(weights, dict):
        raise CheckpointError(path, f"{what} are a {type(weights).__name__}, not a state dict")
    expected = model.state_dict()
    problems = [f"missing {key!r}" for key in expected if key not in weights]
    problems += [f"unexpected {key!r}" for key in weights if key not in expected]
    for key, tensor in expected.items():
        value = weights.get(key)
        if key not in weights:
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key!r} is a {type(value).__name__}, not a tensor")
        elif value.shape != tensor.shape:
            problems.append(f"{key!r} has shape {tuple(value.shape)}, the model's is {tuple(tensor.shape)}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise CheckpointError(path, f"{what} do not fit this model ({type(model).__name__}): {shown}")
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(path, f"{what} cannot be loaded: {first}") from None


class RunExistsError(FileExistsError):
    """The run folder already holds a run (or parts of one) and neither resuming nor overwriting it
    was asked for, or resuming was asked for but there is no ``last.pt`` to resume from."""

    def __init__(self, run_dir: Path, contents: list[str], resume_asked: bool):
        self.run_dir, self.contents, self.resume_asked = run_dir, contents, resume_asked
        super().__init__(self.describe(cli=False))

    def describe(self, cli: bool) -> str:
        resume, overwrite = ("--resume", "--overwrite") if cli else ("resume=True", "overwrite=True")
        run_dir = "--run-dir" if cli else "run_dir"
        held = ", ".join(self.contents)
        if self.resume_asked:
            return (
                f"{self.run_dir} holds {held} but no {LAST_CHECKPOINT} to resume from; starting over would "
                f"replace them: pass {overwrite} to start over, restore {LAST_CHECKPOINT}, or choose another "
                f"{run_dir}"
            )
        return (
            f"{self.run_dir} already holds a run ({held}); pass {resume} to continue it, {overwrite} to "
            f"start over, or choose another {run_dir}"
        )


def run_contents(run_dir: Path) -> list[str]:
    """What of a run a folder holds: its checkpoints (with their epochs), metrics and summary."""
    held = []
    for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):
        path = run_dir / name
        if path.is_symlink() and not path.exists():
            held.append(f"{name} (a dangling symbolic link to {os.readlink(path)})")
        elif path.is_dir():
            held.append(f"{name} (a directory)")
        elif path.exists():
            try:
                epoch = load_checkpoint(path, required=("epoch",))["epoch"]
                held.append(f"{name} (epoch {epoch})")
            except (CheckpointError, OSError):
                held.append(f"{name} (unreadable)")
    for name in (METRICS_FILE, SUMMARY_FILE):
        if (run_dir / name).exists():
            held.append(name)
    return held


def ensure_writable_dir(path: Path, what: str = "run folder") -> None:
    """Create ``path`` (and its parents) and check that files can be written in it; any problem is
    one ``OSError`` naming the folder (a regular file in the way, no permission, a full disk)."""
    for parent in (path, *path.parents):
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise NotADirectoryError(
                    errno.ENOTDIR, f"cannot create the {what} {path}: {parent} is a file, not a folder"
                )
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise type(error)(error.errno, f"cannot write in the {what} {path}: {error.strerror}") from None


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The records of a ``metrics.jsonl`` and whether its last line was torn (a write cut short by a
    kill: it is dropped). A damaged line elsewhere is a ``ValueError`` naming file and line."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records, torn = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise ValueError("not an epoch record")
        except ValueError as error:
            if all(not rest.strip() for rest in lines[number:]):
                torn = True  # the last line: a partial write
                break
            raise ValueError(f"{path}: line {number} is not a metrics record ({error})") from None
        records.append(record)
    return records, torn


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stops instead of training on garbage."""


def describe(dataset: Dataset) -> str:
    """The ``describe`` string of a dataset, looking through ``Subset`` wrappers."""
    while isinstance(dataset, Subset) and not hasattr(dataset, "describe"):
        dataset = dataset.dataset
    return getattr(dataset, "describe", type(dataset).__name__)


def resolve_config(model_name: str, config_file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults ← the model's ``train_defaults`` ← YAML file ← explicit overrides (None = not given)."""
    values = TrainConfig.coerce_values(get_model_spec(model_name).train_defaults)
    if config_file is not None:
        values.update(TrainConfig.read_yaml(config_file))
    values.update(TrainConfig.coerce_values({k: v for k, v in overrides.items() if v is not None}))
    return TrainConfig(**values)  # validated once, as a whole


def split_train_val(
    train_set: Dataset, test_set: Dataset, cfg: TrainConfig
) -> tuple[Dataset, Dataset, Dataset]:
    """Hold out ``val_fraction`` of the train split (fixed by ``seed``) and apply the sample caps.

    With ``val_fraction == 0`` the test split doubles as validation set. A dataset with
    ``split_holdout`` (grids of digits) splits itself, so that validation items share no digit
    with training items.
    """
    if cfg.val_fraction > 0 and hasattr(train_set, "split_holdout"):
        train_source, val_source = train_set.split_holdout(cfg.val_fraction, cfg.seed)
        train_idx, val_idx = list(range(len(train_source))), list(range(len(val_source)))
    else:
        train_source = val_source = train_set
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_val = int(round(len(order) * cfg.val_fraction))
        train_idx, val_idx = order[n_val:], order[:n_val]
    if cfg.train_samples is not None:
        train_idx = train_idx[: cfg.train_samples]
    train = Subset(train_source, train_idx)
    val: Dataset = Subset(val_source, val_idx) if val_idx else test_set
    if cfg.val_samples is not None and len(val) > cfg.val_samples:
        val = Subset(val, range(cfg.val_samples))
    test = test_set
    if cfg.test_samples is not None and len(test) > cfg.test_samples:
        test = Subset(test, range(cfg.test_samples))
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"empty split: {len(train)} train / {len(val)} validation samples")
    return train, val, test


def _composition_base(dataset: Dataset) -> Dataset:
    """The dataset under any ``Subset`` wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _composition_source(dataset: Dataset) -> Dataset:
    """The dataset under any ``Subset`` wrappers, which must redraw its composition per epoch."""
    source = dataset
    while isinstance(source, Subset):
        source = source.dataset
    if not hasattr(source, "set_epoch"):
        raise ValueError(
            f"redraw_each_epoch needs a training set composed from a seeded draw (2x2 digit grids); "
            f"{type(source).__name__} has a fixed composition"
        )
    return source


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(item, device) for item in batch)
    return batch


def _loader(
    dataset: Dataset, cfg: TrainConfig, ctx: DistContext, device: torch.device, train: bool
) -> DataLoader:
    if train or ctx.enabled:
        # DistributedSampler also serves the single-process case: its order depends only on
        # (seed, epoch), which is what makes a resumed run reshuffle exactly like an uninterrupted one.
        # (For evaluation across ranks it pads with a few repeated samples; a negligible bias.)
        sampler = DistributedSampler(
            dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=train, seed=cfg.seed, drop_last=False
        )
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        # Workers copy the dataset when they start; a layout redrawn per epoch needs fresh workers.
        persistent_workers=cfg.num_workers > 0 and not (train and cfg.redraw_each_epoch),
    )


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def run_evaluation(
    model: nn.Module,
    loader: DataLoader,
    task: Task,
    cfg: TrainConfig,
    device: torch.device,
    ctx: DistContext | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> tuple[dict[str, float], Any, Any]:
    """Mean metrics over ``loader`` (all ranks combined), plus the first batch and its outputs."""
    ctx = ctx or DistContext()
    model.eval()
    tracker = MetricTracker()
    # Same generator seed on every call: the denoise task scores identical noisy inputs each epoch.
    generator = torch.Generator().manual_seed(cfg.seed + 1_000_003 * (ctx.rank + 1))
    first_batch = first_outputs = None
    for batch in tqdm(loader, desc=desc, leave=False, disable=not (progress and ctx.is_main)):
        batch = _to_device(batch, device)
        with _autocast(cfg, device):
            result = task.eval_step(model, batch, cfg, generator)
        tracker.update(result.sums, result.count)
        if first_batch is None:
            first_batch, first_outputs = batch, result.outputs
    tracker.all_reduce()
    return tracker.compute(), first_batch, first_outputs


class Trainer:
    """One training run of a registered model. ``fit()`` trains, tests and returns the summary."""

    def __init__(
        self,
        model_name: str,
        cfg: TrainConfig,
        *,
        data_dir: str | Path | None = None,
        device: str = "auto",
        run_dir: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        on_validation: ValidationHook | None = None,
        datasets: tuple[Dataset, Dataset] | None = None,
        progress: bool = True,
        log: Callable[[str], None] | None = print,
    ):
        self.model_name = model_name
        self.spec = get_model_spec(model_name)
        self.task_name = cfg.task or self.spec.task
        self.task = get_task(self.task_name)
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else Path("runs") / model_name
        self.resume = resume
        self.on_validation = on_validation
        self.progress = progress
        self.ctx, self.device = setup_distributed(device)
        self._log = log if self.ctx.is_main else None

        if datasets is None:  # first: a wrong data folder is reported before anything about the run folder
            from fastvision.data import build_dataset

            datasets = (
                build_dataset(self.spec.dataset, "train", data_dir, seed=cfg.seed),
                build_dataset(self.spec.dataset, "test", data_dir, seed=cfg.seed),
            )
        self.train_set, self.val_set, self.test_set = split_train_val(*datasets, cfg)
        if cfg.shift_augment > 0 and self.task.shifts_images:
            image = self.train_set[0][0]
            cfg.validate_for_images(image.shape[-2], image.shape[-1])
        self._check_run_dir(resume, overwrite)
        self.redraw_source = _composition_source(self.train_set) if cfg.redraw_each_epoch else None
        # Per split, the samples it actually uses (after the caps) and where they come from.
        redrawn = ", redrawn every epoch" if cfg.redraw_each_epoch else ""
        val_from_test = _composition_base(self.val_set) is _composition_base(datasets[1])
        self.dataset_description = {
            "train": f"{len(self.train_set)} samples of {describe(self.train_set)}{redrawn}",
            "val": f"{len(self.val_set)} samples "
            + ("of the test split (nothing held out for validation): " if val_from_test else "held out of ")
            + describe(self.val_set),
            "test": f"{len(self.test_set)} samples of {describe(self.test_set)}",
        }

        # Same seed on every rank for identical initial weights; then per-rank streams for noise/dropout.
        torch.manual_seed(cfg.seed)
        self.model = create_model(model_name).to(self.device)
        check_model_task(self.model, model_name, self.spec.task, self.task_name)
        if cfg.init_from is not None and not (resume and (self.run_dir / LAST_CHECKPOINT).exists()):
            # A resumed run restores its own weights; only a fresh start begins from init_from.
            self.log(f"initialised from {init_weights(self.model, cfg.init_from, self.device)}")
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        torch.manual_seed(cfg.seed + self.ctx.rank)

        self.optimizer = build_optimizer(self.model, cfg)
        self.schedule_free = is_schedule_free(self.optimizer)
        use_ema = cfg.ema_decay > 0 and not self.schedule_free
        self.ema = ModelEMA(self.model, cfg.ema_decay) if use_ema else None
        if cfg.ema_decay > 0 and self.schedule_free:
            self.log("note: EMA disabled with schedulefree (it already evaluates an averaged iterate)")
        self.train_loader = _loader(self.train_set, cfg, self.ctx, self.device, train=True)
        self.val_loader = _loader(self.val_set, cfg, self.ctx, self.device, train=False)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum_steps)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.ddp_model: nn.Module = (
            DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # A model serving several tasks (an FCMAE decoder beside a classifier head) leaves
                # some parameters without a gradient in each of them.
                find_unused_parameters=len(getattr(self.model, "tasks", ())) > 1,
            )
            if self.ctx.enabled
            else self.model
        )

        self.start_epoch = 0
        self.global_step = 0
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.elapsed_before = 0.0  # wall time of earlier (interrupted) sessions of this run

    # ----------------------------------------------------------------------------------------- utils
    def _check_run_dir(self, resume: bool, overwrite: bool) -> None:
        """Refuse to replace a run's weights unless asked: a run folder with a checkpoint needs
        ``overwrite``, or ``resume`` with a usable ``last.pt`` (a best.pt alone is not resumable)."""
        if overwrite or not self.run_dir.is_dir():
            return
        last = self.run_dir / LAST_CHECKPOINT
        if resume and last.is_symlink() and not last.exists():
            raise CheckpointError(
                last, f"is a dangling symbolic link (to {os.readlink(last)}); restore it, or start over"
            )
        if resume and last.exists():
            return
        contents = run_contents(self.run_dir)
        # Weights are what a fresh start would lose; metric lines without a checkpoint belong to
        # epochs that a resume would re-run anyway.
        if any(item.startswith((LAST_CHECKPOINT, BEST_CHECKPOINT)) for item in contents):
            raise RunExistsError(self.run_dir, contents, resume_asked=resume)

    def log(self, message: str) -> None:
        if self._log is not None:
            self._log(message)

    @property
    def eval_model(self) -> nn.Module:
        """The weights validation uses: the EMA copy when enabled, else the live model."""
        return self.ema.module if self.ema is not None else self.model

    def _is_better(self, score: float) -> bool:
        if self.best_score is None or math.isnan(self.best_score):
            return not math.isnan(score)
        return score > self.best_score if self.task.monitor_mode == "max" else score < self.best_score

    def _current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ---------------------------------------------------------------------------------- checkpoints
    def _state(self, epoch: int, elapsed: float) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "task": self.task_name,
            "epoch": epoch,  # number of completed epochs
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "rng": capture_rng_state(),
            "config": self.cfg.to_dict(),
            "dataset": self.dataset_description,
            "wall_time_s": elapsed,
        }

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device, required=RESUME_KEYS)
        check_model_name(state, path, self.model_name)
        check_counters(state, path)
        saved_cfg = checkpoint_config(state, path)
        changed = {k for k, v in saved_cfg.to_dict().items() if getattr(self.cfg, k, None) != v}
        if changed:
            self.log(f"note: resuming with changed config keys: {', '.join(sorted(changed))}")
        load_weights(self.model, _weights_of(state, path, use_ema=False), path)
        if self.ema is not None and state["ema"] is not None:
            load_weights(self.ema.module, _weights_of(state, path, use_ema=True), path, "the EMA weights")
        part = "state"
        try:
            part = "optimizer state"
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None and state["ema"] is not None:
                part = "EMA state"
                self.ema.load_state_dict(state["ema"])
            if self.scheduler is not None and state["scheduler"] is not None:
                part = "scheduler state"
                restore_scheduler(self.scheduler, state["scheduler"])
            part = "gradient-scaler state"
            self.scaler.load_state_dict(state["scaler"])
            part = "random-number generator state"
            restore_rng_state(state["rng"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(path, f"its {part} is unusable ({type(error).__name__}: {first})") from None
        self.start_epoch = state["epoch"]
        self.global_step = state["global_step"]
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.elapsed_before = float(state["wall_time_s"])
        if self.ctx.rank > 0:  # rank 0's streams were saved; keep the other ranks' noise distinct
            torch.manual_seed(self.cfg.seed + self.ctx.rank + 7919 * self.start_epoch)
        self._truncate_metrics(self.start_epoch)
        if self.ctx.is_main:
            self._reconcile_best(path)
        self.log(f"resumed {path} after epoch {self.start_epoch}")

    def _reconcile_best(self, last_path: Path) -> None:
        """Make ``best.pt`` hold the epoch ``last.pt`` records as best (see the module docstring)."""
        best_path = self.run_dir / BEST_CHECKPOINT
        remove_stale_temporaries(best_path)
        if self.best_epoch is None:  # no epoch has scored yet: a best.pt is from elsewhere
            best_path.unlink(missing_ok=True)
            return
        problem = None
        if not best_path.exists():
            problem = "is missing"
        else:
            try:
                held = load_checkpoint(best_path, required=("epoch", "model_name"))["epoch"]
            except CheckpointError as error:
                problem = f"is unusable ({error.problem})"
            else:
                if held != self.best_epoch:
                    problem = f"holds epoch {held}"
        if problem is None:
            return
        if self.best_epoch == self.start_epoch:  # last.pt holds the best weights: copy it
            copy_checkpoint(last_path, best_path)
            self.log(f"note: {best_path} {problem}; rewrote it from {last_path} (epoch {self.best_epoch})")
            return
        raise CheckpointError(
            best_path,
            f"{problem}, but {last_path} records epoch {self.best_epoch} as the best, whose weights only "
            "best.pt held; they cannot be recovered. Restore best.pt, or start the run again with "
            "overwrite=True (--overwrite)",
        )

    def _truncate_metrics(self, completed_epochs: int) -> None:
        """Drop metric lines of epochs the checkpoint does not include (they will be re-run)."""
        path = self.run_dir / METRICS_FILE
        if not self.ctx.is_main or not path.exists():
            return
        records, torn = read_metrics(path)
        if torn:
            self.log(f"note: dropped the torn last line of {path} (a write cut short)")
        kept = [record for record in records if record["epoch"] <= completed_epochs]
        # Atomic: a kill during the rewrite leaves the old file, never an empty one.
        write_atomic("".join(json.dumps(record) + "\n" for record in kept).encode(), path)
        self._write_metrics_csv()

    def _write_metrics_csv(self) -> None:
        """``metrics.csv``: the JSONL records as one table (columns in first-seen order)."""
        records, _ = read_metrics(self.run_dir / METRICS_FILE)
        columns = list(dict.fromkeys(key for record in records for key in record))
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
        write_atomic(table.getvalue().encode(), self.run_dir / METRICS_CSV)

    # ------------------------------------------------------------------------------------- training
    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        cfg, model = self.cfg, self.ddp_model
        model.train()
        if self.schedule_free:
            self.optimizer.train()
        self.train_loader.sampler.set_epoch(epoch)
        if self.redraw_source is not None:
            self.redraw_source.set_epoch(epoch)
        tracker = MetricTracker()
        accum, n_batches = cfg.grad_accum_steps, len(self.train_loader)
        self.optimizer.zero_grad(set_to_none=True)
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=not (self.progress and self.ctx.is_main),
        )
        group_finite = torch.tensor(True)
        for i, batch in enumerate(bar):
            # Batches form groups of `accum`; the epoch's last group may be shorter ("leftover").
            # Dividing by the group's real size makes every step use the mean gradient of its batches.
            group_start = i - i % accum
            group_size = min(accum, n_batches - group_start)
            is_step = i - group_start == group_size - 1
            batch = _to_device(batch, self.device)
            # Skip DDP's gradient all-reduce on all but the last batch of a group.
            sync = contextlib.nullcontext() if is_step or not self.ctx.enabled else model.no_sync()
            with sync:
                with _autocast(cfg, self.device):
                    result = self.task.train_step(model, batch, cfg)
                self.scaler.scale(result.loss / group_size).backward()
            tracker.update(result.sums, result.count)
            loss = result.loss.detach()
            finite = torch.isfinite(loss)
            group_finite = finite if i == group_start else group_finite & finite
            if is_step:
                # One host sync per optimizer step, before the step can spread NaN into the weights.
                # Across ranks the flags are combined, so that every rank stops at the same step.
                if self.ctx.enabled:
                    flag = group_finite.to(self.device, torch.float32)
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
                    group_finite = flag > 0
                if not bool(group_finite):
                    self._raise_non_finite(epoch, i, n_batches, loss)
                self._optimizer_step()
            if i % 20 == 0 and bar.disable is False:
                bar.set_postfix(loss=f"{result.loss.item():.4f}", lr=f"{self._current_lr():.2e}")
        tracker.all_reduce()
        return tracker.compute()

    def _raise_non_finite(self, epoch: int, batch_index: int, n_batches: int, loss: torch.Tensor) -> None:
        value = float(loss)
        shown = str(value) if not math.isfinite(value) else "non-finite (another batch of this step or rank)"
        raise NonFiniteLossError(
            f"training stopped: the loss became {shown} at epoch {epoch + 1} (of {self.cfg.epochs}), "
            f"optimizer step {self.global_step + 1} (batch {batch_index + 1} of {n_batches} in the epoch). "
            "Check the data, lower lr, or set grad_clip; the last completed epoch is in "
            f"{self.run_dir / LAST_CHECKPOINT}"
        )

    def _optimizer_step(self) -> None:
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        if self.scheduler is not None and self.cfg.scheduler in PER_STEP_SCHEDULERS:
            self.scheduler.step()
        self.global_step += 1

    def validate(self, epoch: int) -> dict[str, float]:
        if self.schedule_free:
            self.optimizer.eval()  # swap in the averaged weights schedule-free evaluates
        metrics, batch, outputs = run_evaluation(
            self.eval_model,
            self.val_loader,
            self.task,
            self.cfg,
            self.device,
            self.ctx,
            self.progress,
            "validate",
        )
        if self.on_validation is not None and self.ctx.is_main and batch is not None:
            self.on_validation(self.eval_model, batch, outputs, epoch)
        return metrics

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.ctx.is_main:
            ensure_writable_dir(self.run_dir)  # before an epoch of work is spent
            for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):  # left by a killed save
                remove_stale_temporaries(self.run_dir / name)
        if self.resume and (self.run_dir / LAST_CHECKPOINT).exists():
            self._restore(self.run_dir / LAST_CHECKPOINT)
        elif self.ctx.is_main:
            (self.run_dir / METRICS_FILE).unlink(missing_ok=True)
            (self.run_dir / METRICS_CSV).unlink(missing_ok=True)
            (self.run_dir / BEST_CHECKPOINT).unlink(missing_ok=True)  # an earlier run's best weights
        ranks = f" x{self.ctx.world_size}" if self.ctx.enabled else ""
        self.log(
            f"{self.model_name} ({self.num_parameters:,} params, task {self.task_name}) "
            f"on {self.device}{ranks}; data: {self.dataset_description['train']}"
        )
        session_start = time.perf_counter()
        for epoch in range(self.start_epoch, cfg.epochs):
            epoch_start = time.perf_counter()
            train_metrics = self.train_one_epoch(epoch)
            val_metrics = self.validate(epoch)
            if self.scheduler is not None and cfg.scheduler == "plateau":
                self.scheduler.step(val_metrics["loss"])
            score = val_metrics[self.task.monitor]
            improved = self._is_better(score)
            if improved:
                self.best_score, self.best_epoch = score, epoch + 1
            record = {
                "epoch": epoch + 1,
                "step": self.global_step,
                "lr": self._current_lr(),
                **{f"train_{k}": v for k, v in train_metrics.items()},
                **{f"val_{k}": v for k, v in val_metrics.items()},
                "epoch_time_s": time.perf_counter() - epoch_start,
            }
            if self.ctx.is_main:
                # Metrics before the checkpoint: a crash in between only leaves a line that resume drops.
                with (self.run_dir / METRICS_FILE).open("a") as f:
                    f.write(json.dumps(record) + "\n")
                self._write_metrics_csv()
                state = self._state(epoch + 1, self.elapsed_before + time.perf_counter() - session_start)
                # last.pt first: it names the best epoch, so a kill before best.pt is written is
                # repaired on resume by copying last.pt (see _reconcile_best).
                data = encode_checkpoint(state)
                write_atomic(data, self.run_dir / LAST_CHECKPOINT)
                if improved:
                    write_atomic(data, self.run_dir / BEST_CHECKPOINT)
            self.log(
                f"epoch {epoch + 1}/{cfg.epochs}  train loss {train_metrics['loss']:.4f}  "
                + "  ".join(f"val {k} {v:.4f}" for k, v in val_metrics.items())
                + ("  *" if improved else "")
            )
        self.ctx.barrier()
        wall_time = self.elapsed_before + time.perf_counter() - session_start
        summary = self.test(wall_time)
        self.ctx.close()
        return summary

    # ---------------------------------------------------------------------------------------- test
    def test(self, wall_time: float) -> dict[str, Any]:
        """Evaluate the best checkpoint's weights (EMA when enabled) on the test split; write summary.json."""
        best_path = self.run_dir / BEST_CHECKPOINT
        model = self.eval_model
        if best_path.exists():
            state = load_checkpoint(best_path, map_location=self.device, required=WEIGHTS_KEYS)
            if state["epoch"] != self.best_epoch:
                raise CheckpointError(
                    best_path, f"holds epoch {state['epoch']}, but this run's best epoch is {self.best_epoch}"
                )
            load_weights(model, _weights_of(state, best_path, state["ema"] is not None), best_path)
        elif self.schedule_free:
            self.optimizer.eval()
        test_loader = _loader(self.test_set, self.cfg, self.ctx, self.device, train=False)
        test_metrics, _, _ = run_evaluation(
            model, test_loader, self.task, self.cfg, self.device, self.ctx, self.progress, "test"
        )
        summary = {
            "model": self.model_name,
            "task": self.task_name,
            "dataset": self.dataset_description,
            "samples": {"train": len(self.train_set), "val": len(self.val_set), "test": len(self.test_set)},
            "epochs": self.cfg.epochs,
            "best_epoch": self.best_epoch,
            f"best_val_{self.task.monitor}": self.best_score,
            "test_metrics": test_metrics,
            "device": torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else str(self.device),
            "world_size": self.ctx.world_size,
            "num_parameters": self.num_parameters,
            "wall_time_s": round(wall_time, 2),
            "torch_version": torch.__version__,
            "command_line": shlex.join(sys.argv),
            "config": self.cfg.to_dict(),
            "run_dir": str(self.run_dir),
        }
        if self.ctx.is_main:
            path = self.run_dir / SUMMARY_FILE
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            tmp.replace(path)
            self.log("test: " + "  ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()))
        return summary


def train(model_name: str, cfg: TrainConfig | None = None, **kwargs: Any) -> dict[str, Any]:
    """Train ``model_name`` with ``cfg`` (default: the model's defaults); returns the run summary.

    ``kwargs`` go to ``Trainer``: data_dir, device, run_dir, resume, overwrite, on_validation,
    datasets, progress, log.
    """
    return Trainer(model_name, cfg or resolve_config(model_name), **kwargs).fit()


def evaluate_checkpoint(
    model_name: str,
    checkpoint: str | Path,
    *,
    data_dir: str | Path | None = None,
    device: str = "auto",
    use_ema: bool = True,
    batch_size: int | None = None,
    test_samples: int | None = None,
    dataset: Dataset | None = None,
    progress: bool = True,
    figures_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Test-split metrics of a checkpoint written by ``train`` (EMA weights unless ``use_ema=False``);
    with ``figures_dir``, also the model's attention and embedding PNGs on the test samples."""
    spec = get_model_spec(model_name)
    resolved = resolve_device(device)
    state = load_checkpoint(checkpoint, map_location=resolved, required=WEIGHTS_KEYS)
    check_model_name(state, checkpoint, model_name)
    check_counters(state, checkpoint)
    cfg = checkpoint_config(state, checkpoint)
    overrides = {"batch_size": batch_size, "test_samples": test_samples}
    cfg = cfg.replace(**{key: value for key, value in overrides.items() if value is not None})
    task = get_task(cfg.task or spec.task)
    model = create_model(model_name).to(resolved)
    use_ema = use_ema and state["ema"] is not None
    weights = _weights_of(state, checkpoint, use_ema)
    load_weights(model, weights, checkpoint, "the EMA weights" if use_ema else "the weights")
    if dataset is None:
        from fastvision.data import build_dataset

        dataset = build_dataset(spec.dataset, "test", data_dir, seed=cfg.seed)
    data_description = describe(dataset)
    if cfg.test_samples is not None and len(dataset) > cfg.test_samples:
        dataset = Subset(dataset, range(cfg.test_samples))
    loader = _loader(dataset, cfg, DistContext(), resolved, train=False)
    metrics, _, _ = run_evaluation(model, loader, task, cfg, resolved, progress=progress, desc="test")
    result = {
        "model": model_name,
        "checkpoint": str(checkpoint),
        "epoch": state["epoch"],
        "weights": "ema" if use_ema else "model",
        "dataset": data_description,
        "samples": len(dataset),
        "device": str(resolved),
        "test_metrics": metrics,
    }
    if figures_dir is not None:
        from fastvision.viz.digits import save_model_figures

        paths = save_model_figures(model, dataset, figures_dir, device=resolved)
        result["figures"] = [str(path) for path in paths]
    return result

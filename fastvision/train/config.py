"""Training configuration: a dataclass with YAML loading and strict key checking."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

OPTIMIZERS = ("adamw", "schedulefree")
SCHEDULERS = ("cosine", "onecycle", "plateau", "none")
AMP_MODES = ("none", "bf16", "fp16")


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """Convert a YAML/CLI value to the field's type (PyYAML reads ``3e-4`` as a string, for one)."""
    if value is None and "None" in annotation:
        return None
    try:
        if annotation.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if annotation.startswith("int"):
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise TypeError
            return int(float(value))
        if annotation.startswith("bool") and isinstance(value, bool):
            return value
        if annotation.startswith("str") and isinstance(value, str):
            return value
    except (TypeError, ValueError):
        pass
    raise ValueError(f"training config key {key!r} expects {annotation}, got {value!r}")


@dataclass
class TrainConfig:
    """Every knob of a training run. Per-model defaults come from ``ModelSpec.train_defaults``."""

    epochs: int = 10
    batch_size: int = 64
    grad_accum_steps: int = 1  # effective batch = batch_size * grad_accum_steps (* world size)
    lr: float = 3e-4
    weight_decay: float = 0.01
    optimizer: str = "adamw"
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0  # cosine: linear warm-up length (fractions allowed)
    lr_min: float = 0.0  # cosine floor; plateau floor; onecycle final LR (when > 0)
    max_lr: float | None = None  # onecycle peak; defaults to lr
    pct_start: float = 0.3  # onecycle: fraction of steps spent increasing the LR
    lr_patience: int = 5  # plateau: epochs without val-loss improvement before decaying
    lr_factor: float = 0.5  # plateau: LR multiplier on decay
    ema_decay: float = 0.999  # 0 disables EMA; validation uses the EMA weights otherwise
    amp: str = "none"
    grad_clip: float = 0.0  # max global grad norm; 0 disables
    seed: int = 0
    num_workers: int = 0
    val_fraction: float = 0.1  # held out of the train split for validation / best-checkpoint selection
    train_samples: int | None = None  # caps for quick runs
    val_samples: int | None = None
    test_samples: int | None = None
    shift_augment: int = 0  # train-time random translation of up to N pixels (classification, digits)
    shift_tiles: int = 1  # 2: shift each cell of a 2x2 grid on its own (each digit of a digit grid)
    redraw_each_epoch: bool = False  # seeded compositions (digit grids) draw a fresh layout each epoch
    noise_sigma: float = 0.2  # denoise task: Gaussian noise std on [0, 1] images
    aux_loss_weight: float = 0.01  # weight of a model's ``aux_loss`` (e.g. MoE load balancing)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def check(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(f"invalid training config: {message}")

        check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        check(self.scheduler in SCHEDULERS, f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        check(self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        check(0.0 < self.pct_start < 1.0, f"pct_start must be in (0, 1), got {self.pct_start}")
        check(0.0 < self.lr_factor < 1.0, f"lr_factor must be in (0, 1), got {self.lr_factor}")
        check(0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        check(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        check(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        check(self.shift_augment >= 0, f"shift_augment must be >= 0, got {self.shift_augment}")
        check(self.shift_tiles >= 1, f"shift_tiles must be >= 1, got {self.shift_tiles}")
        check(self.noise_sigma >= 0, f"noise_sigma must be >= 0, got {self.noise_sigma}")
        check(
            self.optimizer != "schedulefree" or self.scheduler == "none",
            "the schedulefree optimizer replaces the LR schedule; set scheduler: none",
        )

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
        """``base`` (or the defaults) overridden by ``values``; unknown keys raise a ValueError."""
        unknown = sorted(set(values) - cls.field_names())
        if unknown:
            raise ValueError(
                f"unknown training config key(s): {', '.join(unknown)}; "
                f"valid keys: {', '.join(sorted(cls.field_names()))}"
            )
        merged = dataclasses.asdict(base) if base is not None else {}
        types = {f.name: f.type for f in fields(cls)}
        merged.update({key: _coerce(key, value, types[key]) for key, value in values.items()})
        return cls(**merged)

    @classmethod
    def from_yaml(cls, path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
        """Load a YAML file, either flat or with the keys under a top-level ``training:`` section."""
        path = Path(path)
        with path.open() as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of training options, got {type(data).__name__}")
        if set(data) == {"training"} and isinstance(data["training"], dict):
            data = data["training"]
        try:
            return cls.from_dict(data, base=base)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return self.from_dict(changes, base=self)

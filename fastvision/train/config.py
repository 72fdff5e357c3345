"""Training configuration: a dataclass with YAML loading and strict key checking."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

OPTIMIZERS = ("adamw", "schedulefree")
SCHEDULERS = ("cosine", "onecycle", "plateau", "none")
AMP_MODES = ("none", "bf16", "fp16")
TASK_NAMES = (
    "classification",
    "digit_sequence",
    "denoise",
    "fcmae",
    "inr",
    "detector_regression",
    "detector_pretrain",
)  # fastvision.train.tasks.TASKS
MAX_SEED = 2**32  # seeds also derive others (seed * 1_000_003 + epoch) that must stay below 2**63


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
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, int):
                return value
            number = float(value)  # "1e3" or 1000.0; an infinity or NaN is no integer
            if not math.isfinite(number) or number != int(number):
                raise TypeError
            return int(number)
        if annotation.startswith("bool") and isinstance(value, bool):
            return value
        if annotation.startswith("str") and isinstance(value, str):
            return value
    except (TypeError, ValueError, OverflowError):
        pass
    raise ValueError(f"training config key {key!r} expects {annotation}, got {_shown(value)}")


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error message stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Limits on a config file: it is a short list of options, so anything far larger or deeper is a
# mistake (or an attack: YAML aliases can expand a few hundred bytes into gigabytes).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 8


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without aliases and with a nesting limit, so that parsing is bounded by
    the file's size."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not allowed in a training config",
                event.start_mark,
            )
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                problem = f"nested more than {MAX_CONFIG_DEPTH} levels deep"
                raise yaml.composer.ComposerError(None, None, problem, self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans several lines)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    context = getattr(error, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"invalid YAML{where}: {problem}" + (f" ({context})" if context else "")


def load_yaml_file(path: str | Path) -> Any:
    """The parsed contents of a config file: UTF-8 text, at most ``MAX_CONFIG_BYTES``, no aliases,
    nesting at most ``MAX_CONFIG_DEPTH``; any problem is one ``ValueError`` line naming the file."""
    path = Path(path)
    with path.open("rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: larger than {MAX_CONFIG_BYTES // 2**20} MiB; not a training config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
            "save the config as UTF-8"
        ) from None
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: {_yaml_problem(error)}") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply; not a training config") from None


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
    task: str | None = None  # None: the model's own task; else one its ``tasks`` lists (e.g. fcmae)
    init_from: str | None = None  # checkpoint whose weights (EMA when saved) start a fresh run
    mask_ratio: float = 0.6  # fcmae / detector_pretrain: fraction of the patches (live sensors) masked
    norm_pix_loss: bool = False  # fcmae task: targets normalised per patch (mean 0, variance 1)
    query_samples: int | None = None  # inr task: random pixels decoded per training image (None: all)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the type and range of every field; a ``ValueError`` names the field and the rule."""

        def check(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(f"invalid training config: {message}")

        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and "None" in f.type:
                continue
            if f.type.startswith("bool"):
                check(isinstance(value, bool), f"{f.name} must be true or false, got {_shown(value)}")
            elif f.type.startswith("int"):
                check(
                    isinstance(value, numbers.Integral) and not isinstance(value, bool),
                    f"{f.name} must be an integer, got {_shown(value)}",
                )
            elif f.type.startswith("float"):
                check(
                    isinstance(value, numbers.Real) and not isinstance(value, bool),
                    f"{f.name} must be a number, got {_shown(value)}",
                )
                check(math.isfinite(value), f"{f.name} must be finite, got {value}")
            elif f.type.startswith("str"):
                check(isinstance(value, str), f"{f.name} must be a string, got {_shown(value)}")

        check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        check(self.scheduler in SCHEDULERS, f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        check(self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.grad_accum_steps >= 1, f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        check(
            self.warmup_epochs <= self.epochs,
            f"warmup_epochs must be <= epochs ({self.epochs}), got {self.warmup_epochs}",
        )
        check(self.lr_min >= 0, f"lr_min must be >= 0, got {self.lr_min}")
        check(self.max_lr is None or self.max_lr > 0, f"max_lr must be > 0 (or unset), got {self.max_lr}")
        check(0.0 < self.pct_start < 1.0, f"pct_start must be in (0, 1), got {self.pct_start}")
        check(self.lr_patience >= 0, f"lr_patience must be >= 0, got {self.lr_patience}")
        check(0.0 < self.lr_factor < 1.0, f"lr_factor must be in (0, 1), got {self.lr_factor}")
        check(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        check(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        check(0 <= self.seed < MAX_SEED, f"seed must be in [0, 2**32), got {self.seed}")
        check(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        check(0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("train_samples", "val_samples", "test_samples"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"{name} must be >= 1 (or unset for all), got {value}")
        check(self.shift_augment >= 0, f"shift_augment must be >= 0, got {self.shift_augment}")
        check(self.shift_tiles >= 1, f"shift_tiles must be >= 1, got {self.shift_tiles}")
        check(self.noise_sigma >= 0, f"noise_sigma must be >= 0, got {self.noise_sigma}")
        check(self.aux_loss_weight >= 0, f"aux_loss_weight must be >= 0, got {self.aux_loss_weight}")
        check(
            self.task is None or self.task in TASK_NAMES,
            f"task must be one of {TASK_NAMES} (or unset for the model's own), got {self.task!r}",
        )
        check(self.init_from != "", "init_from must be a checkpoint path (or unset)")
        check(
            self.query_samples is None or self.query_samples >= 1,
            f"query_samples must be >= 1 (or unset for every pixel), got {self.query_samples}",
        )
        check(0.0 < self.mask_ratio < 1.0, f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        check(
            self.optimizer != "schedulefree" or self.scheduler == "none",
            "the schedulefree optimizer replaces the LR schedule; set scheduler: none",
        )

    def validate_for_images(self, height: int, width: int) -> None:
        """Checks that need the training images' size: the shift augmentation must fit in them."""
        if self.shift_augment == 0:
            return
        if height % self.shift_tiles or width % self.shift_tiles:
            raise ValueError(
                f"invalid training config: shift_tiles ({self.shift_tiles}) must divide the training "
                f"image size {height}x{width}"
            )
        cell = min(height, width) // self.shift_tiles
        if self.shift_augment >= cell:
            where = f"{height}x{width} images" if self.shift_tiles == 1 else f"{cell}-pixel cells"
            raise ValueError(
                f"invalid training config: shift_augment must be < {cell} for {where} (a shift of "
                f"{self.shift_augment} pixels can move the whole image out of view), got {self.shift_augment}"
            )

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def coerce_values(cls, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` converted to the fields' types; unknown keys and wrong types raise a ValueError.

        Ranges are not checked here: that happens once, on the merged config (``validate``).
        """
        not_text = [key for key in values if not isinstance(key, str)]
        if not_text:
            raise ValueError(
                f"training config keys must be option names, got {_shown(not_text[0])} "
                f"({type(not_text[0]).__name__})"
            )
        unknown = sorted(set(values) - cls.field_names())
        if unknown:
            raise ValueError(
                f"unknown training config key(s): {', '.join(unknown)}; "
                f"valid keys: {', '.join(sorted(cls.field_names()))}"
            )
        types = {f.name: f.type for f in fields(cls)}
        return {key: _coerce(key, value, types[key]) for key, value in values.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
        """``base`` (or the defaults) overridden by ``values``; unknown keys raise a ValueError."""
        merged = dataclasses.asdict(base) if base is not None else {}
        merged.update(cls.coerce_values(values))
        return cls(**merged)

    @classmethod
    def read_yaml(cls, path: str | Path) -> dict[str, Any]:
        """The options of a YAML file (flat or under a top-level ``training:``), type-checked."""
        path = Path(path)
        data = load_yaml_file(path)
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of training options, got {type(data).__name__}")
        if set(data) == {"training"} and isinstance(data["training"], dict):
            data = data["training"]
        try:
            return cls.coerce_values(data)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: {error}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
        """Load a YAML file, either flat or with the keys under a top-level ``training:`` section."""
        values = cls.read_yaml(path)
        try:
            return cls.from_dict(values, base=base)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return self.from_dict(changes, base=self)

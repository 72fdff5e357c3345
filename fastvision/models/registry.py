"""Model registry: ``create_model(name)``, ``list_models()``, ``get_model_spec(name)``.

Each architecture registers a builder together with what the training loop needs to know
about it: the task (how a batch becomes a loss and a metric), the dataset it trains on, and
training-config defaults taken from its seed document.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

TASKS = ("classification", "digit_sequence", "denoise", "inr", "detector_regression")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    task: str
    dataset: str
    description: str
    train_defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    task: str,
    dataset: str,
    description: str,
    train_defaults: dict[str, Any] | None = None,
):
    """Decorator registering ``builder(**kwargs) -> nn.Module`` under ``name``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(name, builder, task, dataset, description, dict(train_defaults or {}))
        return builder

    return decorate


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models()) or 'none'}") from None


def create_model(name: str, **kwargs: Any) -> nn.Module:
    return get_model_spec(name).builder(**kwargs)

"""Model registry: ``create_model(name)``, ``list_models()``, ``get_model_spec(name)``.

Each architecture registers a builder together with what the training loop needs to know
about it: the task (how a batch becomes a loss and a metric), the dataset it trains on, and
training-config defaults taken from its seed document. For deployment, profiling and the
inference benchmark it also registers its inference entry point (``forward`` unless named) and
how to make inputs for it: ``example_inputs(name, batch)`` and ``inference_module(model, name)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
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
    # (batch, generator) -> the positional inputs of the inference entry point
    example_inputs: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]] | None = None
    inference: str = "forward"  # the method deployment exports (``generate`` for a decoder)


def image_inputs(channels: int, size: int, density: float | None = None):
    """Example inputs ``([B, channels, size, size],)`` in [0, 1]; with ``density``, that share of
    pixels is nonzero (handwriting-like sparsity, so sparse models see realistic active sets)."""

    def make(batch: int, generator: torch.Generator) -> tuple[torch.Tensor]:
        images = torch.rand(batch, channels, size, size, generator=generator)
        if density is not None:
            images = images * (torch.rand(batch, 1, size, size, generator=generator) < density)
        return (images,)

    return make


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    task: str,
    dataset: str,
    description: str,
    train_defaults: dict[str, Any] | None = None,
    example_inputs: Callable[[int, torch.Generator], tuple[torch.Tensor, ...]] | None = None,
    inference: str = "forward",
):
    """Decorator registering ``builder(**kwargs) -> nn.Module`` under ``name``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(
            name, builder, task, dataset, description, dict(train_defaults or {}), example_inputs, inference
        )
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


def exportable_output(cls: type) -> type:
    """Class decorator for a NamedTuple that a model returns: registers it with torch.export's
    serializer, so a saved ``.pt2`` program returning it loads (as the same NamedTuple)."""
    from torch.utils._pytree import _register_namedtuple

    _register_namedtuple(cls, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")
    return cls


def example_inputs(
    name: str, batch: int = 1, *, seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, ...]:
    """The positional inputs of model ``name``'s inference entry point (see :func:`inference_module`)
    for ``batch`` samples: random, the same for the same ``seed``, shaped like the model's data."""
    spec = get_model_spec(name)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if spec.example_inputs is None:
        raise ValueError(f"model {name!r} registers no example inputs")
    generator = torch.Generator().manual_seed(seed)
    return tuple(t.to(device) for t in spec.example_inputs(batch, generator))


class InferenceEntry(nn.Module):
    """``forward`` calls ``model.<method>``: makes a decoding entry point exportable as a module."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *inputs: torch.Tensor) -> Any:
        return getattr(self.model, self.method)(*inputs)


def inference_module(model: nn.Module, name: str) -> nn.Module:
    """``model``, switched to eval mode, as the module whose ``forward`` is model ``name``'s
    inference entry."""
    method = get_model_spec(name).inference
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(getattr(model, method, None)):
        raise ValueError(f"model {name!r} infers through .{method}(), which {type(model).__name__} lacks")
    model.eval()
    return model if method == "forward" else InferenceEntry(model, method).eval()

"""Exponential moving average of model weights, used for validation and the saved "best" model."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """``W_ema = d * W_ema + (1 - d) * W_live`` after every optimizer step.

    The effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates:
    with a fixed 0.999, a short run's EMA would still be mostly the random initialisation.
    Buffers (e.g. BatchNorm statistics) are averaged too; integer buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = self.current_decay()
        live = model.state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = live[name].detach()
            if ema_value.dtype.is_floating_point:
                ema_value.lerp_(value.to(ema_value.dtype), 1.0 - decay)
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])

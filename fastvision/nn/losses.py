"""Heteroscedastic regression losses, exactly as seed 002 defines them.

Both take the target ``y``, the predicted mean ``mu`` and the predicted log-variance ``log_var``
(broadcastable to one shape) and return the mean over all elements.
"""

from __future__ import annotations

import numbers

import torch


def faithful_nll_loss(y_true: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Faithful heteroscedastic loss (Stirn et al., 2023): the mean's gradient is that of the
    squared error scaled by the *stopped* variance, and the variance gets the full NLL gradient
    with the mean stopped.

    ``0.5 * (y - mu)^2 / [var] + 0.5 * (log_var + (y - [mu])^2 / var)``, averaged; ``[.]`` is
    stop-gradient and ``var = exp(log_var)``.
    """
    var = torch.exp(log_var)

    # Stop gradient on variance for mean update
    var_stopped = var.detach()

    # NLL with stopped variance (faithful to mean)
    loss_mean = 0.5 * ((y_true - mu) ** 2) / var_stopped

    # Variance loss (uses full gradient)
    loss_var = 0.5 * (log_var + ((y_true - mu.detach()) ** 2) / var)

    return (loss_mean + loss_var).mean()


def beta_nll_loss(
    y_true: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """β-NLL (Seitzer et al., 2022): the Gaussian NLL weighted by the stopped ``var ** beta``.

    ``[var]^beta * 0.5 * (log_var + (y - mu)^2 / var)``, averaged. ``beta = 0`` is the plain NLL,
    ``0.5`` the balanced setting, ``1`` gives the mean the gradient of the squared error.
    """
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a number, got {type(beta).__name__} {beta!r}")
    var = torch.exp(log_var)

    # Compute NLL
    nll = 0.5 * (log_var + ((y_true - mu) ** 2) / var)

    # Weight by stopped variance^beta
    weight = var.detach() ** beta

    return (weight * nll).mean()

"""Shared test helpers: the device under test, the backends that can run there, tolerances."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from fastvision._backend import why_unusable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Per-dtype (atol, rtol) against a float64 reference: about four units in the last place of the
# storage type for elementwise math done in float32 and rounded once.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float64: (1e-9, 1e-9),
}

# CI names the backends it built (e.g. "cpu,triton"): for those a missing backend fails rather than skips.
REQUIRED_BACKENDS = {b for b in os.environ.get("FASTVISION_REQUIRE_BACKENDS", "").split(",") if b}


def backend_params(implemented, device: torch.device = DEVICE):
    """pytest params for every implemented backend, skipped (or failed, if required) when unusable."""
    params = []
    for backend in implemented:
        reason = why_unusable(backend, device)
        marks = []
        if reason is not None and backend not in REQUIRED_BACKENDS:
            marks.append(pytest.mark.skip(reason=f"{backend}: {reason}"))
        params.append(pytest.param(backend, marks=marks, id=backend))
    return params


def stable_seed(*parts: object) -> int:
    """A seed from ``parts`` that is the same in every process (``hash()`` of a str is salted)."""
    return zlib.crc32(repr(parts).encode())


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(), atol=atol * scale, rtol=rtol * scale
    )


@pytest.fixture
def device() -> torch.device:
    return DEVICE

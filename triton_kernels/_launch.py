"""Launch helpers shared by the Triton ops: row views, tile sizes, and the description of each
compiled configuration a launcher can choose (read by the sm_90 kernel-budget check).

A leaf module: it imports torch only, never the package's API, so kernels stay independent of the
dispatcher that calls them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch


def interpreting() -> bool:
    """Whether Triton runs in its interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view ``[M, last]`` with unit last-dim stride, copying only when no such view exists."""
    rows = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


def elements_per_program(device: torch.device) -> int:
    # The interpreter runs programs one by one in numpy: larger tiles amortize its per-program cost.
    return 4096 if device.type == "cuda" else 65536


@dataclass(frozen=True)
class KernelLaunch:
    """One compiled configuration that a launcher can choose.

    ``signature`` maps every argument of ``kernel`` to its Triton type (``"*fp32"``, ``"*bf16"``,
    ``"i32"``, ``"i64"``, ``"fp32"``, or ``"constexpr"`` for the keys of ``constexprs``). Each
    Triton module's ``launch_configs()`` yields these from the same tile-choosing code its
    launchers call, so that the budget check compiles exactly what can run.
    """

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = 3
    label: str = ""
    tags: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else str(self.kernel)


@dataclass(frozen=True)
class SpillAllowance:
    """Local-memory bytes per thread that a kernel may spill on sm_90, and why that is accepted."""

    bytes: int
    reason: str


def kernel_signature(
    kernel: Any, constexprs: dict[str, Any], pointers: dict[str, str], scalars: dict[str, str] | None = None
) -> dict[str, str]:
    """The Triton signature of ``kernel``: ``"constexpr"`` for the keys of ``constexprs``, the type in
    ``pointers`` for every pointer argument (each must be listed: pointer dtypes are never guessed),
    the type in ``scalars`` for other arguments, ``"i32"`` for integers not listed there. Entries of
    ``pointers`` and ``scalars`` that name no argument of ``kernel`` are ignored (one table can serve
    several kernels); constexprs must all be arguments."""
    names = kernel.arg_names if hasattr(kernel, "arg_names") else kernel.fn.__code__.co_varnames
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        elif name.endswith("_ptr"):
            raise KeyError(f"{name}: the pointer type of every pointer argument must be given")
        else:
            signature[name] = (scalars or {}).get(name, "i32")
    unknown = set(constexprs) - set(names)
    if unknown:
        raise KeyError(f"not arguments of the kernel: {sorted(unknown)}")
    return signature

"""Input checks shared by the public ops: each error names the argument and what was expected."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_dtype(name: str, tensor: torch.Tensor, allowed: Iterable[torch.dtype] = FLOAT_DTYPES) -> None:
    allowed = tuple(allowed)
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(
            f"{name} must have dtype in ({names}), got {str(tensor.dtype).removeprefix('torch.')}"
        )


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"tensors must be on one device, got {listed}")


def check_attention_inputs(q: object, k: object, v: object) -> None:
    """q ``[B, H, Nq, D]``, k and v ``[B, H, Nk, D]`` (``Nk >= 1``): float tensors of one dtype and device."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, tensor)
        check_dtype(name, tensor)
        if tensor.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(tensor.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape [B, H, Nk, D], got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q [B, H, Nq, D] and k [B, H, Nk, D] must agree in B, H and D, "
            f"got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if k.shape[2] == 0:
        raise ValueError("k and v must hold at least one key (Nk >= 1): a softmax over no keys is undefined")


def check_scale(scale: object) -> None:
    """An attention score scale: a finite number, or None for the default."""
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")


# --- raw-op checks: the arguments of a registered op, as a direct torch.ops.fastvision call passes them


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """A Python int (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_float(name: str, value: object, positive: bool = False) -> float:
    """A finite Python float or int (not a bool); ``positive``: also > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a {'positive ' if positive else ''}finite float, got {value!r}")
    return float(value)


def check_like(
    name: str,
    tensor: object,
    shape: Iterable[int],
    dtype: torch.dtype | Iterable[torch.dtype],
    device: torch.device,
    contiguous: bool = False,
) -> torch.Tensor:
    """A tensor of exactly ``shape``, ``dtype`` (or one of several) and ``device``; ``contiguous``: in
    row-major layout, for a kernel that indexes it without strides."""
    check_tensor(name, tensor)
    shape = tuple(shape)
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
    if tensor.dtype not in allowed:
        names = ", ".join(_dtype_name(d) for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {_dtype_name(tensor.dtype)}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device}, got {tensor.device}")
    if contiguous and not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(tensor.stride())}")
    return tensor


def check_index_range(name: str, tensor: torch.Tensor, high: int, absent: int | None = None) -> None:
    """Every entry of the integer ``tensor`` in ``[0, high)``, or equal to ``absent`` when given.

    One reduction and one host read; skipped while a CUDA graph is being captured (a capture cannot
    read values back), where the shapes and dtypes are still checked.
    """
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer indices, got {_dtype_name(tensor.dtype)}")
    if tensor.numel() == 0:
        return
    if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    values = tensor if absent is None else tensor[tensor != absent]
    if values.numel() == 0:
        return
    low, top = (int(v) for v in torch.aminmax(values.reshape(-1)))
    if low < 0 or top >= high:
        allowed = f"[0, {high})" + ("" if absent is None else f" or {absent}")
        raise ValueError(f"{name} must hold indices in {allowed}, got values in [{low}, {top}]")


def check_attention_backward(
    grad_out: object,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: object,
    lse: object,
    indices: object,
    rows: int,
    columns: int,
) -> None:
    """The saved and incoming tensors of a sparse-attention backward op, for q, k, v already checked:
    ``grad_out`` and ``out`` like ``q``; ``lse`` ``[B, H, Nq]`` float32; ``indices`` ``[B, H, rows, S]``
    int32 (``S = 0``: every column selected) with entries in ``[0, columns)``."""
    batch, heads, num_queries, _ = q.shape
    check_like("grad_out", grad_out, q.shape, q.dtype, q.device)
    check_like("out", out, q.shape, q.dtype, q.device)
    check_like("lse", lse, (batch, heads, num_queries), torch.float32, q.device)
    check_tensor("indices", indices)
    if indices.dim() != 4 or tuple(indices.shape[:3]) != (batch, heads, rows):
        raise ValueError(
            f"indices must have shape [B, H, {rows}, S] = [{batch}, {heads}, {rows}, S], "
            f"got {tuple(indices.shape)}"
        )
    check_like("indices", indices, indices.shape, torch.int32, q.device)
    check_index_range("indices", indices, columns)

"""Constructor argument checks shared by the modules: a wrong type raises ``TypeError``, a value out
of range ``ValueError``, each naming the argument and what was expected."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def positive_float(name: str, value: Any) -> float:
    value = real(name, value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def non_negative_float(name: str, value: Any) -> float:
    value = real(name, value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def dropout(name: str, value: Any) -> float:
    value = real(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of the strings ``choices``: a non-string is a TypeError, an unknown string a ValueError."""
    if not isinstance(value, str):
        got = f"{type(value).__name__} {value!r}"
        raise TypeError(f"{name} must be a str, one of {tuple(choices)}, got {got}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def int_choice(name: str, value: Any, choices: Sequence[int]) -> int:
    """One of the ints ``choices``: a non-int (or a bool) is a TypeError, another int a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        got = f"{type(value).__name__} {value!r}"
        raise TypeError(f"{name} must be an int, one of {tuple(choices)}, got {got}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value}")
    return int(value)


def optional_positive_int(name: str, value: Any) -> int | None:
    return None if value is None else positive_int(name, value)


def non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def positive_ints(name: str, value: Any) -> tuple[int, ...]:
    """A non-empty sequence of positive ints (not a str): returned as a tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(value).__name__} {value!r}")
    if not value:
        raise ValueError(f"{name} must hold at least one int, got {value!r}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise TypeError(f"{name} must hold ints, got {type(item).__name__} {item!r} in {value!r}")
    if any(item < 1 for item in value):
        raise ValueError(f"{name} must hold positive ints, got {value!r}")
    return tuple(int(item) for item in value)


def heads_divide(dim: int, heads: int) -> None:
    if dim % heads != 0:
        raise ValueError(f"dim must be a positive multiple of heads, got dim={dim}, heads={heads}")

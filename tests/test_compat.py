"""The declared torch/triton range: pyproject.toml and fastvision._compat agree, and the warnings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastvision import _compat

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _requirement(requirements: list[str], package: str) -> str:
    found = [r for r in requirements if re.match(rf"{package}\b", r)]
    assert len(found) == 1, f"{package} must be declared once in {requirements}"
    return found[0]


def _bounds(requirement: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(lowest allowed, first excluded) major.minor of ``pkg>=A.B,<C.D``."""
    lower = re.search(r">=\s*(\d+)\.(\d+)", requirement)
    upper = re.search(r"<\s*(\d+)\.(\d+)", requirement)
    assert lower and upper, f"{requirement!r} must bound the version on both sides (>=A.B,<C.D)"
    return (int(lower[1]), int(lower[2])), (int(upper[1]), int(upper[2]))


@pytest.mark.skipif(not PYPROJECT.exists(), reason="runs from a source checkout (pyproject.toml)")
@pytest.mark.parametrize(
    "section, package", [("dependencies", "torch"), ("dependencies", "triton"), ("build-system", "torch")]
)
def test_pyproject_declares_the_tested_range(section, package):
    data = tomllib.loads(PYPROJECT.read_text())
    table = data["project"] if section == "dependencies" else data["build-system"]
    requirements = table["dependencies" if section == "dependencies" else "requires"]
    lower, upper = _bounds(_requirement(requirements, package))
    oldest, newest = _compat.TESTED[package]
    assert lower == oldest
    assert upper == (newest[0], newest[1] + 1), "the range ends after the newest tested minor release"


@pytest.mark.skipif(not PYPROJECT.exists(), reason="runs from a source checkout (pyproject.toml)")
def test_license_is_an_spdx_expression():
    data = tomllib.loads(PYPROJECT.read_text())
    assert data["project"]["license"] == "Apache-2.0"
    setuptools = _requirement(data["build-system"]["requires"], "setuptools")
    lower = re.search(r">=\s*(\d+)", setuptools)
    assert lower and int(lower[1]) >= 77, "an SPDX license string needs setuptools>=77"


@pytest.mark.parametrize(
    "text, expected",
    [("2.11.0+cu130", (2, 11)), ("3.6.0", (3, 6)), ("2.15.0rc1", (2, 15)), ("10.2", (10, 2)), ("dev", None)],
)
def test_parse_version(text, expected):
    assert _compat.parse_version(text) == expected


def test_parse_version_rejects_a_non_string():
    with pytest.raises(TypeError, match="version must be a str"):
        _compat.parse_version(2.11)


@pytest.mark.parametrize(
    "torch_version, triton_version",
    [("2.11.0+cu130", "3.6.0"), ("2.14.1+cu130", "3.8.0"), ("2.15.0+cu132", "3.9.0"), ("2.12.0", "3.7.1"),
     ("2.13.0+cpu", None)],
)
def test_inside_the_range_no_warning(torch_version, triton_version):
    versions = {"torch": torch_version, "triton": triton_version, "numpy": "2.3.5"}
    assert _compat.version_warnings(versions, interpreting=True) == []
    assert _compat.version_warning(versions, interpreting=True) is None


@pytest.mark.parametrize(
    "package, version",
    [("torch", "2.10.0"), ("torch", "2.16.0"), ("torch", "3.0.0"), ("triton", "3.5.1"), ("triton", "3.10.0"),
     ("torch", "nightly")],
)  # fmt: skip
def test_outside_the_range_warns(package, version):
    versions = {"torch": "2.14.1", "triton": "3.8.0", "numpy": "2.4.6", package: version}
    warnings = _compat.version_warnings(versions, interpreting=False)
    assert len(warnings) == 1
    assert f"{package} {version} is outside the tested range" in warnings[0]
    lo, hi = _compat.TESTED[package]
    assert f"{lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}" in warnings[0]
    assert _compat.version_warning(versions, interpreting=False) == warnings[0]


def test_interpreter_numpy_warning_only_where_it_fails():
    old_triton = {"torch": "2.11.0", "triton": "3.6.0", "numpy": "2.4.0"}
    warnings = _compat.version_warnings(old_triton, interpreting=True)
    assert len(warnings) == 1 and "numpy<2.4" in warnings[0]
    assert _compat.version_warnings(old_triton, interpreting=False) == []  # compiled kernels need no numpy
    assert _compat.version_warnings({**old_triton, "numpy": "2.3.5"}, interpreting=True) == []
    new_triton = {**old_triton, "triton": "3.8.0", "torch": "2.14.1"}
    assert _compat.version_warnings(new_triton, interpreting=True) == []


def test_installed_versions_are_read():
    import torch

    versions = _compat.installed_versions()
    assert versions["torch"] == torch.__version__
    assert set(versions) == {"torch", "triton", "numpy"}
    assert isinstance(_compat.version_warnings(), list)

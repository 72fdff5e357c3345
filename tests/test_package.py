"""The package surface: backends, dispatch, degraded installs, NVTX ranges and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fastvision
from fastvision.cli import main
from fastvision.ops import OPS
from fastvision.profiling.ranges import nvtx_range


def test_available_backends_lists_all_four():
    backends = fastvision.available_backends()
    assert set(backends) == {"reference", "cpu", "triton", "cuda"}
    assert backends["reference"] is True
    assert all(isinstance(v, bool) for v in backends.values())


def test_use_backend_sets_globally_until_reset():
    fastvision.use_backend("reference")
    try:
        assert fastvision.forced_backend() == "reference"
    finally:
        fastvision.use_backend(None)
    assert fastvision.forced_backend() is None


def test_automatic_choice_on_cpu_prefers_the_cpp_kernel():
    chosen = OPS["geglu"].select((torch.randn(2, 4), "none"))
    assert chosen == ("cpu" if fastvision.available_backends()["cpu"] else "reference")


def test_op_without_forced_backend_raises():
    error = fastvision.BackendUnavailableError
    q = torch.randn(1, 1, 3, 16)
    with fastvision.use_backend("cuda"), pytest.raises(error, match="has no 'cuda'"):
        fastvision.ops.topk_attention(q, q, q, 2)


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )


def test_works_without_extension():
    code = (
        "import torch, fastvision\n"
        "assert not fastvision.available_backends()['cpu']\n"
        "x = torch.randn(3, 8)\n"
        "torch.testing.assert_close(fastvision.ops.geglu(x), fastvision.ops.geglu_reference(x))\n"
        "from fastvision.cli import info; print(info()['extension'])\n"
    )
    result = _run_python(code, FASTVISION_DISABLE_EXTENSION="1")
    assert result.returncode == 0, result.stderr
    assert "not built" in result.stdout


def test_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastvision\n"
        "assert not fastvision.available_backends()['triton']\n"
        "x = torch.randn(3, 8)\n"
        "torch.testing.assert_close(fastvision.ops.geglu(x), fastvision.ops.geglu_reference(x))\n"
        "with fastvision.use_backend('triton'):\n"
        "    try:\n"
        "        fastvision.ops.geglu(x)\n"
        "    except fastvision.BackendUnavailableError as e:\n"
        "        print('refused:', e)\n"
    )
    result = _run_python(code, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "triton is not installed" in result.stdout


def test_nvtx_range_is_transparent():
    with nvtx_range("fastvision.test"):
        value = torch.ones(2).sum()
    assert value.item() == 2


def test_cli_info_json(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backends_available"]["reference"] is True
    assert "torch" in data and "optional" in data


def test_cli_info_warns_outside_the_tested_versions(capsys, monkeypatch):
    import fastvision._compat as compat

    found = {**compat.installed_versions(), "torch": "2.9.1"}
    monkeypatch.setattr(compat, "installed_versions", lambda: found)
    assert main(["info", "--json"]) == 0
    out, err = capsys.readouterr()
    json.loads(out)  # the warning goes to stderr: the JSON stays valid
    assert err.startswith("fastvision info: warning: torch 2.9.1 is outside the tested range")
    monkeypatch.setattr(compat, "installed_versions", lambda: {**found, "torch": torch.__version__})
    if compat.version_warning() is None:
        assert main(["info"]) == 0 and capsys.readouterr().err == ""


def test_cli_bench_quick_geglu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--op", "geglu", "--quick", "--device", "cpu", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "geglu" in table and "reference" in table
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["ok"] for r in rows)
    assert all(r["median_ms"] > 0 for r in rows)
    assert out.with_suffix(".csv").exists()


def test_an_op_may_prefer_the_reference_on_cpu(monkeypatch):
    spec = OPS["add_layer_norm"]
    assert "cpu" in spec.backends
    monkeypatch.setattr(spec, "cpu_order", ())  # an op whose measurements favour the reference
    x = torch.randn(2, 4)
    args = spec.check(x, x)
    assert spec.select(args) == "reference"
    if fastvision.available_backends()["cpu"]:  # forcing still reaches the C++ kernel
        with fastvision.use_backend("cpu"):
            assert spec.select(args) == "cpu"


def test_import_is_light_and_subpackages_load_on_use():
    code = (
        "import sys, fastvision\n"
        "names = ('sklearn', 'skimage', 'matplotlib', 'onnx', 'fastvision.models')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert fastvision.nn.GEGLU is not None and callable(fastvision.models.create_model)\n"
        "assert 'nn' in dir(fastvision)\n"
        "try:\n"
        "    fastvision.no_such_thing\n"
        "except AttributeError as e:\n"
        "    print('missing:', e)\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert "missing: module 'fastvision' has no attribute 'no_such_thing'" in result.stdout

"""fastvision.profiling.model.profile_model: one training and one inference step of a small model."""

from __future__ import annotations

import json
import math

import pytest

from fastvision.profiling import ranges
from fastvision.profiling.model import profile_model


def test_profile_model_writes_trace_and_summary(tmp_path):
    summary = profile_model("vit_mnist", steps=1, batch=2, warmup=1, out=tmp_path, top=10)
    assert not ranges.recording_functions_enabled()  # switched back off after the run
    assert (tmp_path / summary["trace"]).exists() and summary["trace"].startswith("trace.json")
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["model"] == "vit_mnist" and data["task"] == "classification"
    assert "classification" in data["loss"]
    assert set(data["phases"]) == {"train_step", "inference_step"}
    assert data["phases"]["train_step"]["calls"] == 1
    assert 0 < len(data["ops"]) <= 10
    shares = [row["share_pct"] for row in data["ops"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.01
    assert any(row["name"].startswith("aten::") for row in data["ops"])
    assert any(m["name"] == "fastvision.ViTMNIST" for m in data["modules"])  # the NVTX range names
    table = (tmp_path / "summary.md").read_text()
    assert "## Top ops by self time" in table and "fastvision.ViTMNIST" in table
    assert all(not m["name"].startswith("fastvision.op") for m in data["modules"])  # op ranges apart


def test_profile_model_reports_op_bytes_flops_and_throughput(tmp_path):
    from fastvision.ops._contract import _cost_records

    profile_model("vit_mnist", steps=1, inference_steps=1, batch=2, warmup=0, out=tmp_path, trace=False)
    assert _cost_records[0] is None  # the recorder is off again
    data = json.loads((tmp_path / "summary.json").read_text())
    rows = {row["name"]: row for row in data["op_costs"]["ops"]}
    # vit_mnist: 4 encoder blocks, 2 AddLayerNorms each, one training and one inference forward
    assert rows["add_layer_norm"]["calls"] == 16
    for row in rows.values():
        for key in ("time_ms", "bytes", "flops", "gbps", "gflops"):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, key
        assert row["gbps"] == pytest.approx(row["bytes"] / (row["time_ms"] * 1e-3) / 1e9, rel=1e-2)
    table = (tmp_path / "summary.md").read_text()
    assert "## fastvision ops: forward calls, bytes, FLOPs, achieved GB/s and GFLOP/s" in table
    assert "| add_layer_norm | 16 |" in table and "say little about the GPU kernels" in table


def test_profile_model_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="steps"):
        profile_model("vit_mnist", steps=0, out=tmp_path)
    with pytest.raises(ValueError, match="unknown model"):
        profile_model("no_such_model", out=tmp_path)


def test_nvtx_range_is_a_no_op_record_outside_profiling():
    import torch

    with torch.profiler.profile() as prof, ranges.nvtx_range("fastvision.Test"):
        torch.ones(2).sum()
    assert all(e.key != "fastvision.Test" for e in prof.key_averages())


def test_profile_checks_arguments_before_writing(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="unknown model"):
        profile_model("no_such_model", out=out)
    for kwargs, message in (
        ({"inference_steps": -1}, "inference_steps must be an int >= 0"),
        ({"inference_steps": 1.5}, "inference_steps must be an int >= 0"),
        ({"top": 0}, "top must be an int >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            profile_model("vit_mnist", out=out, **kwargs)
    with pytest.raises(TypeError, match="trace must be a bool"):
        profile_model("vit_mnist", out=out, trace="yes")
    assert not out.exists()


def test_ranges_module_loads_without_the_profiling_application():
    """The modules' NVTX ranges are low-level: importing them pulls in neither the profile
    application nor the models, training or benchmark code it uses."""
    import subprocess
    import sys

    code = (
        "import sys, fastvision.profiling.ranges; "
        "heavy = [m for m in ('fastvision.profiling.model', 'fastvision.models', 'fastvision.train', "
        "'fastvision.benchmark') if m in sys.modules]; print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_profile_command_writes_under_runs_and_prints_no_kineto_noise(tmp_path):
    """``fastvision profile MODEL`` from any folder writes under runs/profile/MODEL (never the
    committed profiles/), and on a machine without a GPU the profiler library's device-count error
    is not printed."""
    import os
    import subprocess
    import sys

    import torch

    script = "import sys; from fastvision.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["profile", "vit_mnist", "--steps", "1", "--inference-steps", "0", "--warmup", "0", "--no-trace"]
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, "-c", script, *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "profile" / "vit_mnist" / "summary.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    if not torch.cuda.is_available():
        assert "gpuGetDeviceCount" not in result.stderr and "profiler_start" not in result.stderr

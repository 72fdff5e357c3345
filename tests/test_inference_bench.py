"""The inference benchmark (fastvision.benchmark.inference) on one small model, batch 1, tiny budget."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from fastvision.benchmark import inference

MODEL = "vit_mnist"


@pytest.fixture(scope="module")
def rows():
    backends = ["eager", "compile", "compile-reduce-overhead", "tensorrt"]
    if importlib.util.find_spec("onnxruntime") is not None:
        backends.append("onnxruntime")
    env, rows = inference.run([MODEL], batches=[1], device="cpu", budget_s=0.02, backends=backends)
    return env, rows


def test_rows_exist_with_finite_ratios(rows):
    env, rows = rows
    by_backend = {r.backend: r for r in rows}
    assert {r.model for r in rows} == {MODEL} and {r.batch for r in rows} == {1}
    assert by_backend["eager"].ok and by_backend["eager"].vs_eager == pytest.approx(1.0)
    timed = [r for r in rows if r.ok]
    assert {"eager", "compile"} <= {r.backend for r in timed}
    for row in timed:
        assert row.reps >= 5
        assert math.isfinite(row.median_ms) and row.median_ms > 0
        assert math.isfinite(row.vs_eager) and row.vs_eager > 0
        assert math.isfinite(row.samples_per_s) and row.samples_per_s > 0
        assert row.q1_ms <= row.median_ms <= row.q3_ms
    assert by_backend["compile"].max_abs_diff < 1e-4
    if "onnxruntime" in by_backend:
        assert by_backend["onnxruntime"].ok, by_backend["onnxruntime"].error
        assert by_backend["onnxruntime"].max_abs_diff < 1e-4
    assert env["load_avg"][MODEL]["start"] is None or env["load_avg"][MODEL]["start"] >= 0


def test_unavailable_backends_get_a_reason(rows):
    _, rows = rows
    by_backend = {r.backend: r for r in rows}
    assert not by_backend["compile-reduce-overhead"].ok
    assert "CUDA" in by_backend["compile-reduce-overhead"].error
    if importlib.util.find_spec("torch_tensorrt") is None:
        assert by_backend["tensorrt"].error == "torch-tensorrt not installed"


def test_results_files(rows, tmp_path):
    env, rows = rows
    path = tmp_path / "inference.json"
    inference.write_results(path, env, rows)
    data = json.loads(path.read_text())
    assert len(data["rows"]) == len(rows) and "load_avg" in data["environment"]
    table = path.with_suffix(".md").read_text()
    assert "| vit_mnist | 1 | eager |" in table and "Fastest backend" in table
    assert inference.summary_lines(rows)[0].startswith(f"{MODEL}: batch 1: ")


def test_export_failure_is_a_row_not_a_crash(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("cannot trace the kernel map")

    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime not installed")
    monkeypatch.setattr("fastvision.deploy.export_onnx", fail)
    _, rows = inference.run([MODEL], batches=[1], budget_s=0.01, backends=["eager", "onnxruntime"])
    by_backend = {r.backend: r for r in rows}
    assert by_backend["eager"].ok
    assert not by_backend["onnxruntime"].ok
    assert "cannot trace the kernel map" in by_backend["onnxruntime"].error


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch"):
        inference.run([MODEL], batches=[0])
    with pytest.raises(ValueError, match="unknown backends"):
        inference.run([MODEL], backends=["tvm"])


def test_cli_parses():
    from fastvision.cli import build_parser

    argv = ["bench-inference", "--model", MODEL, "--batch", "1", "--batch", "8", "--quick", "--threads", "1"]
    args = build_parser().parse_args(argv)
    assert args.model == [MODEL] and args.batch == [1, 8] and args.quick and args.threads == 1


def test_run_rejects_a_bad_budget():
    for budget in (-1.0, 0, float("nan"), True):
        with pytest.raises(ValueError, match="budget_s must be a positive number"):
            inference.run(["vit_mnist"], batches=(1,), budget_s=budget)

"""pytest-benchmark suites: ``pytest bench`` times every implementation of every benchmark case
(the same cases as ``fastvision bench``) on CUDA when visible, else small cases on the CPU."""

from __future__ import annotations

import pytest
import torch

from fastvision.benchmark.runner import check_output, load_cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = DEVICE.type != "cuda"


def case_params(op: str):
    """(case, impl) pairs as pytest params, ids like ``fwd none float32 256x512-triton``."""
    params = []
    for case in load_cases(op, DEVICE, QUICK):
        for impl in case.impls:
            params.append(pytest.param(case, impl, id=f"{case.label}-{impl}"))
    return params


def run_benchmark(benchmark, case, impl: str) -> None:
    fn = case.impls[impl]
    if impl != "reference":
        output = fn()
        if impl in case.adapt:  # the peer's layout, converted for the check only (not timed)
            output = case.adapt[impl](output)
        error = check_output(output, case.impls["reference"](), case.tolerance, case.max_mismatched_rows)
        assert error is None, f"{case.op} {case.label} {impl}: {error}"
    benchmark.extra_info.update({"op": case.op, "case": case.label, "impl": impl, "device": str(DEVICE)})
    if case.bytes_moved:
        benchmark.extra_info["bytes_moved"] = case.bytes_moved
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()

        def timed():
            fn()
            torch.cuda.synchronize()

        benchmark(timed)
    else:
        benchmark(fn)

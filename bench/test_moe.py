import pytest
import torch
from conftest import DEVICE, QUICK, case_params, run_benchmark

from fastvision.benchmark.moe import routing_time_ratios


@pytest.mark.parametrize(("case", "impl"), case_params("moe"))
def test_moe(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)


def test_moe_routing_time_ratio(benchmark):
    """Soft over grouped top-1 routing time at each size (recorded in extra_info and printed)."""
    rows = benchmark.pedantic(
        routing_time_ratios, args=(DEVICE, QUICK), kwargs={"budget_s": 0.3}, rounds=1, iterations=1
    )
    benchmark.extra_info["routing_time_ratios"] = rows
    for row in rows:
        print(f"moe {row['size']} {row['mode']}: soft/top1 = {row['soft_over_top1']:.2f}")
        assert row["soft_ms"] > 0 and row["top1_ms"] > 0
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()

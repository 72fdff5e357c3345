"""The benchmark runner: interleaved timing, spread, noisy rows and ratios from paired rounds,
checked with fake implementations and a fake clock (no real timing)."""

from __future__ import annotations

import json

import pytest
import torch

from fastvision.benchmark.case import BenchCase
from fastvision.benchmark.runner import format_table, run_case, write_results
from fastvision.benchmark.timing import interleaved_samples_ms, paired_ratio, spread

CPU = torch.device("cpu")


class FakeClock:
    """A clock that only moves when an implementation "runs": each call advances it by the cost
    that implementation is given for that call."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fake_impl(name: str, clock: FakeClock, costs_ms, log: list[str], value: torch.Tensor):
    """An implementation whose n-th call (warm-ups included) costs ``costs_ms(n)`` milliseconds."""
    calls = [0]

    def run():
        log.append(name)
        clock.advance(costs_ms(calls[0]) * 1e-3)
        calls[0] += 1
        return value.clone()

    return run


def test_rounds_interleave_every_implementation():
    clock, log = FakeClock(), []
    x = torch.ones(3)
    fns = {n: fake_impl(n, clock, lambda i: 1.0, log, x) for n in ("a", "b", "c")}
    samples = interleaved_samples_ms(fns, CPU, budget_s=0.0301, min_reps=1, max_reps=100, clock=clock)
    warmup, rounds = log[:12], log[12:]
    assert warmup == ["a"] * 4 + ["b"] * 4 + ["c"] * 4  # an untimed call, then three sizing calls
    assert len(rounds) == 30  # 30 ms of budget / 3 ms per round = 10 rounds of 3 calls
    for i in range(10):
        # every round calls each implementation once, and the first one rotates
        assert sorted(rounds[3 * i : 3 * i + 3]) == ["a", "b", "c"]
        assert rounds[3 * i] == "abc"[i % 3]
    assert {n: len(s) for n, s in samples.items()} == {"a": 10, "b": 10, "c": 10}
    assert all(t == pytest.approx(1.0) for s in samples.values() for t in s)


def test_rep_bounds():
    clock, log = FakeClock(), []
    fns = {"a": fake_impl("a", clock, lambda i: 1.0, log, torch.ones(1))}
    assert len(interleaved_samples_ms(fns, CPU, budget_s=10.0, max_reps=7, clock=clock)["a"]) == 7
    assert len(interleaved_samples_ms(fns, CPU, budget_s=0.0, min_reps=4, clock=clock)["a"]) == 4


def test_ratio_comes_from_paired_rounds():
    # Load that doubles every other round hits both implementations alike: each round's ratio is 4.
    # Unpaired medians taken at different moments would not give 4 when the load changes between
    # them; the paired ratio does.
    load = [1, 2, 1, 2, 10, 10, 10]
    ref = [4.0 * f for f in load]
    fast = [1.0 * f for f in load]
    assert paired_ratio(ref, fast) == pytest.approx(4.0)
    slow_phase_ref = [4.0 * f for f in (10, 10, 10, 10, 10)]
    quiet_phase_fast = [1.0] * 5
    assert paired_ratio(slow_phase_ref, quiet_phase_fast) == pytest.approx(40.0)  # what pairing avoids
    assert paired_ratio([], []) is None


def test_spread_and_noise_flag():
    calm = spread([1.0, 1.01, 0.99, 1.0, 1.02])
    assert calm.min_ms == pytest.approx(0.99) and calm.max_ms == pytest.approx(1.02)
    assert calm.median_ms == pytest.approx(1.0) and not calm.noisy()
    rough = spread([1.0, 2.0, 1.0, 3.0, 1.5, 0.5])
    assert rough.iqr_ms == pytest.approx(rough.q3_ms - rough.q1_ms)
    assert rough.noisy() and not rough.noisy(threshold=10.0)


def _case(clock: FakeClock, log: list[str], costs: dict, wrong: tuple[str, ...] = ()) -> BenchCase:
    x = torch.arange(4.0)
    impls = {}
    for name, cost in costs.items():
        impls[name] = fake_impl(name, clock, cost, log, x + 1 if name in wrong else x)
    return BenchCase(op="fake", label="fwd 4", impls=impls, bytes_moved=4000)


def test_run_case_rows_have_spread_paired_ratios_and_noise():
    clock, log = FakeClock(), []
    # "jumpy" alternates 1 ms and 3 ms: its IQR is far above 10% of its median.
    costs = {
        "reference": lambda i: 4.0,
        "cpu": lambda i: 1.0,
        "jumpy": lambda i: 1.0 if i % 2 else 3.0,
        "broken": lambda i: 1.0,
    }
    rows = {
        r.impl: r for r in run_case(_case(clock, log, costs, wrong=("broken",)), CPU, 10.0, 0.05, clock=clock)
    }
    assert rows["broken"].ok is False and "max abs error" in rows["broken"].error
    assert rows["broken"].median_ms is None and log.count("broken") == 1  # checked, never timed
    ref, cpu, jumpy = rows["reference"], rows["cpu"], rows["jumpy"]
    assert ref.ok and cpu.ok and jumpy.ok
    assert cpu.median_ms == pytest.approx(1.0) and cpu.min_ms == pytest.approx(1.0)
    assert cpu.reps == ref.reps == jumpy.reps >= 5
    assert cpu.vs_reference == pytest.approx(4.0) and ref.vs_reference == pytest.approx(1.0)
    assert not cpu.noisy and cpu.iqr_pct == pytest.approx(0.0)
    assert jumpy.noisy and jumpy.iqr_pct > 10
    assert cpu.gbps == pytest.approx(4000 / 1e-3 / 1e9)
    table = format_table(_ENV, list(rows.values()))
    assert "IQR %" in table and "min ms" in table and "NOISY" in table
    noisy_lines = [line for line in table.splitlines() if "NOISY" in line and "jumpy" in line]
    assert len(noisy_lines) == 1


def test_implementation_that_fails_while_timed_is_reported():
    clock, log = FakeClock(), []
    x = torch.ones(2)

    def flaky():
        log.append("flaky")
        if len([n for n in log if n == "flaky"]) > 4:
            raise RuntimeError("out of memory")
        clock.advance(1e-3)
        return x.clone()

    case = BenchCase(
        op="fake", label="f", impls={"reference": fake_impl("reference", clock, lambda i: 2.0, log, x)}
    )
    case.impls["flaky"] = flaky
    rows = {r.impl: r for r in run_case(case, CPU, 1.0, 0.02, clock=clock)}
    assert rows["flaky"].ok is False and "out of memory" in rows["flaky"].error
    assert rows["reference"].ok and rows["reference"].reps >= 5


def test_results_json_has_spread_columns(tmp_path):
    clock, log = FakeClock(), []
    rows = run_case(
        _case(clock, log, {"reference": lambda i: 2.0, "cpu": lambda i: 1.0}), CPU, 1.0, 0.01, clock=clock
    )
    path = tmp_path / "bench.json"
    write_results(path, _ENV, rows)
    data = json.loads(path.read_text())
    row = data["rows"][1]
    for key in ("median_ms", "min_ms", "q1_ms", "q3_ms", "max_ms", "iqr_pct", "reps", "noisy"):
        assert key in row
    assert row["vs_reference"] == pytest.approx(2.0)
    header = path.with_suffix(".csv").read_text().splitlines()[0]
    assert "iqr_pct" in header and "noisy" in header


_ENV = {
    "device": "cpu",
    "device_type": "cpu",
    "copy_bandwidth_gbps": 10.0,
    "torch": torch.__version__,
    "triton": None,
    "fastvision": "0",
    "git_revision": None,
    "noise_threshold_pct": 10.0,
}


def test_table_warns_when_the_machine_was_loaded():
    clock, log = FakeClock(), []
    rows = run_case(_case(clock, log, {"reference": lambda i: 2.0}), CPU, 1.0, 0.01, clock=clock)
    assert "warning: load average" not in format_table(_ENV, rows)
    loaded = {**_ENV, "cpu_count": 2, "load_avg_start": 1.0, "load_avg_end": 7.5}
    assert "warning: load average 7.5 on 2 CPUs" in format_table(loaded, rows)


def _timed(op, case, impl, ms, ok=True):
    from fastvision.benchmark.runner import BenchRow

    return BenchRow(op, case, impl, ok, None if ok else "max abs error 1", median_ms=ms if ok else None)


def test_crossover_against_sdpa_from_synthetic_rows():
    """The smallest measured N where the op beats the fastest SDPA of its size; "none" otherwise."""
    from fastvision.benchmark.runner import crossover_lines

    token, block = "topk_attention", "block_topk_attention"
    rows = []
    measured = [(1024, 0.5, 0.2, 0.1), (4096, 0.9, 1.5, 1.0), (16384, 2.0, 9.0, 8.0)]
    for n, sparse_ms, sdpa_ms, flash_ms in measured:
        rows += [
            _timed(token, f"fwd bf16 BH32 N{n} D64 k32", "reference", 50.0),  # the definition: not the op
            _timed(token, f"fwd bf16 BH32 N{n} D64 k32", "compile", 0.01),  # nor its compiled form
            _timed(token, f"fwd bf16 BH32 N{n} D64 k32", "triton", sparse_ms),
            _timed(token, f"fwd bf16 BH32 N{n} D64 k128", "triton", 100.0),  # never faster
            _timed(token, f"fwd bf16 BH32 N{n} D64 dense", "reference", sdpa_ms),
            _timed(token, f"fwd bf16 BH32 N{n} D64 dense", "sdpa-flash", flash_ms),
            _timed(block, f"fwd bf16 BH32 N{n} D64 blocks1x32", "triton", 0.05),
            _timed(block, f"fwd bf16 BH32 N{n} D64 blocks1x32", "flex", 0.01),  # the peer: not the op
            _timed(block, f"fwd bf16 BH32 N{n} D64 dense", "reference", sdpa_ms),
        ]
    rows.append(_timed(token, "fwd bf16 BH32 N4096 D128 k32", "triton", 0.9))  # slower than flash
    rows.append(_timed(token, "fwd bf16 BH32 N4096 D128 dense", "sdpa-flash", 0.8))
    rows.append(_timed(token, "fwd bf16 BH32 N16384 D128 k32", "triton", 0.1, ok=False))  # failed check
    rows.append(_timed(token, "fwd bf16 BH32 N16384 D128 dense", "sdpa-flash", 0.8))
    rows.append(_timed("geglu", "fwd bf16 BH32 N16384 D128 dense", "sdpa-flash", 0.8))  # not attention
    lines = crossover_lines(rows)
    assert lines == [
        "crossover vs SDPA: topk_attention (token mode) fwd bf16 BH32 D64 k128: none within the measured "
        "sizes (N = 1024, 4096, 16384)",
        "crossover vs SDPA: topk_attention (token mode) fwd bf16 BH32 D64 k32: N = 4096 "
        "(0.9 ms vs SDPA 1 ms, 1.11x)",
        "crossover vs SDPA: topk_attention (token mode) fwd bf16 BH32 D128 k32: none within the measured "
        "sizes (N = 4096)",
        "crossover vs SDPA: block_topk_attention (block mode) fwd bf16 BH32 D64 blocks1x32: N = 1024 "
        "(0.05 ms vs SDPA 0.2 ms, 4.00x)",
    ]

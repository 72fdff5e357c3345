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
    table = format_table(_ENV, list(rows.values()), full=True)
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


# ---------------------------------------------------------------------------------------------
# The default output (issue 29 §2) and the cost model (issue 22 §3)


def _row(op, case, impl, ms, ok=True, **fields):
    from fastvision.benchmark.runner import BenchRow

    role = {"reference": "reference", "compile": "compile", "liger": "peer"}.get(impl, "package")
    error = None if ok else "max abs error 1"
    row = BenchRow(op, case, impl, ok, error, median_ms=ms if ok else None, role=role)
    for name, value in fields.items():
        setattr(row, name, value)
    return row


def _synthetic_rows():
    return [
        _row("geglu", "fwd bf16 4096x8192", "reference", 2.0, bytes_moved=3 << 26),
        _row("geglu", "fwd bf16 4096x8192", "compile", 1.0, vs_reference=2.0, bytes_moved=3 << 26),
        _row("geglu", "fwd bf16 4096x8192", "triton", 0.5, vs_reference=4.0, vs_compile=2.0, vs_peer=1.5,
             bytes_moved=3 << 26, pct_copy_bw=80.0),  # fmt: skip
        _row("geglu", "fwd bf16 4096x8192", "liger", 0.75, vs_reference=2.7, bytes_moved=3 << 26),
        _row("geglu", "fwd fp32 64x128", "reference", 0.01, bytes_moved=3 << 14),
        _row("geglu", "fwd fp32 64x128", "triton", 0.02, vs_reference=0.5, bytes_moved=3 << 14,
             pct_copy_bw=140.0, cache_resident=True),  # fmt: skip
        _row("grn", "fwd fp32 8x56x56x96", "reference", 1.0),
        _row("grn", "fwd fp32 8x56x56x96", "cpu", 1.25, vs_reference=0.8, noisy=True),
        _row("grn", "fwd fp32 8x56x56x96", "triton", None, ok=False),
        _row("attn", "fwd bf16 BH8 N1024 D64 dense", "reference", 1.0),
        _row("attn", "fwd bf16 BH8 N1024 D64 dense", "sdpa-flash", 0.1, role="peer", vs_reference=10.0),
    ]


def test_summary_fits_100_columns_one_line_per_op_and_ends_with_the_verdict():
    from fastvision.benchmark.runner import format_summary

    rows = _synthetic_rows()
    loaded = {"cpu_count": 2, "load_avg_start": 1.0, "load_avg_end": 7.5}
    text = format_summary({**_ENV, **loaded, "device": "x" * 40}, rows)
    lines = text.splitlines()
    assert all(len(line) <= 100 for line in lines), max(lines, key=len)
    op_lines = [line for line in lines if line.split(" ")[0] in ("geglu", "grn", "attn")]
    assert [line.split()[0] for line in op_lines] == ["geglu", "grn", "attn"]
    geglu = op_lines[0].split()
    # Best backend at the largest case (by bytes) and its median; geomean and range of its ratios.
    assert geglu[1:4] == ["triton", "0.5000", "1.41x"] and "(0.50-4.00)" in op_lines[0]
    assert "2.00x" in op_lines[0] and "1.50x" in op_lines[0]  # over compile and the peer (one case each)
    assert "NOISY" not in op_lines[0] and "NOISY 1/1" in text  # only where it applies: grn's cpu row
    assert "(no package implementation timed)" in op_lines[2]
    assert "  checks: compile ok, triton ok, liger ok" in lines
    assert any("triton FAIL 1/1" in line for line in lines)
    assert "warning: load average 7.5 on 2 CPUs" in text
    verdict = " ".join(line.strip() for line in lines[-3:])
    assert "6 checks passed, 1 failed; 2 cases slower than the reference: " in verdict
    small = "geglu fwd fp32 64x128 triton 0.50x (per-call overhead at a small size (reference 10 us))"
    assert small in verdict
    assert "grn fwd fp32 8x56x56x96 cpu 0.80x (noisy measurement: within the spread)" in verdict


def test_exit_code_follows_the_checks():
    from fastvision.benchmark.runner import exit_code

    rows = _synthetic_rows()
    assert exit_code(rows) == 1
    assert exit_code([r for r in rows if r.ok]) == 0


def test_full_table_labels_cache_resident_shares_and_names_the_op_in_notes():
    from fastvision.benchmark.runner import format_table

    rows = _synthetic_rows()
    rows[3].note = "LigerGELUMulFunction(gate, value)"
    text = format_table(_ENV, rows, full=True)
    small = next(line for line in text.splitlines() if "64x128" in line and "triton" in line)
    large = next(line for line in text.splitlines() if "4096x8192" in line and "triton" in line)
    assert " cache " in small and " 140 " not in small and " 80 " in large
    assert "note: geglu liger: LigerGELUMulFunction(gate, value)" in text
    assert text.splitlines()[-1].startswith("6 checks passed, 1 failed")


def test_case_reason_for_being_slower_is_used():
    from fastvision.benchmark.runner import verdict_line

    rows = _synthetic_rows()
    rows[7].slower_because = "the reference is chosen by dispatch here"
    assert "cpu 0.80x (the reference is chosen by dispatch here)" in verdict_line(rows)
    # Noise explains a small shortfall only; far slower is the kernel; the interpreter is no speed.
    rows[7].slower_because, rows[7].vs_reference = "", 0.3
    assert "cpu 0.30x (the kernel is slower here (see --full))" in verdict_line(rows)
    rows[5].device_type = "cpu"
    assert "triton 0.50x (Triton's interpreter on the CPU" in verdict_line(rows)


def test_cost_model_hand_computed_cases():
    from fastvision.benchmark.cost_model import (
        H100,
        predict,
        warp_instructions_from_sass,
        with_measured_bandwidth,
    )

    # 3 GB at 3.0 TB/s: 1 ms; nothing else modelled.
    p = predict(bytes_moved=3_000_000_000)
    assert p.memory_ms == pytest.approx(1.0) and p.binds == "memory" and p.bound_ms == pytest.approx(1.0)
    assert p.compute_ms is None and p.issue_ms is None
    # 8e11 FLOPs on wgmma (800 TFLOP/s): 1 ms; on mma.sync (400): 2 ms; on CUDA cores (60): 13.33 ms.
    assert predict(flops=800_000_000_000, flop_class="wgmma").compute_ms == pytest.approx(1.0)
    assert predict(flops=800_000_000_000, flop_class="mma").compute_ms == pytest.approx(2.0)
    assert predict(flops=800_000_000_000, flop_class="cuda_core").compute_ms == pytest.approx(800 / 60)
    # Issue: 132 SMs x 4 schedulers x 1.98 GHz = 1.04544e12 warp instructions per second.
    assert H100.warp_instructions_per_s == pytest.approx(1.04544e12)
    # 20 instructions per score over 2^30 scores: 20 * 2^30 / 32 warp instructions = 0.642 ms.
    warps = warp_instructions_from_sass(20.0, 1 << 30)
    assert warps == 20 * (1 << 30) / 32
    p = predict(bytes_moved=300_000_000, flops=80_000_000_000, flop_class="mma", warp_instructions=warps)
    assert p.memory_ms == pytest.approx(0.1) and p.compute_ms == pytest.approx(0.2)
    assert p.issue_ms == pytest.approx(warps / 1.04544e12 * 1e3) and p.binds == "issue"
    assert p.bound_ms == pytest.approx(0.6418, rel=1e-3)
    assert "issue binds" in p.describe()
    # A measured bandwidth replaces the assumed one; the share of the floor is predicted / measured.
    measured = with_measured_bandwidth(H100, 2500.0)
    p = predict(bytes_moved=2_500_000_000, device=measured)
    assert p.bound_ms == pytest.approx(1.0) and "measured" in measured.bandwidth_source
    assert p.share_of_floor(2.0) == pytest.approx(0.5) and p.share_of_floor(None) is None
    assert predict().binds == "not modelled" and predict().bound_ms is None
    with pytest.raises(ValueError, match="flop_class"):
        predict(flops=10)
    with pytest.raises(ValueError, match="flop_class must be one of"):
        predict(flops=10, flop_class="tensor")
    with pytest.raises(ValueError, match="non-negative"):
        predict(bytes_moved=-1)


def test_gpu_rows_carry_the_prediction_beside_the_measurement():
    """run_case with a device model (as on CUDA) puts the bound and measured/predicted on every row."""
    from fastvision.benchmark.cost_model import H100

    clock, log = FakeClock(), []
    case = _case(clock, log, {"reference": lambda i: 2.0, "cpu": lambda i: 1.0})
    case.bytes_moved = 3_000_000_000  # 1 ms at 3.0 TB/s
    rows = {r.impl: r for r in run_case(case, CPU, 10.0, 0.02, clock=clock, model=H100, llc_bytes=1 << 20)}
    cpu = rows["cpu"]
    assert cpu.predicted_ms == pytest.approx(1.0) and cpu.binds == "memory"
    assert cpu.measured_over_predicted == pytest.approx(1.0) and not cpu.cache_resident
    assert rows["reference"].measured_over_predicted == pytest.approx(2.0)
    # Without a model (CPU runs) nothing is predicted.
    plain = run_case(case, CPU, 10.0, 0.02, clock=clock)
    assert all(r.predicted_ms is None for r in plain)


def test_check_allows_a_stated_share_of_mismatched_rows_only():
    from fastvision.benchmark.runner import check_output

    expected = torch.zeros(1000, 8)
    actual = expected.clone()
    actual[:2, 3] = 1.0  # two rows differ (0.2%)
    assert "max abs error 1" in check_output(actual, expected, (1e-5, 1e-5))
    assert check_output(actual, expected, (1e-5, 1e-5), max_mismatched_rows=0.002) is None
    actual[2:5, 0] = 1.0  # five rows: more than allowed
    error = check_output(actual, expected, (1e-5, 1e-5), max_mismatched_rows=0.002)
    assert error == "max abs error 1 in 5 of 1000 rows (allowed 0.20%)"


def test_peer_output_is_converted_for_the_check_only():
    """A peer returning another layout is timed as it returns it; ``adapt`` joins it for the check."""
    clock, log = FakeClock(), []
    x = torch.arange(6.0).reshape(2, 3)
    reference = fake_impl("reference", clock, lambda i: 1.0, log, x)
    case = BenchCase(op="fake", label="f", impls={"reference": reference})
    calls = []

    def peer():
        calls.append(1)
        clock.advance(1e-3)
        return x[:, :1].clone(), x[:, 1:].clone()

    case.impls["peer"] = peer
    case.adapt["peer"] = lambda parts: torch.cat(parts, dim=-1)
    rows = {r.impl: r for r in run_case(case, CPU, 1.0, 0.01, clock=clock)}
    assert rows["peer"].ok and rows["peer"].median_ms == pytest.approx(1.0)
    del case.adapt["peer"]
    rows = {r.impl: r for r in run_case(case, CPU, 1.0, 0.01, clock=clock)}
    assert not rows["peer"].ok and "2 outputs, expected 1" in rows["peer"].error


def test_gpu_cases_are_predicted_without_a_gpu():
    """The GPU benchmark cases are built on fake tensors and each gets the model's bound: GEGLU's
    forward at bf16 4096 x 8192 reads 2^25 and writes 2^24 bf16 values, 100,663,296 bytes: 33.55 us
    at 3.0 TB/s, memory-bound (it declares no FLOPs)."""
    from fastvision.benchmark.runner import predicted_gpu_cases

    rows, skipped = predicted_gpu_cases(["geglu"])
    assert not skipped and len(rows) == 24
    row = next(r for r in rows if r["case"] == "fwd none bfloat16 4096x8192")
    assert row["bytes"] == 100_663_296 and row["binds"] == "memory"
    assert row["bound_ms"] == pytest.approx(100_663_296 / 3e12 * 1e3)

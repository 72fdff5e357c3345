"""Kernel budgets on sm_90 without a GPU (``bench/kernel_budget.py``).

Every launch configuration of every Triton kernel compiles for sm_90 within the shared-memory and
register limits and its spill allowance; the CUDA kernels built into ``fastvision._C`` (when the
extension holds CUDA code) stay within theirs. The check runs in a subprocess with
``TRITON_INTERPRET`` unset: the interpreter accepts code that real compilation rejects.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastvision._backend import triton_importable

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "kernel_budget.py"
COMMITTED = ROOT / "bench" / "results" / "kernel_budget.json"

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not installed")


def _run(*args: str, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    command = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def budget(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("kernel_budget")
    result = _run("--out-dir", str(out), "--quiet")
    report = (
        json.loads((out / "kernel_budget.json").read_text()) if (out / "kernel_budget.json").exists() else {}
    )
    return result, report


def test_every_kernel_configuration_fits_sm90(budget):
    result, report = budget
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    assert report["triton"], "no Triton configuration was checked"
    assert not report["missing"], f"Triton modules without launch_configs(): {report['missing']}"
    for row in report["triton"] + report["cuda"]:
        assert row["verdict"] == "ok", row


def test_committed_table_lists_the_current_configurations(budget):
    """The committed table covers exactly the configurations the launchers can choose today."""
    _, report = budget
    committed = json.loads(COMMITTED.read_text())

    def keys(rep):
        return sorted(
            (r["module"], r["kernel"], r["config"], r["dtype"], r["variant"]) for r in rep["triton"]
        )

    stale = "bench/results/kernel_budget.* is out of date: run `python bench/kernel_budget.py` and commit it"
    assert keys(committed) == keys(report), stale
    if committed["tools"] != report["tools"]:
        return  # another Triton or ptxas compiles differently; the configurations still match
    # Same configurations, same compiled code: the key hashes every input of the compilation.
    changed = {r["key"] for r in report["triton"]} - {r["key"] for r in committed["triton"]}
    assert not changed, f"{len(changed)} configurations compile differently now; {stale}"


def test_over_budget_configuration_fails():
    result = _run(
        "--module",
        "kernel_budget_fixtures",
        "--no-cuda",
        "--no-write",
        pythonpath=str(ROOT / "tests" / "scripts"),
    )
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    fits = [line for line in lines if "| fits |" in line]
    assert len(fits) == 1 and fits[0].endswith("| ok |")
    assert any("FAIL triton" in line and "too much shared" in line and "> 232448 B" in line for line in lines)


def _module():
    spec = importlib.util.spec_from_file_location("kernel_budget", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("kernel_budget", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


RESOURCE_USAGE = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function geglu_forward_kernel:
  REG:72 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:576 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN10fastvision12_GLOBAL__N_111pool_kernelIfLi1EiEEvPKT_:
  REG:32 STACK:8 SHARED:1024 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
	code for sm_90a
		Function : geglu_forward_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;             /* 0x00000a00ff017b82 */
                                                                      /* 0x000e220000000800 */
        /*0010*/                   STL.64 [R1], R6 ;                  /* 0x0000000601007387 */
        /*0020*/               @P0 LDL.LU.64 R6, [R1] ;               /* 0x0000000001067983 */
        /*0030*/                   NOP ;                              /* 0x0000000000007918 */
        /*0040*/                   EXIT ;                             /* 0x000000000000794d */
"""


def test_parsers_read_cuobjdump_output():
    kb = _module()
    usage = kb.parse_resource_usage(RESOURCE_USAGE)
    assert usage["geglu_forward_kernel"]["REG"] == 72 and usage["geglu_forward_kernel"]["STACK"] == 16
    assert usage["_ZN10fastvision12_GLOBAL__N_111pool_kernelIfLi1EiEEvPKT_"]["SHARED"] == 1024
    assert kb.parse_sass(SASS) == {"geglu_forward_kernel": (4, 2)}  # NOP not counted; 2 local accesses
    name = "void fastvision::(anonymous namespace)::pool_kernel<float, 1, int>(float const*, int)"
    assert kb._split_cuda_name(name) == ("pool_kernel", "float, 1, int")


def test_limits_and_allowances():
    kb = _module()

    def row(**fields):
        base = dict(backend="triton", module="m", kernel="k", config="c", dtype="fp32")
        return kb.Row(**{**base, **fields})

    assert kb._judge(row(registers=128, spill_bytes=0, shared_bytes=232_448), 128).verdict == "ok"
    assert "shared" in kb._judge(row(shared_bytes=232_449), 128).problems[0]
    assert "registers x 1024 threads" in kb._judge(row(registers=65), 1024).problems[0]
    assert kb._judge(row(spill_bytes=8, allowance_bytes=8), 128).verdict == "ok"
    assert "allowance 0 B" in kb._judge(row(spill_bytes=8), 128).problems[0]


def test_fastvision_info_prints_the_committed_table(capsys):
    from fastvision.cli import main

    assert main(["info", "--kernels"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Kernel budgets on sm_90") and "| verdict |" in out


def test_selection_compiles_as_a_contiguous_launch():
    """The selection kernel is compiled as Triton specializes a launch on contiguous tensors: unit
    head-dim strides become the constant 1, the other strides and the pointers divisible by 16."""
    kb = _module()
    from fastvision.triton_kernels.topk_attention import launch_configs

    launch = next(c for c in launch_configs() if c.name == "_select_topk_kernel")
    signature, constexprs, attrs = kb.specialized(launch)
    assert signature["stride_qd"] == signature["stride_kd"] == "constexpr"
    assert constexprs["stride_qd"] == constexprs["stride_kd"] == 1
    names = list(signature)
    divisible = {names[i] for (i,) in attrs}
    assert {"q_ptr", "k_ptr", "idx_ptr", "stride_qn", "stride_kn", "stride_qh", "stride_kb"} <= divisible
    assert "num_keys" not in divisible and signature["num_keys"] == "i32"  # sizes stay general
    assert "stride_qd" in kb.specialization_label(launch)

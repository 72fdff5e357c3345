"""Kernel budgets on sm_90, checked without a GPU.

Compiles every launch configuration of every Triton kernel for sm_90 (H100/H200) and reads the
resources of the CUDA kernels built into ``fastvision._C``, then reports per kernel and
configuration: registers per thread, spilled (local-memory) bytes per thread, shared memory per
block, and static SASS instruction counts. Exits 1 when a configuration

- needs more shared memory than sm_90 gives a block (232,448 B),
- needs more than 255 registers per thread, or more than 65,536 registers per block,
- spills more bytes per thread than the allowance written next to the kernel, or
- fails to compile,

or when a Triton module has no ``launch_configs()`` (unless ``--allow-missing``).

Triton: the modules are those named by the op registry (``fastvision.ops.OPS[*].triton_module``).
Each module's ``launch_configs()`` yields ``KernelLaunch`` descriptions
(``fastvision/triton_kernels/_launch.py``) built by the same tile-choosing code its launchers call;
each is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` in a
worker process with ``TRITON_INTERPRET`` unset. Shared memory is ``metadata.shared``; registers
and stack (spill) bytes come from ``cuobjdump --dump-resource-usage`` on the cubin. Spill
allowances: ``SPILL_ALLOWANCE: dict[str, SpillAllowance]`` in the kernel's module, keyed by kernel
name; a kernel without one may spill 0 bytes.

CUDA: ``cuobjdump --dump-resource-usage`` and ``--dump-sass`` on the built ``fastvision/_C*.so``
(names demangled with ``c++filt``). Shared memory is the static amount; dynamic shared memory is
chosen at launch and does not appear in the binary. Spill allowances for CUDA kernels are
``CUDA_SPILL_ALLOWANCE`` below, keyed by the kernel's unqualified name (without template
arguments).

SASS instruction counts are static counts of the compiled code: a first prediction of a
compute-bound kernel's cost, not a measurement. ``LDL/STL`` counts local-memory loads and stores
(where spills show up in the code).

Writes ``bench/results/kernel_budget.md`` and ``.json`` (``--out-dir``; ``--no-write`` skips).
Triton's own cache (``~/.triton/cache``) makes a repeated run take seconds.

    python bench/kernel_budget.py [--jobs N] [--module fastvision.triton_kernels.geglu] [--allow-missing]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastvision.triton_kernels._launch import KernelLaunch, SpillAllowance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# sm_90 limits per block and per thread.
MAX_SHARED_BYTES = 232_448
MAX_REGISTERS_PER_THREAD = 255
MAX_REGISTERS_PER_BLOCK = 65_536
ARCH = 90

# Spill allowances of the CUDA kernels in csrc/cuda/: by instantiation ("pool_kernel<float, 1, int>",
# template arguments as c++filt prints them) or by unqualified kernel name for all instantiations.
_SMALL_FRAME = (
    "16-24 B stack frame at 40 registers, so not register pressure: most likely the call frame of the "
    "64-bit integer division and remainder in slot_offset (4-14 LDL/STL in the whole kernel); to confirm "
    "in a GPU profile"
)
_GRID_STRIDE_SLOT = (
    "8 B stack frame: one loop-invariant value of the grid-stride loop, stored once before the loop and "
    "reloaded once per iteration of it; no local-memory access in the inner loops (SASS: 2-3 LDL/STL in all)"
)
CUDA_SPILL_ALLOWANCE: dict[str, SpillAllowance] = {
    **{f"pool_kernel<double, 1, {i}>": SpillAllowance(8, _GRID_STRIDE_SLOT) for i in ("int", "long")},
    "backward_kernel<double, 1>": SpillAllowance(16, _SMALL_FRAME),
    "backward_kernel<double, 2>": SpillAllowance(24, _SMALL_FRAME),
    "backward_kernel<float, 4>": SpillAllowance(16, _SMALL_FRAME),
    **{
        f"selective_scan_backward_kernel<{t}, false, false>": SpillAllowance(
            8,
            "8 B stack frame at 128 registers in the 16-bit backward with fixed B and C (5 LDL/STL in the "
            "whole kernel, none known to sit in the per-step loop); to confirm in a GPU profile",
        )
        for t in ("c10::Half", "c10::BFloat16")
    },
}


def triton_modules() -> list[str]:
    """The Triton kernel modules to check: every ``triton_module`` in the op registry."""
    from fastvision.ops import OPS

    registered = [spec.triton_module for spec in OPS.values() if spec.triton_module]
    return list(dict.fromkeys(registered))


@dataclass
class Row:
    backend: str  # "triton" or "cuda"
    module: str
    kernel: str
    config: str
    dtype: str
    variant: str = ""  # constexprs and non-data pointer types, when several configurations share a label
    num_warps: int | None = None
    num_stages: int | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    sass_instructions: int | None = None
    local_memory_instructions: int | None = None
    # The outermost loop of the SASS (see loop_profile): static size, its cheapest iteration, and the
    # largest loop nested in it; per score where the module declares SASS_LOOP_WORK for the kernel.
    loop_static: int | None = None
    loop_fast_path: int | None = None
    loop_inner_step: int | None = None
    loop_slow_path: int | None = None
    loop_scores_per_thread: float | None = None
    # Instruction classes of the hot loop (the outermost loop; the whole kernel when it has none):
    # see HOT_LOOP_CLASSES. hot_scope: "loop" or "kernel".
    hot_loop: dict[str, int] | None = None
    hot_scope: str = ""
    # What HOT_LOOP declares for the kernel, and the declared expectations the code does not meet that
    # are recorded deficits (KNOWN_DEFICITS: an open issue tracks them); an undeclared miss is a problem.
    expects: str = ""
    deficits: list[str] = field(default_factory=list)
    # Arguments specialized as a real launch would (see launch_values).
    specialization: str = ""
    allowance_bytes: int = 0
    allowance_reason: str = ""
    verdict: str = "ok"
    problems: list[str] = field(default_factory=list)
    compile_error: str | None = None
    key: str = ""  # hash of the compilation's inputs (Triton); a cache key for later runs


# ---------------------------------------------------------------------------------------------
# Tools


def _tool(name: str) -> str | None:
    """A CUDA binary tool: Triton's bundled copy first (always present with triton), then CUDA's."""
    candidates = []
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidates.append(Path(cuda_home) / "bin" / name)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which(name)


def _tool_version(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


_RESOURCE = re.compile(r"^\s*Function (\S+):\s*$")
_FIELDS = re.compile(r"(\w+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` output → {mangled name: {"REG": .., "STACK": .., ...}}."""
    result: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        match = _RESOURCE.match(line)
        if match:
            current = match.group(1)
            continue
        if current is not None and "REG:" in line:
            result[current] = {k: int(v) for k, v in _FIELDS.findall(line)}
            current = None
    return result


_SASS_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def parse_sass(text: str) -> dict[str, tuple[int, int]]:
    """``cuobjdump --dump-sass`` output → {mangled name: (instructions, local loads + stores)}."""
    counts: dict[str, list[int]] = {}
    current = None
    for line in text.splitlines():
        match = _SASS_FUNCTION.match(line)
        if match:
            current = match.group(1)
            counts[current] = [0, 0]
            continue
        if current is None:
            continue
        match = _SASS_INSTRUCTION.match(line)
        if match:
            opcode = match.group(1).split(".")[0]
            if opcode == "NOP":
                continue
            counts[current][0] += 1
            if opcode in ("LDL", "STL"):
                counts[current][1] += 1
    return {name: (n, local) for name, (n, local) in counts.items()}


_SASS_CODE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")


def parse_sass_code(text: str) -> dict[str, list[tuple[int, bool, str, str]]]:
    """``cuobjdump --dump-sass`` → {name: [(address, predicated, opcode, operands)]}, NOPs left out."""
    code: dict[str, list[tuple[int, bool, str, str]]] = {}
    current = None
    for line in text.splitlines():
        match = _SASS_FUNCTION.match(line)
        if match:
            current = match.group(1)
            code[current] = []
            continue
        match = _SASS_CODE.match(line) if current is not None else None
        if match and match.group(3).split(".")[0] != "NOP":
            address, predicate, opcode, operands = match.groups()
            code[current].append((int(address, 16), bool(predicate), opcode, operands))
    return code


def loop_profile(code: list[tuple[int, bool, str, str]]) -> dict[str, int] | None:
    """Static instruction counts of the outermost loop of one kernel's SASS (the backward branch with
    the longest span that holds no unconditional EXIT): ``static``, the instructions between its head
    and its back edge; ``fast_path``, the fewest instructions from the head to the back edge along
    the code's branches (the cheapest iteration: every conditional branch may go either way;
    ``BRA.DIV``, taken only by a diverged warp, is not followed); ``inner_step``, the instructions
    of the largest loop nested in it (0 if none); ``slow_path``, the costliest single pass (the most
    instructions on a shortest head-to-back-edge path through any one instruction, nested loops
    entered once); ``head`` and ``tail``, the loop's first and last instruction (indexes into ``code``).
    ``None`` when the kernel has no loop."""
    index = {address: i for i, (address, *_rest) in enumerate(code)}

    def target(i: int) -> int | None:
        _, _, opcode, operands = code[i]
        if opcode.split(".")[0] != "BRA" or opcode.startswith("BRA.DIV"):
            return None
        match = _TARGET.search(operands)
        return index.get(int(match.group(1), 16)) if match else None

    exits = [i for i, (_, predicated, opcode, _) in enumerate(code) if opcode == "EXIT" and not predicated]
    # A branch to itself is the trap after the final EXIT, not a loop. A backward branch over the
    # kernel's final EXIT is a jump back from out-of-line code (e.g. the shuffles of a diverged warp).
    back_edges = [
        (t, i)
        for i in range(len(code))
        if (t := target(i)) is not None and t < i and not any(t <= e <= i for e in exits)
    ]
    if not back_edges:
        return None
    head, tail = max(back_edges, key=lambda edge: edge[1] - edge[0])
    inner = [i - t + 1 for t, i in back_edges if head < t and i < tail]
    # Breadth-first search over instructions (each costs one) from the head to the back edge.
    distance = {head: 1}
    frontier = [head]
    while frontier and tail not in distance:
        following = []
        for i in frontier:
            _, predicated, opcode, operands = code[i]
            unconditional = not predicated and not re.match(r"\s*!?U?P\d", operands)
            successors = []
            jump = target(i)
            if jump is not None:
                successors.append(jump)
            ends = opcode.split(".")[0] in ("EXIT", "RET") or (jump is not None and unconditional)
            if not (ends and unconditional):
                successors.append(i + 1)
            for j in successors:
                if head <= j <= tail and j not in distance:
                    distance[j] = distance[i] + 1
                    following.append(j)
        frontier = following
    # The costliest single pass: for each instruction, the shortest head-to-tail path through it
    # (nested loops entered once, not repeated); the largest (the selection: a merge).
    succ = {i: [] for i in range(head, tail + 1)}
    for i in range(head, tail + 1):
        _, predicated, opcode, operands = code[i]
        unconditional = not predicated and not re.match(r"\s*!?U?P\d", operands)
        jump = target(i)
        nexts = [jump] if jump is not None else []
        ends = opcode.split(".")[0] in ("EXIT", "RET") or (jump is not None and unconditional)
        if not (ends and unconditional):
            nexts.append(i + 1)
        succ[i] = [j for j in nexts if head <= j <= tail and (j > i or i == tail)]

    def reach(start: int, edges: dict[int, list[int]]) -> dict[int, int]:
        seen, queue = {start: 1}, [start]
        for i in queue:
            for j in edges.get(i, []):
                if j not in seen:
                    seen[j] = seen[i] + 1
                    queue.append(j)
        return seen

    back: dict[int, list[int]] = {}
    for i, nexts in succ.items():
        for j in nexts:
            back.setdefault(j, []).append(i)
    forward, backward = reach(head, succ), reach(tail, back)
    through = [forward[i] + backward[i] - 1 for i in forward if i in backward]
    return {
        "head": head,
        "tail": tail,
        "static": tail - head + 1,
        "fast_path": distance.get(tail, 0),
        "inner_step": max(inner, default=0),
        "slow_path": max(through, default=0),
    }


def async_copy_loop(code: list[tuple[int, bool, str, str]]) -> dict[str, int] | None:
    """``loop_profile`` of the smallest loop holding async copies (LDGSTS/UTMALDG), with ``head`` and
    ``tail`` indexes into ``code``: the pipelined key loop of a kernel whose outermost loop also holds
    other work (the selection: merges between runs of key blocks). ``None`` when no loop has them."""
    index = {address: i for i, (address, *_rest) in enumerate(code)}
    loops = []
    for i, (_, _, opcode, operands) in enumerate(code):
        branch = opcode.split(".")[0] == "BRA" and not opcode.startswith("BRA.DIV")
        match = _TARGET.search(operands) if branch else None
        head = index.get(int(match.group(1), 16)) if match else None
        if head is not None and head < i:
            body = code[head : i + 1]
            if any(op.startswith(("LDGSTS", "UTMALDG")) for _, _, op, _ in body):
                loops.append((i - head, head, i))
    if not loops:
        return None
    _, head, tail = min(loops)
    profile = loop_profile(code[head : tail + 1])
    if profile is None:
        return None
    profile["head"], profile["tail"] = head + profile["head"], head + profile["tail"]
    return profile


# Instruction classes counted in each hot loop (static counts over its SASS), in table order.
HOT_LOOP_CLASSES = {
    "HGMMA": "wgmma (warpgroup MMA: the full-rate Hopper tensor-core path; needs a dot's M >= 64)",
    "HMMA": "mma.sync (warp MMA: about half the wgmma rate)",
    "LDGSTS": "cp.async global->shared copies (Ampere-style async copy)",
    "UTMALDG": "TMA loads through a tensor descriptor",
    "LDG128": "128-bit global loads (LDG.E.128 and wider forms)",
    "STG128": "128-bit global stores",
    "LDG": "global loads, all widths",
    "STG": "global stores, all widths",
    "EX2": "MUFU.EX2 (hardware 2^x)",
    "EXP_NOFTZ": "MUFU.EX2 inside the non-flush-to-zero guard of ex2.approx.f32 (tl.exp): a compare with "
    "-126 and predicated multiplies around it; exp2 with the scale folded has none",
    "SHFL": "warp shuffles",
    "BAR": "block barriers (BAR.*)",
    "LDL/STL": "local-memory loads and stores (spills)",
}


_HALVING = re.compile(r"^\s*(R\d+),\s*(R\d+),\s*0\.5\s*$")
_EX2_SOURCE = re.compile(r"^\s*R\d+,\s*(R\d+)\s*$")


def instruction_classes(code: list[tuple[int, bool, str, str]]) -> dict[str, int]:
    """Counts of ``HOT_LOOP_CLASSES`` in ``code`` (a slice of ``parse_sass_code`` output). A MUFU.EX2
    counts as ``EXP_NOFTZ`` when its source register was halved by a predicated ``FMUL R, R, 0.5``
    before it: ex2.approx.f32 without ``.ftz`` compiles to a compare with -126, that halving, the
    MUFU and a predicated squaring of the result (the scheduler interleaves them with other code)."""
    counts = dict.fromkeys(HOT_LOOP_CLASSES, 0)
    halved: set[str] = set()
    for _, predicated, opcode, operands in code:
        if predicated and opcode == "FMUL" and (m := _HALVING.match(operands)) and m[1] == m[2]:
            halved.add(m[1])
        base, parts = opcode.split(".")[0], opcode.split(".")[1:]
        wide = any(p in ("128", "ENL2") for p in parts)
        if base in ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "SHFL", "BAR", "LDG", "STG"):
            counts[base] += 1
        if base == "LDG" and wide:
            counts["LDG128"] += 1
        elif base == "STG" and wide:
            counts["STG128"] += 1
        elif base in ("LDL", "STL"):
            counts["LDL/STL"] += 1
        elif opcode.startswith("MUFU.EX2"):
            counts["EX2"] += 1
            source = _EX2_SOURCE.match(operands)
            if source and source[1] in halved:
                counts["EXP_NOFTZ"] += 1
                halved.discard(source[1])
    return counts


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out, strict=False)) if len(out) == len(names) else {n: n for n in names}


# ---------------------------------------------------------------------------------------------
# Triton


_CONFIGS: dict[str, list[KernelLaunch]] = {}


def _launch_configs(module_name: str) -> list[KernelLaunch] | None:
    if module_name not in _CONFIGS:
        module = importlib.import_module(module_name)
        if not hasattr(module, "launch_configs"):
            return None
        _CONFIGS[module_name] = list(module.launch_configs())
    return _CONFIGS[module_name]


def _dtype_of(launch: KernelLaunch) -> str:
    if "dtype" in launch.tags:
        return str(launch.tags["dtype"]).removeprefix("torch.")
    for kind in launch.signature.values():
        if kind.startswith("*"):
            return kind[1:]
    return "-"


def _config_label(launch: KernelLaunch) -> str:
    if launch.label:
        return launch.label
    return " ".join(f"{k}={v}" for k, v in launch.constexprs.items())


def _compile_one(module_name: str, index: int) -> dict[str, Any]:
    """Compile ``launch_configs()[index]`` of ``module_name`` for sm_90 and read its resources."""
    launch = _launch_configs(module_name)[index]
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        signature, constexprs, attrs = specialized(launch)
        compiled = triton.compile(
            ASTSource(launch.kernel, signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", ARCH, 32),
            options={"num_warps": launch.num_warps, "num_stages": launch.num_stages},
        )
    except Exception as exc:  # noqa: BLE001  (a configuration that does not compile is a failure)
        lines = traceback.format_exception_only(type(exc), exc)
        return {"error": f"does not compile: {' '.join(line.strip() for line in lines)[-600:]}"}
    result: dict[str, Any] = {"shared": int(compiled.metadata.shared)}
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        return {**result, "error": "cuobjdump not found"}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True, timeout=120
        ).stdout
        sass = subprocess.run(
            [cuobjdump, "--dump-sass", str(cubin)], capture_output=True, text=True, timeout=120
        ).stdout
    resources = parse_resource_usage(usage)
    if not resources:
        return {**result, "error": "cuobjdump reported no function"}
    fields = next(iter(resources.values()))
    counts = parse_sass(sass)
    n_instructions, n_local = next(iter(counts.values())) if counts else (None, None)
    code = parse_sass_code(sass)
    instructions = next(iter(code.values())) if code else []
    loop = loop_profile(instructions) if code else None
    scope = "loop"
    if loop and HOT_LOOP.get(launch.name, {}).get("loop") == "async_copy":
        inner = async_copy_loop(instructions)
        if inner is not None:
            loop, scope = inner, "async-copy loop"
    if loop:
        head, tail = loop.pop("head"), loop.pop("tail")
        result.update({f"loop_{k}": v for k, v in loop.items()})
        result["hot_loop"], result["hot_scope"] = instruction_classes(instructions[head : tail + 1]), scope
    elif instructions:
        result["hot_loop"], result["hot_scope"] = instruction_classes(instructions), "kernel"
    return {
        **result,
        "registers": fields.get("REG"),
        "spill": max(fields.get("STACK", 0), fields.get("LOCAL", 0)),
        "static_shared": fields.get("SHARED", 0),
        "sass": n_instructions,
        "local_instructions": n_local,
    }


# What each kernel's hot loop must run on, keyed by kernel name (issue 22 §2; the targets are those of
# the kernel's issue). Expectations:
#   "tensor_cores": "wgmma" (HGMMA in the loop) or "mma" (HMMA or HGMMA), checked for fp16/bf16 rows;
#   "async_copy": LDGSTS or UTMALDG in the loop (software-pipelined loads);
#   "exp2": no MUFU.EX2 inside the non-flush-to-zero guard of tl.exp;
#   "vector_io": the constexpr holding the tile's contiguous width (e.g. "BLOCK_N"): at least one 128-bit
#   global load in the loop wherever that width holds 16 bytes (narrower rows cannot vectorize);
#   "flat": no loop nested in the hot loop.
# "loop": "async_copy" makes the hot loop the smallest loop holding async copies instead of the
# outermost one (the selection's pipelined key loop; its merges run between runs of it).
_ATTENTION_TARGET = {"tensor_cores": "wgmma", "async_copy": True, "exp2": True}
HOT_LOOP: dict[str, dict[str, Any]] = {
    "_block_attention_forward_kernel": _ATTENTION_TARGET,
    "_block_attention_dq_kernel": _ATTENTION_TARGET,
    "_block_attention_dkdv_kernel": _ATTENTION_TARGET,
    "_select_topk_kernel": {"loop": "async_copy", "tensor_cores": "wgmma", "async_copy": True, "flat": True},
    # Token mode's gather kernels: the forward's scores come from the selection's tensor-core dot;
    # what remains, forward and backward, is per-query (dq) or per-key (dk/dv) work on gathered rows
    # with no operand shared across them (issue 26 §3: a gather backward at memory speed), so the
    # target is 128-bit row loads and exp2, not tensor cores.
    "_sparse_forward_kernel": {"exp2": True, "vector_io": "HEAD_DIM"},
    "_sparse_backward_dq_kernel": {"exp2": True, "vector_io": "HEAD_DIM"},
    "_sparse_backward_dkdv_kernel": {"exp2": True, "vector_io": "HEAD_DIM"},
    "implicit_gemm_kernel": {"tensor_cores": "wgmma", "async_copy": True},
    "weight_grad_kernel": {"tensor_cores": "mma", "async_copy": True},
    "selective_scan_forward_kernel": {"exp2": True},
    "selective_scan_backward_kernel": {"exp2": True},
    "geglu_forward_kernel": {"exp2": True, "vector_io": "BLOCK_N"},
    "geglu_backward_kernel": {"exp2": True, "vector_io": "BLOCK_N"},
    "add_layer_norm_forward_kernel": {"vector_io": "BLOCK_N"},
    "add_layer_norm_backward_kernel": {"vector_io": "BLOCK_N"},
    "grn_apply_kernel": {"vector_io": "BLOCK_C"},
}
# Declared expectations that today's code does not meet, with the issue that tracks the fix: a row
# missing one of these is reported as a deficit (visible in the table), not as a pass and not as a
# failure of the check; a miss not listed here fails the check.
_BLOCK = "issue 25: block top-k on wgmma, TMA, exp2"
_MEMBOUND, _SCAN = "issue 27: memory-bound kernels at the floor", "issue 24: selective scan"
KNOWN_DEFICITS: dict[tuple[str, str], str] = {
    ("_block_attention_forward_kernel", "tensor_cores"): _BLOCK,
    ("_block_attention_forward_kernel", "exp2"): _BLOCK,
    ("_block_attention_dq_kernel", "tensor_cores"): _BLOCK,
    ("_block_attention_dq_kernel", "exp2"): _BLOCK,
    ("_block_attention_dkdv_kernel", "tensor_cores"): _BLOCK,
    ("_block_attention_dkdv_kernel", "exp2"): _BLOCK,
    ("add_layer_norm_forward_kernel", "vector_io"): _MEMBOUND,
    ("add_layer_norm_backward_kernel", "vector_io"): _MEMBOUND,
    ("geglu_forward_kernel", "vector_io"): _MEMBOUND,
    ("geglu_backward_kernel", "vector_io"): _MEMBOUND,
    ("geglu_backward_kernel", "exp2"): _MEMBOUND,
    ("grn_apply_kernel", "vector_io"): _MEMBOUND,
    ("selective_scan_forward_kernel", "exp2"): _SCAN,
    ("selective_scan_backward_kernel", "exp2"): _SCAN,
}


def expectation_misses(row: Row) -> list[tuple[str, str]]:
    """[(expectation, what the code has instead)] for the row's kernel's ``HOT_LOOP`` declaration."""
    declared, counts = HOT_LOOP.get(row.kernel, {}), row.hot_loop
    if not declared or counts is None:
        return []
    misses = []
    tensor_cores = declared.get("tensor_cores")
    if tensor_cores and row.dtype in ("fp16", "bf16"):
        got = "wgmma" if counts["HGMMA"] else "mma.sync" if counts["HMMA"] else "no tensor-core instruction"
        if got != "wgmma" and (tensor_cores == "wgmma" or got != "mma.sync"):
            misses.append(("tensor_cores", f"expected {tensor_cores}, got {got}"))
    if declared.get("async_copy") and not (counts["LDGSTS"] or counts["UTMALDG"]):
        misses.append(("async_copy", "expected async copies (LDGSTS/UTMALDG), got synchronous loads"))
    if declared.get("flat") and row.loop_inner_step:
        misses.append(("flat", f"expected no nested loop, got one of {row.loop_inner_step} instructions"))
    if declared.get("exp2") and counts["EXP_NOFTZ"]:
        misses.append(("exp2", f"expected exp2 with the scale folded, got {counts['EXP_NOFTZ']} non-FTZ exp"))
    width_name = declared.get("vector_io")
    if width_name and not counts["LDG128"]:
        constexprs = dict(part.split("=", 1) for part in row.variant.split() if "=" in part)
        element = {"fp32": 4, "fp16": 2, "bf16": 2}.get(row.dtype, 4)
        width = int(constexprs.get(width_name, 0) or 0)
        if width * element >= 16:
            what = f"expected 128-bit global loads ({width_name}={width}), got narrower"
            misses.append(("vector_io", what))
    return misses


def declared_label(kernel: str) -> str:
    declared = HOT_LOOP.get(kernel, {})
    return " ".join(k if v is True else f"{k}={v}" for k, v in declared.items())


def _allowance(table: dict[str, SpillAllowance], name: str) -> SpillAllowance:
    return table.get(name) or SpillAllowance(0, "")


def _judge(row: Row, threads: int | None) -> Row:
    if row.shared_bytes is not None and row.shared_bytes > MAX_SHARED_BYTES:
        row.problems.append(f"shared {row.shared_bytes} B > {MAX_SHARED_BYTES} B")
    if row.registers is not None and row.registers > MAX_REGISTERS_PER_THREAD:
        row.problems.append(f"registers {row.registers} > {MAX_REGISTERS_PER_THREAD}")
    if row.registers is not None and threads and row.registers * threads > MAX_REGISTERS_PER_BLOCK:
        row.problems.append(
            f"{row.registers} registers x {threads} threads > {MAX_REGISTERS_PER_BLOCK} per block"
        )
    if row.spill_bytes is not None and row.spill_bytes > row.allowance_bytes:
        row.problems.append(f"spills {row.spill_bytes} B > allowance {row.allowance_bytes} B")
    if row.backend == "triton":
        row.expects = declared_label(row.kernel)
        for expectation, what in expectation_misses(row):
            issue = KNOWN_DEFICITS.get((row.kernel, expectation))
            if issue:
                row.deficits.append(f"{what} ({issue})")
            else:
                row.problems.append(f"hot loop: {what} (HOT_LOOP declares {expectation})")
    if row.problems:
        row.verdict = "FAIL"
    elif row.deficits:
        row.verdict = "deficit"
    return row


def _variant(launch: KernelLaunch) -> str:
    """What tells this configuration apart from others with the same label: its constexprs and its
    pointer types other than the data type."""
    dtype = _dtype_of(launch)
    parts = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in launch.constexprs.items()]
    parts += [f"{k}:{t}" for k, t in launch.signature.items() if t.startswith("*") and t[1:] != dtype]
    return " ".join(parts)


def contiguous_launch_values(launch: KernelLaunch) -> dict[str, int]:
    """Argument values of a launch on contiguous tensors from torch's allocator (16-byte aligned) whose
    trailing sizes are multiples of 16: every pointer aligned to 16 bytes; of each group of stride
    arguments that differ only in their last letter (``stride_qb .. stride_qd``, ``x_stride_b ..
    x_stride_c``), the last listed (the innermost axis, as the launchers pass ``*t.stride()``) is 1 and
    the others multiples of 16; a stride argument alone in its group (``x_row_stride``) is a row
    stride, a multiple of 16. Sizes (``n_rows``, ``num_keys``, ...) stay general."""
    values: dict[str, int] = {}
    groups: dict[str, list[str]] = {}
    for name, kind in launch.signature.items():
        if kind.startswith("*"):
            values[name] = 16
        elif kind in ("i32", "i64") and "stride" in name:
            groups.setdefault(name[:-1], []).append(name)
    for members in groups.values():
        for name in members:
            values[name] = 1 if len(members) > 1 and name == members[-1] else 4096
    return values


def launch_values(launch: KernelLaunch) -> dict[str, int]:
    """Argument values of a typical launch: ``LAUNCH_SPECIALIZATION`` (kernel name -> function of the
    constexprs giving {argument: value}) in the module defining the kernel when it declares one, else
    ``contiguous_launch_values``. A pointer's value is the alignment of its address in bytes. Declared
    entries that name no argument of the kernel are ignored (one function can serve several kernels)."""
    fn = getattr(launch.kernel, "fn", None)
    module = importlib.import_module(fn.__module__) if fn is not None else None
    declared = getattr(module, "LAUNCH_SPECIALIZATION", {}).get(launch.name)
    if not declared:
        return contiguous_launch_values(launch)
    return {name: value for name, value in declared(launch.constexprs).items() if name in launch.signature}


def _int_specialization(value: int) -> tuple[str, Any]:
    """Triton's launch-time specialization of an integer argument: ("constexpr", 1) for 1, else
    (type, "D") when it is a multiple of 16, (type, "") otherwise."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend

        return tuple(native_specialize_impl(CUDABackend, value, False, True, True))
    except (ImportError, TypeError):  # the same rule, where Triton's own function is not there
        return ("constexpr", 1) if value == 1 else ("i32", "D" if value % 16 == 0 else "")


def specialized(launch: KernelLaunch) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int], list]]:
    """(signature, constexprs, attrs) for ``triton.compile``: what a launch with ``launch_values``
    compiles, as Triton specializes a real launch: an integer equal to 1 becomes the constant 1, an
    integer that is a multiple of 16 and a pointer aligned to 16 bytes get ``tt.divisibility = 16``.
    Arguments without a declared value are not specialized (the general code)."""
    signature, constexprs = dict(launch.signature), dict(launch.constexprs)
    attrs: dict[tuple[int], list] = {}
    names = list(signature)
    for name, value in launch_values(launch).items():
        kind = signature[name]
        if kind.startswith("*"):
            divisible = value % 16 == 0
        else:
            specialization = _int_specialization(int(value))
            if specialization[0] == "constexpr":
                signature[name], constexprs[name] = "constexpr", specialization[1]
                continue
            divisible = specialization[1] == "D"
        if divisible:
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def specialization_label(launch: KernelLaunch) -> str:
    """The assumed specialization in words (empty: none)."""
    signature, constexprs, attrs = specialized(launch)
    names = list(signature)
    ones = [n for n in names if n not in launch.constexprs and signature[n] == "constexpr"]
    divisible = [names[i] for (i,) in sorted(attrs)]
    parts = [f"=1: {','.join(ones)}"] if ones else []
    parts += [f"%16: {','.join(divisible)}"] if divisible else []
    return " ".join(parts)


def launch_key(launch: KernelLaunch, ptxas: str | None) -> str:
    """A hash of everything the compiled code depends on: Triton's key of the kernel's source and the
    jit functions it calls, the signature, constexprs, options, target, Triton and ptxas versions."""
    import triton

    fields = [
        triton.__version__,
        ptxas,
        ARCH,
        launch.kernel.cache_key,
        sorted(launch.signature.items()),
        sorted((k, repr(v)) for k, v in launch.constexprs.items()),
        launch.num_warps,
        launch.num_stages,
    ]
    values = launch_values(launch)
    if values:
        fields.append(sorted(values.items()))
    return hashlib.sha256(json.dumps(fields, default=str).encode()).hexdigest()[:24]


_MEASURED = (
    "registers", "spill_bytes", "shared_bytes", "sass_instructions", "local_memory_instructions",
    "loop_static", "loop_fast_path", "loop_inner_step", "loop_slow_path", "hot_loop", "hot_scope",
)  # fmt: skip


def loop_work(launch: KernelLaunch) -> int | None:
    """Scores (elements) one program handles per iteration of the kernel's main loop, from
    ``SASS_LOOP_WORK`` (kernel name → function of the constexprs) in the module defining the kernel."""
    fn = getattr(launch.kernel, "fn", None)
    module = importlib.import_module(fn.__module__) if fn is not None else None
    work = getattr(module, "SASS_LOOP_WORK", {}).get(launch.name)
    return int(work(launch.constexprs)) if work else None


def load_cache(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Measured fields of earlier results by key (rows that compiled), from kernel_budget.json files.
    The key covers every input of the compilation, so a hit reads what compiling would produce."""
    cache: dict[str, dict[str, Any]] = {}
    for path in paths:
        try:
            rows = json.loads(path.read_text()).get("triton", [])
        except (OSError, ValueError):
            continue
        for row in rows:
            if row.get("key") and row.get("registers") is not None and not row.get("compile_error"):
                cache[row["key"]] = {k: row.get(k) for k in _MEASURED}
    return cache


def _tile_size(launch: KernelLaunch) -> int:
    size = launch.num_warps
    for value in launch.constexprs.values():
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            size *= value
    return size


def representative(configs: list[KernelLaunch]) -> list[int]:
    """Indexes of a representative subset: for each kernel and dtype, the configuration with the
    largest tiles (the product of its integer constexprs and warps) and, for each integer constexpr,
    the configuration with its largest value (the last of equals: launchers list sizes in rising
    order). Shared memory, registers and spills run out first at these."""
    chosen: set[int] = set()
    groups: dict[tuple[str, str], list[int]] = {}
    for i, launch in enumerate(configs):
        groups.setdefault((launch.name, _dtype_of(launch)), []).append(i)
    for members in groups.values():
        measures = [_tile_size]
        names = {k for i in members for k, v in configs[i].constexprs.items() if type(v) is int}
        measures += [
            lambda c, k=k: c.constexprs[k] if type(c.constexprs.get(k)) is int else 0 for k in sorted(names)
        ]
        for measure in measures:
            chosen.add(max(reversed(members), key=lambda i: measure(configs[i])))
    return sorted(chosen)


def check_triton(
    modules: list[str],
    jobs: int,
    cache: dict[str, dict[str, Any]] | None = None,
    subset: bool = False,
    compile_nothing: bool = False,
) -> tuple[list[Row], list[str], list[str], int]:
    """(rows, modules without launch_configs(), modules that fail to import or enumerate, number of
    configurations compiled; the others were read from ``cache``). ``subset``: only the
    ``representative`` configurations; ``compile_nothing``: rows with keys only (a plan)."""
    cache = cache or {}
    ptxas = _tool_version(_tool("ptxas"))
    missing, broken = [], []
    planned: list[tuple[str, int, str]] = []
    for name in modules:
        try:
            configs = _launch_configs(name)
            if configs is None:
                missing.append(name)
                continue
        except ModuleNotFoundError as exc:
            if exc.name != name:
                broken.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            missing.append(f"{name} (no such module)")
            continue
        except Exception as exc:  # noqa: BLE001
            broken.append(f"{name}: {type(exc).__name__}: {exc}".splitlines()[0])
            continue
        chosen = representative(configs) if subset else range(len(configs))
        try:
            planned += [(name, i, launch_key(configs[i], ptxas)) for i in chosen]
        except Exception as exc:  # noqa: BLE001
            broken.append(f"{name}: {type(exc).__name__}: {exc}".splitlines()[0])
    # A cached row from before the loop analysis lacks its loop counts: compile it again when the
    # kernel declares its loop work (the per-score figures need them).
    # Rows from before the hot-loop classes lack them: compile those again too.
    work = [
        (name, i) for name, i, key in planned
        if key not in cache or cache[key].get("hot_loop") is None
        or (cache[key].get("loop_static") is None and loop_work(_CONFIGS[name][i]))
    ]  # fmt: skip
    if compile_nothing:
        work = []
    if jobs > 1 and len(work) > 1:
        # fork: the workers inherit the imported modules and their enumerated configurations.
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            compiled = list(pool.map(_compile_one, *zip(*work, strict=True), chunksize=4))
    else:
        compiled = [_compile_one(name, i) for name, i in work]
    fresh = dict(zip(work, compiled, strict=True))
    rows = []
    for name, index, key in planned:
        launch = _CONFIGS[name][index]
        allowance = _allowance(getattr(importlib.import_module(name), "SPILL_ALLOWANCE", {}), launch.name)
        fn = getattr(launch.kernel, "fn", None)
        if not allowance.bytes and fn is not None and fn.__module__ != name:
            # A kernel another module launches: the allowance written next to the kernel.
            defining = getattr(importlib.import_module(fn.__module__), "SPILL_ALLOWANCE", {})
            allowance = _allowance(defining, launch.name)
        row = Row(
            backend="triton",
            module=name.rsplit(".", 1)[-1],
            kernel=launch.name,
            config=_config_label(launch),
            dtype=_dtype_of(launch),
            variant=_variant(launch),
            specialization=specialization_label(launch),
            num_warps=launch.num_warps,
            num_stages=launch.num_stages,
            allowance_bytes=allowance.bytes,
            allowance_reason=allowance.reason,
            key=key,
        )
        if (name, index) in fresh:
            result = fresh[(name, index)]
            shared = result.get("shared")
            row.registers, row.spill_bytes = result.get("registers"), result.get("spill")
            row.shared_bytes = None if shared is None else shared + result.get("static_shared", 0)
            row.sass_instructions = result.get("sass")
            row.local_memory_instructions = result.get("local_instructions")
            row.loop_static, row.loop_fast_path = result.get("loop_static"), result.get("loop_fast_path")
            row.loop_inner_step = result.get("loop_inner_step")
            row.loop_slow_path = result.get("loop_slow_path")
            row.hot_loop, row.hot_scope = result.get("hot_loop"), result.get("hot_scope", "")
            if "error" in result:
                row.compile_error = result["error"]
                row.problems.append(result["error"])
        elif key in cache:
            for field_name, value in cache[key].items():
                setattr(row, field_name, value)
        work_per_iteration = loop_work(launch)
        if work_per_iteration:
            row.loop_scores_per_thread = work_per_iteration / (launch.num_warps * 32)
        rows.append(_judge(row, launch.num_warps * 32))
    return rows, missing, broken, len(work)


# ---------------------------------------------------------------------------------------------
# CUDA


_DTYPES = {"c10::BFloat16": "bf16", "c10::Half": "fp16", "float": "fp32", "double": "fp64"}


def _split_cuda_name(demangled: str) -> tuple[str, str]:
    """``void ns::(anonymous namespace)::k<float, 4>(args)`` → (``k``, ``float, 4``)."""
    name = demangled.removeprefix("void ")
    depth, cut = 0, len(name)
    for i, char in enumerate(name):  # drop the argument list: the first "(" at template depth 0
        if char == "<":
            depth += 1
        elif char == ">":
            depth -= 1
        elif char == "(" and depth == 0 and not name.startswith("(anonymous", i):
            cut = i
            break
    name = name[:cut]
    args = ""
    if name.endswith(">") and "<" in name:
        start = name.index("<")
        name, args = name[:start], name[start + 1 : -1]
    return name.rsplit("::", 1)[-1], args


def extension_path() -> Path | None:
    import fastvision

    package = Path(fastvision.__file__).resolve().parent
    found = sorted(package.glob("_C*.so"))
    return found[0] if found else None


def check_cuda(files: list[Path] | None = None) -> tuple[list[Row], str]:
    """(rows, a sentence on what was checked) for the CUDA kernels in ``files`` (default: the built
    ``fastvision/_C*.so``; anything cuobjdump reads: shared libraries, object files, cubins)."""
    if not files:
        so = extension_path()
        if so is None:
            return [], "fastvision._C is not built: no CUDA kernels to check"
        files = [so]
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        return [], "cuobjdump not found: CUDA kernels not checked"
    usage_text, sass_text = "", ""
    for path in files:
        for option in ("--dump-resource-usage", "--dump-sass"):
            out = subprocess.run([cuobjdump, option, str(path)], capture_output=True, text=True, timeout=300)
            if option == "--dump-sass":
                sass_text += out.stdout
            else:
                usage_text += out.stdout
    resources = parse_resource_usage(usage_text)
    files_named = ", ".join(path.name for path in files)
    if not resources:
        return [], f"{files_named} holds no CUDA code (built without CUDA kernels)"
    sass = parse_sass(sass_text)
    arches = sorted(set(re.findall(r"arch = (sm_\d+\w*)", usage_text))) or [f"sm_{ARCH}"]
    names = _demangle(list(resources))
    rows = []
    for mangled, fields in resources.items():
        kernel, args = _split_cuda_name(names[mangled])
        dtypes = [d for token, d in _DTYPES.items() if token in args.split(",")[0]]
        allowance = CUDA_SPILL_ALLOWANCE.get(f"{kernel}<{args}>") or _allowance(CUDA_SPILL_ALLOWANCE, kernel)
        n_instructions, n_local = sass.get(mangled, (None, None))
        row = Row(
            backend="cuda",
            module=_module_of(mangled),
            kernel=kernel,
            config=args,
            dtype=dtypes[0] if dtypes else "-",
            registers=fields.get("REG"),
            spill_bytes=max(fields.get("STACK", 0), fields.get("LOCAL", 0)),
            shared_bytes=fields.get("SHARED", 0),
            sass_instructions=n_instructions,
            local_memory_instructions=n_local,
            allowance_bytes=allowance.bytes,
            allowance_reason=allowance.reason,
        )
        rows.append(_judge(row, None))
    rows.sort(key=lambda r: (r.module, r.kernel, r.config))
    spilling = [r for r in rows if r.spill_bytes]
    instances = {f"{r.kernel}<{r.config}>" for r in spilling} | {r.kernel for r in spilling}
    for key in sorted(set(CUDA_SPILL_ALLOWANCE) - instances):
        print(f"note: CUDA_SPILL_ALLOWANCE[{key!r}] matches no spilling kernel; remove it")
    return rows, f"{files_named}: {len(rows)} kernels for {', '.join(arches)}"


def build_cuda_cubins(out_dir: Path, jobs: int) -> tuple[list[Path], list[str]]:
    """Compile every ``csrc/cuda/*.cu`` to an sm_90 cubin with setup.py's nvcc flags, for a table of
    the CUDA kernels when the installed extension was built without them. (cubins, errors)."""
    import sysconfig

    import torch
    import torch.utils.cpp_extension as cpp_extension

    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    nvcc = str(Path(cuda_home) / "bin" / "nvcc")
    includes = [*cpp_extension.include_paths(), str(Path(cuda_home) / "include"), str(ROOT / "csrc")]
    includes.append(sysconfig.get_paths()["include"])
    flags = ["-cubin", f"-arch=sm_{ARCH}", "-O3", "-lineinfo", "-std=c++20", *cpp_extension.COMMON_NVCC_FLAGS]
    flags += ["-DFASTVISION_WITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
    flags += [f"-I{path}" for path in includes]
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))

    def compile_one(source: Path) -> tuple[Path, str | None]:
        cubin = out_dir / f"{source.stem}.sm_{ARCH}.cubin"
        done = subprocess.run([nvcc, *flags, "-o", str(cubin), str(source)], capture_output=True, text=True)
        return cubin, None if done.returncode == 0 else f"{source.name}: {done.stderr.strip()[-800:]}"

    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        results = list(pool.map(compile_one, sources))
    return [c for c, error in results if error is None], [error for _, error in results if error]


def _module_of(mangled: str) -> str:
    # nvcc names anonymous namespaces after the source file: ..._GLOBAL__N__<hash>_<len>_<file>_cu_...
    match = re.search(r"_\d+_(\w+?)_cu_", mangled)
    return match.group(1) if match else "-"


# ---------------------------------------------------------------------------------------------
# Report


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _verdict(row: Row) -> str:
    if row.problems:
        return "FAIL: " + "; ".join(row.problems)
    return "ok" if not row.deficits else "recorded deficit: " + "; ".join(row.deficits)


def format_markdown(report: dict[str, Any]) -> str:
    tools = report["tools"]
    triton_rows = [Row(**r) for r in report["triton"]]
    cuda_rows = [Row(**r) for r in report["cuda"]]
    out = [
        "# Kernel budgets on sm_90",
        "",
        "Generated by `python bench/kernel_budget.py` (no GPU needed); do not edit. "
        f"triton {tools['triton']}, ptxas: {tools['ptxas']}, cuobjdump: {tools['cuobjdump']}.",
        "",
        f"Limits: {MAX_SHARED_BYTES:,} B shared memory per block, {MAX_REGISTERS_PER_THREAD} registers "
        f"per thread, {MAX_REGISTERS_PER_BLOCK:,} registers per block. Spill: local-memory (stack) bytes "
        "per thread, against the kernel's allowance (`SPILL_ALLOWANCE` in its Triton module, "
        "`CUDA_SPILL_ALLOWANCE` in the script; none means 0). SASS: static instruction count of the "
        "compiled kernel, a prediction of cost, not a measurement; LDL/STL: local-memory loads and stores "
        "in it. Variant: the configuration's constexprs and its pointer types other than the data type.",
        "",
        f"**Summary**: {report['summary']}",
        *(
            ["", "Scope: the representative subset (`--representative`: per kernel and dtype the largest "
             "tiles), not every configuration."]
            if report.get("scope") == "representative" else []
        ),
        "",
        f"## Triton ({len(triton_rows)} configurations)",
        "",
    ]
    header = "| module | kernel | config | dtype | variant | warps | stages | regs | spill B | shared B "
    header += "| SASS | LDL/STL | allowance B | verdict |"
    out += [header, "|" + "---|" * 14]
    for r in triton_rows:
        cells = [r.module, f"`{r.kernel}`", r.config, r.dtype, r.variant, r.num_warps, r.num_stages]
        cells += [r.registers]
        cells += [r.spill_bytes, r.shared_bytes, r.sass_instructions, r.local_memory_instructions]
        cells += [r.allowance_bytes, _verdict(r)]
        out.append("| " + " | ".join(_cell(c).replace("|", "\\|") for c in cells) + " |")
    if report["missing"]:
        out += ["", "Modules without `launch_configs()` (not checked): " + ", ".join(report["missing"])]
    if report["broken"]:
        out += ["", "Modules that fail to enumerate their configurations:"]
        out += [f"- {b}" for b in report["broken"]]
    hot = [r for r in triton_rows if r.hot_loop]
    if hot:
        classes = list(HOT_LOOP_CLASSES)
        out += [
            "",
            "## What each hot loop runs on (static SASS counts)",
            "",
            "Per configuration, instruction classes in its hot loop: the outermost loop of the SASS "
            "(scope `loop`), the smallest loop holding async copies where the kernel's `HOT_LOOP` entry "
            "says `loop=async_copy` (`async-copy loop`: a pipelined key loop inside an outer loop), or the "
            "whole kernel when it has no loop (`kernel`). "
            + "; ".join(f"{name}: {what}" for name, what in HOT_LOOP_CLASSES.items())
            + ". *Declared*: the kernel's `HOT_LOOP` entry in this script (tensor_cores is checked for "
            "fp16/bf16 rows); a miss is a failure unless `KNOWN_DEFICITS` names the open issue that fixes "
            "it, then the row reads *recorded deficit*, never ok.",
            "",
            "| module | kernel | config | dtype | scope | " + " | ".join(classes) + " | declared | verdict |",
            "|" + "---|" * (len(classes) + 7),
        ]
        for r in hot:
            cells = [r.module, f"`{r.kernel}`", r.config, r.dtype, r.hot_scope]
            cells += [r.hot_loop.get(c, "-") for c in classes] + [r.expects or "-", _verdict(r)]
            out.append("| " + " | ".join(_cell(c).replace("|", "\\|") for c in cells) + " |")
    looped = [r for r in triton_rows if r.loop_scores_per_thread and r.loop_fast_path]
    if looped:
        out += [
            "",
            "## Main loop: SASS instructions per score (a prediction, not a measurement)",
            "",
            "For kernels whose module declares `SASS_LOOP_WORK` (scores per program per iteration of "
            "its main loop). From the SASS control flow of the hot loop above: *fast path*, the fewest "
            "instructions from the loop head to its back edge (every conditional branch may go either "
            "way; for the top-k selection: a key block with no candidate); *inner step*, the largest "
            "loop nested in it; *slowest pass*, the most instructions of one pass through the loop, "
            "nested loops entered once (the selection: a key block that appends candidates; for the "
            "attention forward kernels, one key tile of the flash loop: "
            "gather or load, dot, online softmax, accumulate). Per score: "
            "instructions x threads / scores of one iteration, i.e. instructions each thread issues "
            "per score it owns. Static counts: latency, tensor-core time and memory are not in them.",
            "",
            "| module | kernel | config | warps | scores/thread | loop static | fast path | per score "
            "| inner step | per score | slowest pass | per score |",
            "|" + "---|" * 12,
        ]
        for r in looped:
            per = r.loop_scores_per_thread
            cells = [r.module, f"`{r.kernel}`", r.config, r.num_warps, f"{per:g}", r.loop_static]
            cells += [r.loop_fast_path, f"{r.loop_fast_path / per:.1f}", r.loop_inner_step]
            cells += [f"{r.loop_inner_step / per:.1f}" if r.loop_inner_step else "-"]
            cells += [r.loop_slow_path, f"{r.loop_slow_path / per:.1f}" if r.loop_slow_path else "-"]
            out.append("| " + " | ".join(_cell(c).replace("|", "\\|") for c in cells) + " |")
    specialized_kernels = sorted(
        {(r.module, r.kernel, r.specialization) for r in triton_rows if r.specialization}
    )
    if specialized_kernels:
        out += [
            "",
            "## Launch specialization assumed",
            "",
            "A real launch specializes on its arguments: an integer equal to 1 becomes the constant 1, an "
            "integer that is a multiple of 16 and a pointer aligned to 16 bytes are marked divisible by 16 "
            "(vectorized loads follow). These kernels compile with the argument values their module "
            "declares in `LAUNCH_SPECIALIZATION` (contiguous tensors from torch's allocator); a launch "
            "that differs (e.g. a non-contiguous input) compiles another variant. Kernels not listed "
            "compile with no specialization (general code: scalar loads).",
            "",
            "| module | kernel | =1: constant; %16: divisible by 16 |",
            "|---|---|---|",
        ]
        out += [f"| {module} | `{kernel}` | {spec} |" for module, kernel, spec in specialized_kernels]
    if report.get("predictions"):
        out += format_predictions(report["predictions"], report.get("predictions_skipped", []))
    out += ["", f"## CUDA ({report['cuda_note']})", ""]
    if cuda_rows:
        out += ["Shared memory is the static amount; dynamic shared memory is set at launch.", ""]
        out += ["| file | kernel | template arguments | dtype | regs | spill B | static shared B | SASS "
                "| LDL/STL | allowance B | verdict |", "|" + "---|" * 11]  # fmt: skip
        for r in cuda_rows:
            cells = [r.module, f"`{r.kernel}`", r.config, r.dtype, r.registers, r.spill_bytes]
            cells += [r.shared_bytes, r.sass_instructions, r.local_memory_instructions, r.allowance_bytes]
            cells += [_verdict(r)]
            out.append("| " + " | ".join(_cell(c).replace("|", "\\|") for c in cells) + " |")
    allowances = sorted(
        {(r.backend, r.kernel, r.allowance_bytes, r.allowance_reason) for r in triton_rows + cuda_rows}
    )
    allowances = [a for a in allowances if a[2] or a[3]]
    if allowances:
        out += ["", "## Spill allowances", ""]
        out += [f"- {backend} `{kernel}`: {n} B: {reason}" for backend, kernel, n, reason in allowances]
    return "\n".join(out) + "\n"


def _us(ms: float | None) -> str:
    return "-" if ms is None else f"{ms * 1e3:.3g}"


def format_predictions(rows: list[dict[str, Any]], skipped: list[str]) -> list[str]:
    """The cost model's table (fastvision/benchmark/cost_model.py) for the GPU benchmark cases."""
    from fastvision.benchmark.cost_model import H100

    out = [
        "",
        "## Predicted lower bounds of the GPU benchmark cases (a prediction, not a measurement)",
        "",
        f"Cost model (`fastvision/benchmark/cost_model.py`), {H100.name}: the largest of *memory* (the "
        f"case's minimal DRAM bytes over {H100.bandwidth_gbps / 1e3:.1f} TB/s, the copy bandwidth assumed "
        f"until the GPU pass measures it), *compute* (its useful FLOPs over {H100.wgmma_tflops:.0f} TFLOP/s "
        f"on wgmma, {H100.mma_tflops:.0f} on mma.sync, {H100.cuda_core_tflops:.0f} on CUDA cores; the class "
        "is the one the op's Triton hot loops compile to in the table above, HGMMA > HMMA > none) and "
        f"*issue* (hot-loop warp instructions, the fast path per score above x the case's scores / 32, over "
        f"{H100.sms} SMs x {H100.schedulers_per_sm} schedulers x {H100.clock_ghz} GHz; only for kernels "
        "declaring SASS_LOOP_WORK). *binds*: the largest term. Measured: none yet (no GPU has run the "
        "pass); `fastvision bench` on a GPU prints measured beside predicted (meas/pred).",
        "",
        "| op | case | bytes | FLOPs | class | memory us | compute us | issue us | bound us | binds "
        "| measured |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        cells = [r["op"], r["case"], f"{r['bytes']:,}", f"{r['flops']:,}", r["flop_class"] or "-"]
        cells += [_us(r["memory_ms"]), _us(r["compute_ms"]), _us(r["issue_ms"]), _us(r["bound_ms"])]
        cells += [r["binds"], "not measured"]
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    if skipped:
        out += ["", "Ops whose GPU cases cannot be built on fake tensors (set-up reads data), not predicted:"]
        out += [f"- {line}" for line in skipped]
    return out


def summarize(triton_rows: list[Row], cuda_rows: list[Row], missing: list[str], broken: list[str]) -> str:
    failed = [r for r in triton_rows + cuda_rows if r.problems]
    deficits = [r for r in triton_rows if r.deficits and not r.problems]
    parts = [
        f"{len(triton_rows)} Triton configurations and {len(cuda_rows)} CUDA kernels checked",
        f"{len(failed)} failing (over budget or an undeclared hot-loop miss)" if failed else "none failing",
        f"{len(deficits)} with recorded hot-loop deficits (open issues)",
    ]
    if missing:
        parts.append(f"{len(missing)} Triton modules without launch_configs()")
    if broken:
        parts.append(f"{len(broken)} Triton modules that fail to enumerate")
    return ", ".join(parts) + "."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", help="check only this Triton module (repeatable)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile workers")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels of fastvision._C")
    parser.add_argument(
        "--extension",
        type=Path,
        action="append",
        help="read the CUDA kernels from this file (repeatable; default: fastvision/_C*.so)",
    )
    parser.add_argument(
        "--build-cuda",
        action="store_true",
        help="compile csrc/cuda/*.cu to sm_90 cubins with nvcc (setup.py's flags) and check those instead "
        "of the installed extension (about a minute per file on two cores)",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where kernel_budget.md/.json go")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--allow-missing", action="store_true", help="a module without launch_configs() is not a failure"
    )
    parser.add_argument("--quiet", action="store_true", help="print the summary and failures only")
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="compile every configuration (by default one whose key is in the committed or the previous "
        "kernel_budget.json is read from there)",
    )
    parser.add_argument(
        "--representative",
        action="store_true",
        help="compile only the largest configuration of each kernel and dtype (what the tests check on a "
        "cold cache; the committed table is the full run)",
    )
    parser.add_argument(
        "--no-predict",
        action="store_true",
        help="leave out the cost model's predicted bounds of the GPU benchmark cases (a full run adds them; "
        "building the cases on fake tensors takes about a minute)",
    )
    parser.add_argument(
        "--plan",
        type=Path,
        metavar="PATH",
        help="compile nothing: write the configurations and their keys as JSON to PATH and exit",
    )
    args = parser.parse_args(argv)

    modules = args.module or triton_modules()
    cache_files = (
        [] if args.no_cache else [RESULTS / "kernel_budget.json", args.out_dir / "kernel_budget.json"]
    )
    if args.plan:
        rows, missing, broken, _ = check_triton(modules, 1, subset=args.representative, compile_nothing=True)
        fields = ("module", "kernel", "config", "dtype", "variant", "key")
        plan = [{k: getattr(r, k) for k in fields} for r in rows]
        text = json.dumps({"triton": plan, "missing": missing, "broken": broken}, indent=1)
        args.plan.write_text(text + "\n")
        print(f"{len(plan)} Triton configurations planned; wrote {args.plan}")
        return 1 if broken else 0
    triton_rows, missing, broken, n_compiled = check_triton(
        modules, args.jobs, load_cache(cache_files), subset=args.representative
    )
    deficit_keys = {(r.kernel, e) for r in triton_rows for e, _ in expectation_misses(r)}
    for kernel, expectation in sorted(set(KNOWN_DEFICITS) - deficit_keys):
        if not args.module and not args.representative:
            print(f"note: KNOWN_DEFICITS[{(kernel, expectation)!r}] matches no row today; remove it")
    cuda_files = args.extension
    if args.build_cuda and not args.no_cuda:
        cuda_files, cuda_errors = build_cuda_cubins(
            Path(tempfile.mkdtemp(prefix="kernel_budget_cuda_")), args.jobs
        )
        broken += [f"CUDA build: {error}" for error in cuda_errors]
    cuda_rows, cuda_note = ([], "not checked (--no-cuda)") if args.no_cuda else check_cuda(cuda_files)
    if args.build_cuda and cuda_rows:
        cuda_note += ", compiled from csrc/cuda with setup.py's nvcc flags"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {
        "tools": {
            "triton": triton_version,
            "ptxas": _tool_version(_tool("ptxas")),
            "cuobjdump": _tool_version(_tool("cuobjdump")),
        },
        "limits": {
            "shared_bytes_per_block": MAX_SHARED_BYTES,
            "registers_per_thread": MAX_REGISTERS_PER_THREAD,
            "registers_per_block": MAX_REGISTERS_PER_BLOCK,
        },
        "summary": summarize(triton_rows, cuda_rows, missing, broken),
        "scope": "representative" if args.representative else "full",
        "missing": missing,
        "broken": broken,
        "cuda_note": cuda_note,
        "triton": [asdict(r) for r in triton_rows],
        "cuda": [asdict(r) for r in cuda_rows],
    }
    if not (args.no_predict or args.module or args.representative):
        from fastvision.benchmark import runner

        runner.use_budget_rows(report["triton"])
        report["predictions"], report["predictions_skipped"] = runner.predicted_gpu_cases()
    markdown = format_markdown(report)
    if not args.quiet:
        print(markdown)
    else:
        print(report["summary"])
    print(
        f"{n_compiled} Triton configurations compiled, "
        f"{len(triton_rows) - n_compiled} read from earlier results with the same key"
    )
    failed = [r for r in triton_rows + cuda_rows if r.problems]
    for r in failed:
        print(f"FAIL {r.backend} {r.module} {r.kernel} [{r.config}] {r.dtype}: {'; '.join(r.problems)}")
    for name in missing:
        print(f"{'MISSING' if not args.allow_missing else 'missing'} {name}: no launch_configs()")
    for line in broken:
        print(f"BROKEN {line}")
    if not args.no_write:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "kernel_budget.md").write_text(markdown)
        (args.out_dir / "kernel_budget.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out_dir / 'kernel_budget.md'} and kernel_budget.json")
    return 1 if failed or broken or (missing and not args.allow_missing) else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # The interpreter accepts code that real compilation rejects: compile in a clean environment.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    sys.exit(main())

"""The forced backend is thread- and task-local: interleaved ``with use_backend(...)`` blocks in two
threads, or in two asyncio tasks, each keep their own choice, and the process default is unchanged
after them; torch.compile(fullgraph=True) and torch.export read the calling thread's choice."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import fastvision
from fastvision._backend import _DEFAULT, forced_backend, use_backend
from fastvision.ops import OPS


def _interleave(first: str, second: str) -> dict:
    """Two threads enter their blocks in turn, read their choice while the other's block is open,
    and leave in the order opposite to entry (the pattern that left a process-global forced)."""
    seen: dict = {}
    barrier = threading.Barrier(2, timeout=30)

    def worker(label: str, name: str, leave_first: bool) -> None:
        seen[f"{label}-start"] = forced_backend()
        with use_backend(name):
            barrier.wait()  # both blocks are open
            seen[f"{label}-inside"] = forced_backend()
            barrier.wait()
            if not leave_first:
                barrier.wait()  # the other thread leaves its block first
        if leave_first:
            barrier.wait()
        seen[f"{label}-after"] = forced_backend()
        barrier.wait()
        seen[f"{label}-after-both"] = forced_backend()

    threads = [
        threading.Thread(target=worker, args=("a", first, False)),
        threading.Thread(target=worker, args=("b", second, True)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return seen


def test_interleaved_threads_keep_their_own_choice():
    before = forced_backend()
    seen = _interleave("reference", "cpu")
    assert seen["a-start"] == seen["b-start"] == _DEFAULT  # a new thread starts from the default
    assert seen["a-inside"] == "reference" and seen["b-inside"] == "cpu"
    assert seen["a-after"] == seen["b-after"] == _DEFAULT
    assert seen["a-after-both"] == seen["b-after-both"] == _DEFAULT
    assert forced_backend() == before  # the calling thread is untouched


def test_a_thread_does_not_see_the_main_threads_block():
    seen = {}
    with use_backend("reference"):
        t = threading.Thread(target=lambda: seen.setdefault("thread", forced_backend()))
        t.start()
        t.join(30)
        assert forced_backend() == "reference"
    assert seen["thread"] == _DEFAULT
    assert forced_backend() == _DEFAULT


def test_a_plain_call_stays_in_its_thread():
    seen = {}

    def worker():
        use_backend("triton")  # not a block: this thread's choice until changed
        seen["set"] = forced_backend()

    t = threading.Thread(target=worker)
    t.start()
    t.join(30)
    assert seen["set"] == "triton"
    assert forced_backend() == _DEFAULT


def test_interleaved_asyncio_tasks_keep_their_own_choice():
    async def task(name: str, gate_in: asyncio.Event, gate_out: asyncio.Event, seen: dict) -> None:
        with use_backend(name):
            gate_in.set()
            await gate_out.wait()  # the other task runs (and enters its block) meanwhile
            seen[name] = forced_backend()
        seen[f"{name}-after"] = forced_backend()

    async def main() -> dict:
        seen: dict = {}
        a_in, b_in = asyncio.Event(), asyncio.Event()
        a = asyncio.create_task(task("reference", a_in, b_in, seen))
        await a_in.wait()
        b = asyncio.create_task(task("cpu", b_in, asyncio.Event(), seen))
        await asyncio.sleep(0)
        # b's gate_out is never set: let a finish first while b's block is still open.
        await a
        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b
        seen["main"] = forced_backend()
        return seen

    seen = asyncio.run(main())
    assert seen["reference"] == "reference"
    assert seen["reference-after"] == _DEFAULT
    assert seen["main"] == _DEFAULT
    assert forced_backend() == _DEFAULT


def test_exit_restores_the_previous_choice_when_nested():
    with use_backend("reference"):
        with use_backend("cpu"):
            assert forced_backend() == "cpu"
        assert forced_backend() == "reference"
    assert forced_backend() == _DEFAULT


def test_bad_name_changes_nothing():
    with use_backend("reference"):
        with pytest.raises(ValueError, match="backend must be one of"):
            use_backend("tpu")
        assert forced_backend() == "reference"


def _choice_dependent(x: torch.Tensor) -> torch.Tensor:
    return x * 2 if fastvision.forced_backend() == "reference" else x + 1


def test_compiled_code_reads_the_calling_threads_choice():
    torch._dynamo.reset()
    compiled = torch.compile(_choice_dependent, fullgraph=True, backend="eager")
    x = torch.full((3,), 3.0)
    seen = {}

    def worker():
        with use_backend("reference"):
            seen["thread"] = compiled(x)[0].item()

    assert compiled(x)[0].item() == 4.0
    t = threading.Thread(target=worker)
    t.start()
    t.join(120)
    assert seen["thread"] == 6.0  # recompiled for the thread's choice (a guard on it)
    assert compiled(x)[0].item() == 4.0


def _geglu_targets(exported) -> set[str]:
    return {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}


def test_export_in_a_thread_follows_that_threads_choice():
    spec = OPS["geglu"]
    if "cpu" not in spec.runnable(torch.device("cpu")):
        pytest.skip(f"cpu: {spec.built('cpu') or 'the C++ extension is not built'}")

    class Module(torch.nn.Module):
        def forward(self, x):
            return fastvision.ops.geglu(x)

    x = torch.randn(3, 8)
    seen = {}

    def worker():
        with use_backend("reference"):
            seen["thread"] = _geglu_targets(torch.export.export(Module(), (x,)))

    with use_backend("cpu"):
        t = threading.Thread(target=worker)
        t.start()
        t.join(120)
        main = _geglu_targets(torch.export.export(Module(), (x,)))
    assert any("geglu_forward" in target for target in main), main
    assert not any("fastvision" in target for target in seen["thread"]), seen["thread"]

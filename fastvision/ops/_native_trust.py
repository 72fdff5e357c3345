"""The C++ backward ops check index ranges on direct ``torch.ops.fastvision`` calls. On the CPU that
check is a loop, cheap next to the kernel, and always runs; on CUDA it reads values back (one host
sync), so calls that the op contract makes itself, on tensors the op's own forward produced
(autograd's backward), skip it through a per-thread flag of the extension (``csrc/raw_op_trust.h``).
The Python-launched ops get the same from ``fastvision.ops._contract._trusting``.
"""

from __future__ import annotations

import contextlib

import torch

from fastvision._extension import extension_loaded


def _flag_op():
    if not extension_loaded():
        return None
    return getattr(torch.ops.fastvision_contract, "trust_raw_calls", None)


@contextlib.contextmanager
def trusted_native_calls(tensor: torch.Tensor):
    """Within: the C++ ops called on this thread skip their synchronizing range checks, when
    ``tensor`` is a plain CUDA tensor (traced and fake tensors, and CPU ones, change nothing)."""
    op = _flag_op() if tensor.is_cuda and type(tensor) is torch.Tensor else None
    if op is None or torch.compiler.is_compiling():
        yield
        return
    previous = op(True)
    try:
        yield
    finally:
        op(previous)

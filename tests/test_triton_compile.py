"""Every Triton kernel compiles to PTX for sm_90, checked without a GPU.

Triton's interpreter, which runs the numerical tests here, accepts code that real compilation
rejects; this test compiles each kernel configuration in a subprocess with the interpreter off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastvision._backend import triton_importable

SCRIPT = Path(__file__).with_name("scripts") / "compile_triton_sm90.py"


@pytest.mark.skipif(not triton_importable(), reason="triton is not installed")
def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(SCRIPT)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "kernel configurations compiled for sm_90" in result.stdout

"""Launch safety of the Triton kernels, checked without a GPU.

* The launch grids for large sizes keep axes 1 and 2 within CUDA's 65,535 programs (and axis 0
  within 2**31 - 1), computed by the launchers' own grid functions.
* Every module's ``launch_configs()`` is well formed: a Triton type for every argument, exact
  pointer dtypes, and the tiles the launchers choose.
* The top-k selection in float32 with D = 128 and topk = 256 (the largest shared-memory user)
  compiles for sm_90 within its shared memory, without spilling; the full sweep of every
  configuration is the kernel-budget script's.
"""

from __future__ import annotations

import importlib
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastvision._backend import triton_importable

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not installed")

MODULES = ("geglu", "add_layer_norm", "topk_attention", "sparse_conv2d")
AXIS0_LIMIT = 2**31 - 1
OTHER_AXES_LIMIT = 65535
SM90_SHARED = 232448


def _module(name: str):
    return importlib.import_module(f"fastvision.triton_kernels.{name}")


def _check_grid(grid: tuple[int, ...]) -> None:
    assert 1 <= len(grid) <= 3, grid
    assert 1 <= grid[0] <= AXIS0_LIMIT, grid
    assert all(1 <= g <= OTHER_AXES_LIMIT for g in grid[1:]), grid


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize(
    ("batch", "heads", "num_queries"),
    [(1, 1, 262_144), (1, 1, 4_194_304), (2, 70_000, 1024), (65_536, 2, 64), (1, 131_072, 1)],
)
def test_topk_attention_grids_fit_the_axis_limits(batch, heads, num_queries, head_dim):
    topk_attention = _module("topk_attention")
    for interpret in (False, True):
        grids = [
            topk_attention.topk_attention_forward_grid(batch, heads, num_queries, head_dim, interpret),
            topk_attention.topk_attention_backward_grid(batch, heads, num_queries, head_dim, interpret),
        ]
        for dtype in (torch.float32, torch.bfloat16):
            for topk in (1, 100, 256):
                grids.append(
                    topk_attention.select_topk_grid(
                        batch, heads, num_queries, head_dim, topk, dtype, interpret
                    )
                )
        for grid in grids:
            _check_grid(grid)
    # Every (batch, head, query block) has its program.
    tile = topk_attention.sparse_tile(head_dim)
    expected = batch * heads * -(-num_queries // tile.block_m)
    assert topk_attention.topk_attention_forward_grid(batch, heads, num_queries, head_dim) == (expected,)


def test_topk_attention_grid_past_axis0_is_a_clear_error():
    topk_attention = _module("topk_attention")
    with pytest.raises(ValueError, match="grid limit"):
        topk_attention.topk_attention_grid(1 << 16, 1 << 16, 1 << 20, 1)


@pytest.mark.parametrize(("n_rows", "hidden"), [(1, 1 << 27), (1 << 26, 8), (1 << 20, 4096), (3, 5)])
def test_geglu_grids_fit_the_axis_limits(n_rows, hidden):
    geglu = _module("geglu")
    for backward in (False, True):
        for interpret in (False, True):
            _check_grid(geglu.geglu_grid(n_rows, hidden, backward, interpret))


@pytest.mark.parametrize(("n_rows", "dim"), [(1 << 30, 16), (1 << 20, 65536), (7, 5000), (1, 1)])
def test_add_layer_norm_grids_fit_the_axis_limits(n_rows, dim):
    add_layer_norm = _module("add_layer_norm")
    for interpret in (False, True):
        _check_grid(add_layer_norm.forward_grid(n_rows, dim, interpret))
        _check_grid(add_layer_norm.backward_grid(n_rows, dim, 528, interpret))
    _check_grid(add_layer_norm.backward_row_sums_grid(n_rows))
    assert add_layer_norm.MAX_DIM == 65536


@pytest.mark.parametrize(
    ("n_sites", "c_in", "c_out", "num_offsets"),
    [(1 << 24, 8192, 8192, 49), (10, 3, 5, 9), (1 << 28, 64, 64, 9)],
)
def test_sparse_conv2d_grids_fit_the_axis_limits(n_sites, c_in, c_out, num_offsets):
    sparse_conv2d = _module("sparse_conv2d")
    for dtype in (torch.float32, torch.bfloat16):
        tile = sparse_conv2d.conv_tile(c_in, c_out, dtype)
        _check_grid(sparse_conv2d.implicit_gemm_grid(n_sites, c_out, tile))
        tile = sparse_conv2d.weight_grad_tile(c_in, c_out, dtype)
        _check_grid(sparse_conv2d.weight_grad_grid(n_sites, c_in, c_out, num_offsets, tile))


EXACT_POINTERS = {
    "idx_ptr": "*i32",
    "neighbors_ptr": "*i32",
    "lse_ptr": "*fp32",
    "mean_ptr": "*fp32",
    "rstd_ptr": "*fp32",
    "sums_ptr": "*fp32",
    "offsets_ptr": "*i32",  # topk_attention: the key -> query map of the deterministic backward
    "qlist_ptr": "*i32",
    "cand_ptr": "*i64",  # topk_attention: the selection's candidate scratch (packed int64 keys)
    "delta_ptr": "*fp32",  # topk_attention: rowsum(dO * O) per query
    "grad_weight_ptr": "*fp32",
    "scores_ptr": "*fp32",  # topk_attention: the selection's scores
    "partial_ptr": "*fp32",  # sparse_conv2d: per-chunk weight-gradient partials
    "tile_offsets_ptr": "*i32",
    "tile_counts_ptr": "*i32",
    "dweight_partial_ptr": "*fp32",
    "dbias_partial_ptr": "*fp32",
}
TYPES = {"i32", "i64", "fp32", "constexpr"}


@pytest.mark.parametrize("name", MODULES)
def test_launch_configs_are_well_formed(name):
    module = _module(name)
    launches = list(module.launch_configs())
    assert launches
    assert isinstance(module.SPILL_ALLOWANCE, dict)
    kernels = set()
    for launch in launches:
        kernels.add(launch.name)
        arg_names = launch.kernel.arg_names
        assert list(launch.signature) == list(arg_names), launch.label
        for arg, kind in launch.signature.items():
            if arg in launch.constexprs:
                assert kind == "constexpr", (launch.label, arg)
            elif arg.endswith("_ptr"):
                assert kind.startswith("*") and kind[1:] in {"fp32", "fp16", "bf16", "i32", "i64"}, (
                    launch.label,
                    arg,
                )
                assert kind == EXPECTED_DTYPE(launch, arg), (launch.label, arg, kind)
            else:
                assert kind in TYPES - {"constexpr"}, (launch.label, arg, kind)
        assert launch.num_warps in (1, 2, 4, 8, 16, 32)
        assert set(launch.constexprs) <= set(arg_names)
    assert set(module.SPILL_ALLOWANCE) <= kernels


def EXPECTED_DTYPE(launch, arg: str) -> str:  # noqa: N802
    if arg in EXACT_POINTERS:
        return EXACT_POINTERS[arg]
    if arg in ("weight_ptr", "bias_ptr") and "dim" in launch.tags:  # add_layer_norm parameters
        present = launch.constexprs.get("HAS_WEIGHT" if arg == "weight_ptr" else "HAS_BIAS")
        return f"*{launch.tags['param_dtype']}" if present else f"*{launch.tags['dtype']}"
    return f"*{launch.tags['dtype']}"


def test_launch_configs_hold_the_launchers_tiles():
    topk_attention = _module("topk_attention")
    launches = list(topk_attention.launch_configs())
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for head_dim in topk_attention.SUPPORTED_HEAD_DIMS:
            for topk in (1, 33, 100, 129, 256):
                tile = topk_attention.selection_tile(topk, head_dim, dtype)
                assert any(
                    launch.name == "_select_topk_kernel"
                    and launch.tags["dtype"] == name
                    and launch.constexprs["HEAD_DIM"] == head_dim
                    and launch.constexprs["BLOCK_N"] == tile.block_n
                    and launch.constexprs["BLOCK_K"] == tile.block_k
                    and launch.constexprs["SEGMENT"] == tile.segment
                    and launch.constexprs["MERGE_ROWS"] == tile.merge_rows
                    and launch.constexprs["BLOCK_M"] == tile.block_m
                    and launch.num_warps == tile.num_warps
                    and launch.num_stages == tile.num_stages
                    for launch in launches
                ), (name, head_dim, topk)
    sparse_conv2d = _module("sparse_conv2d")
    launches = list(sparse_conv2d.launch_configs())
    choosers = {
        "implicit_gemm_kernel": sparse_conv2d.conv_tile,
        "weight_grad_kernel": sparse_conv2d.weight_grad_tile,
    }
    for (kernel, chooser), dtype, c_in, c_out in itertools.product(
        choosers.items(), (torch.float32, torch.bfloat16), (1, 3, 32, 33, 64, 200), (1, 5, 64, 127, 512)
    ):
        tile = chooser(c_in, c_out, dtype)
        assert any(
            launch.name == kernel
            and (launch.constexprs["BLOCK_M"], launch.constexprs["BLOCK_N"], launch.constexprs["BLOCK_K"])
            == (tile.block_m, tile.block_n, tile.block_k)
            and (launch.num_warps, launch.num_stages) == (tile.num_warps, tile.num_stages)
            for launch in launches
        ), (kernel, dtype, c_in, c_out)
    add_layer_norm = _module("add_layer_norm")
    launches = list(add_layer_norm.launch_configs())
    for dim in (1, 5, 100, 4096, 4097, 65536):
        tile = add_layer_norm.forward_tile(dim)
        assert any(
            launch.name == "add_layer_norm_forward_kernel"
            and (launch.constexprs["BLOCK_M"], launch.constexprs["BLOCK_N"], launch.constexprs["CHUNKED"])
            == (tile.block_m, tile.block_n, tile.chunked)
            for launch in launches
        ), dim


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import os, re, subprocess, sys, tempfile
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastvision.triton_kernels import topk_attention

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for launch in topk_attention.launch_configs():
        wanted = {"dtype": "fp32", "head_dim": 128, "topk": 256}
        if launch.name != "_select_topk_kernel" or launch.tags != wanted:
            continue
        compiled = triton.compile(
            ASTSource(launch.kernel, launch.signature, constexprs=launch.constexprs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": launch.num_warps, "num_stages": launch.num_stages},
        )
        stack = -1
        if os.path.exists(cuobjdump):
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                       text=True, check=True).stdout
            stack = int(re.search(r"STACK:(\\d+)", usage).group(1))
        print("RESULT", launch.label, compiled.metadata.shared, stack)
    """
)


def test_topk_selection_fp32_d128_topk256_fits_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("RESULT")]
    assert len(lines) == 1, result.stdout
    shared, stack = int(lines[0][-2]), int(lines[0][-1])
    assert shared <= SM90_SHARED, shared
    allowance = _module("topk_attention").SPILL_ALLOWANCE.get("_select_topk_kernel")
    assert stack <= (allowance.bytes if allowance else 0), stack

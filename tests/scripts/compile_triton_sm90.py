"""Compiles every Triton kernel of the package to PTX for an H100 (sm_90), without a GPU.

Run with TRITON_INTERPRET unset (the interpreter accepts code that real compilation rejects, such as
non-constexpr globals). Prints one line per kernel configuration and exits 1 if any fails.
"""

from __future__ import annotations

import os
import sys
import traceback

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402, I001  (after the interpreter check)
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastvision.triton_kernels import add_layer_norm, geglu, sparse_conv2d, topk_attention  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FLOAT_ARGS = {"eps", "scale"}


def signature(kernel, constexprs: dict, dtype: str, pointer_types: dict[str, str]) -> dict[str, str]:
    result = {}
    for name in kernel.arg_names:
        if name in constexprs:
            result[name] = "constexpr"
        elif name.endswith("_ptr"):
            result[name] = pointer_types.get(name, f"*{dtype}")
        else:
            result[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return result


CONFIGS = []
for dtype in ("fp32", "bf16"):  # fp16 lowers like bf16
    for tanh in (False, True):
        tile = {"APPROX_TANH": tanh, "BLOCK_M": 2, "BLOCK_N": 1024}
        CONFIGS.append((geglu.geglu_forward_kernel, dtype, {}, tile))
        CONFIGS.append((geglu.geglu_backward_kernel, dtype, {}, tile))
    stats = {"mean_ptr": "*fp32", "rstd_ptr": "*fp32", "weight_ptr": "*fp32", "bias_ptr": "*fp32"}
    partials = {**stats, "dweight_partial_ptr": "*fp32", "dbias_partial_ptr": "*fp32"}
    for affine in (False, True):
        tile = {"HAS_WEIGHT": affine, "BLOCK_M": 4, "BLOCK_N": 1024}
        CONFIGS.append(
            (add_layer_norm.add_layer_norm_forward_kernel, dtype, stats, {**tile, "HAS_BIAS": affine})
        )
        CONFIGS.append(
            (add_layer_norm.add_layer_norm_backward_kernel, dtype, partials, {**tile, "PARAM_GRADS": True})
        )
    conv_pointers = {"neighbors_ptr": "*i32", "grad_weight_ptr": "*fp32"}
    conv_tile = {"NUM_OFFSETS": 9, "UPCAST": False, "IEEE": dtype == "fp32", "BLOCK_M": 64, "BLOCK_N": 32}
    conv_tile["BLOCK_K"] = 32
    CONFIGS.append((sparse_conv2d.gather_gemm_kernel, dtype, conv_pointers, conv_tile))
    CONFIGS.append((sparse_conv2d.weight_grad_kernel, dtype, conv_pointers, conv_tile))
    topk_pointers = {"idx_ptr": "*i32", "lse_ptr": "*fp32", "dk_ptr": "*fp32", "dv_ptr": "*fp32"}
    select_tile = {
        "HEAD_DIM": 64,
        "BLOCK_M": 64,
        "BLOCK_N": 64,
        "UPCAST": False,
        "IEEE_FP32": dtype == "fp32",
    }
    select_tile.update(NATIVE_SORT=True, LOG_N=6)
    CONFIGS.append((topk_attention._select_topk_kernel, dtype, topk_pointers, select_tile))
    for dense in (False, True):
        tile = {"DENSE": dense, "HEAD_DIM": 64, "BLOCK_M": 8, "BLOCK_K": 16}
        CONFIGS.append((topk_attention._sparse_forward_kernel, dtype, topk_pointers, tile))
        CONFIGS.append((topk_attention._sparse_backward_kernel, dtype, topk_pointers, tile))


def main() -> int:
    failures = 0
    for kernel, dtype, pointer_types, constexprs in CONFIGS:
        name = f"{kernel.fn.__module__.rsplit('.', 1)[-1]}.{kernel.fn.__name__} {dtype} {constexprs}"
        try:
            compiled = triton.compile(
                ASTSource(kernel, signature(kernel, constexprs, dtype, pointer_types), constexprs=constexprs),
                target=TARGET,
                options={"num_warps": 4},
            )
            assert ".entry" in compiled.asm["ptx"]
            print("ok  ", name)
        except Exception:  # noqa: BLE001  (report every failing configuration, then fail)
            failures += 1
            print("FAIL", name)
            traceback.print_exc(limit=3)
    print(f"{len(CONFIGS) - failures}/{len(CONFIGS)} kernel configurations compiled for sm_90")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

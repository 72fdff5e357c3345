"""Adaptive sparse-attention MoE benchmark: top-1 routing (tokens grouped per expert) against soft
routing (every expert on every token), forward and forward+backward, at the same size.

Two kinds of case per size:

* ``top1``: "reference" computes top-1 routing densely (every expert on every token, then the
  argmax expert's output is selected: the work of soft routing) and "grouped" is the module's
  grouped dispatch. Both give the same numbers, so the runner checks one against the other, and
  the "x ref" column of "grouped" is the speed-up of routing each token to one expert.
* ``soft``: the soft mixture on each topk_attention backend and ``torch.compile`` of it.

``routing_time_ratios`` times soft against grouped top-1 directly (their outputs differ, so the
runner cannot pair them in one case). FLOPs are the work grouped top-1 needs: every expert's
key/value projection over all tokens, query and output projections and attention for its own
tokens (scores against all keys, the weighted sum over its ``topk``), and the router.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fastvision.benchmark.case import BenchCase, backend_impl
from fastvision.nn.moe import AdaptiveSparseAttentionMoE
from fastvision.ops import OPS

TOLERANCE = (1e-4, 1e-4)  # float32: the same math, gathered rows vs full matmuls
EXPERT_TOPK = (32, 64, 128)
QUICK_EXPERT_TOPK = (8, 16, 32)


def _sizes(device: torch.device, quick: bool) -> list[tuple[int, int, int, int]]:
    """(batch, tokens, dim, heads)."""
    if quick or device.type != "cuda":
        return [(2, 64, 64, 4)]
    # The reference topk_attention forms [B, H, N, N] scores, hence the smaller batch at 4096 tokens.
    return [(64, 1024, 128, 4), (8, 4096, 128, 4)]


def _label(kind: str, mode: str, batch: int, tokens: int, dim: int, heads: int, topk) -> str:
    return f"{kind} {mode} float32 B{batch} N{tokens} d{dim} h{heads} k{'/'.join(map(str, topk))}"


def _flops(moe: AdaptiveSparseAttentionMoE, batch: int, tokens: int, routed: list[int]) -> int:
    dim = moe.dim
    hidden = moe.router.fc1.out_features
    total = 2 * batch * tokens * (dim * hidden + hidden * moe.num_experts)
    for expert, queries in zip(moe.experts, routed, strict=True):
        if queries == 0:
            continue
        total += 2 * batch * tokens * dim * 2 * dim  # key/value projection over all tokens
        total += 2 * queries * dim * dim * 2  # query and output projections
        total += 2 * queries * tokens * dim + 2 * queries * min(expert.topk, tokens) * dim
    return total


def _runner(
    forward: Callable[[torch.Tensor], torch.Tensor],
    moe: AdaptiveSparseAttentionMoE,
    x: torch.Tensor,
    grad_out: torch.Tensor,
    backward: bool,
) -> Callable[[], Any]:
    """Forward (returns the output) or forward+backward (returns the output and dL/dx; every
    parameter gradient is computed too, none accumulates between calls)."""
    if not backward:

        def fwd():
            with torch.no_grad():
                return forward(x)

        return fwd
    leaf = x.detach().requires_grad_(True)
    params = [p for p in moe.parameters() if p.requires_grad]

    def fwd_bwd():
        out = forward(leaf)
        grads = torch.autograd.grad(out, [leaf, *params], grad_out, allow_unused=True)
        return out.detach(), grads[0]

    return fwd_bwd


def _gpu_backends(device: torch.device) -> list[str]:
    return list(OPS["topk_attention"].runnable(device)[1:])


def build_module(dim: int, heads: int, expert_topk, routing: str, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    return AdaptiveSparseAttentionMoE(dim, heads, expert_topk, routing).to(device)


def cases(device: torch.device, quick: bool) -> list[BenchCase]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    expert_topk = QUICK_EXPERT_TOPK if quick or device.type != "cuda" else EXPERT_TOPK
    result = []
    for batch, tokens, dim, heads in _sizes(device, quick):
        x = torch.randn(batch, tokens, dim, generator=generator).to(device)
        grad_out = torch.randn(batch, tokens, dim, generator=generator).to(device)
        top1 = build_module(dim, heads, expert_topk, "top1", device)
        soft = build_module(dim, heads, expert_topk, "soft", device)
        with torch.no_grad():
            top1(x)
        fractions = top1.expert_utilization.tolist()
        routed = [round(f * batch * tokens) for f in fractions]
        share = ", ".join(f"{f:.2f}" for f in fractions)
        for mode in ("fwd", "fwd+bwd"):
            backward = mode == "fwd+bwd"
            factor = 3 if backward else 1  # backward ~ twice the forward's matmul work

            def run(forward, module, backend, x=x, grad_out=grad_out, backward=backward):
                return backend_impl(backend, _runner(forward, module, x, grad_out, backward))

            impls = {
                "reference": run(top1.forward_dense_top1, top1, "reference"),
                "grouped": run(top1, top1, "reference"),
            }
            for backend in _gpu_backends(device):
                impls[f"{backend} dense"] = run(top1.forward_dense_top1, top1, backend)
                impls[backend] = run(top1, top1, backend)
            result.append(
                BenchCase(
                    op="moe",
                    label=_label("top1", mode, batch, tokens, dim, heads, expert_topk),
                    impls=impls,
                    flops=factor * _flops(top1, batch, tokens, routed),
                    tolerance=TOLERANCE,
                    notes={
                        "reference": "top-1 computed densely (every expert on every token, then select) "
                        "on the reference topk_attention",
                        "grouped": f"grouped top-1 dispatch, reference topk_attention; token share per "
                        f"expert {share}",
                        **{
                            f"{b} dense": f"dense top-1 on the {b} topk_attention"
                            for b in _gpu_backends(device)
                        },
                    },
                )
            )
            soft_impls = {"reference": run(soft, soft, "reference")}
            if not quick:  # compiling takes minutes on a CPU; the quick cases stay quick
                soft_impls["compile"] = run(torch.compile(soft), soft, "reference")
            for backend in _gpu_backends(device):
                soft_impls[backend] = run(soft, soft, backend)
            result.append(
                BenchCase(
                    op="moe",
                    label=_label("soft", mode, batch, tokens, dim, heads, expert_topk),
                    impls=soft_impls,
                    flops=factor * _flops(soft, batch, tokens, [batch * tokens] * soft.num_experts),
                    tolerance=TOLERANCE,
                )
            )
    return result


def routing_time_ratios(
    device: torch.device, quick: bool, backend: str | None = None, budget_s: float = 1.0
) -> list[dict[str, Any]]:
    """Median time of soft routing over grouped top-1 routing, per size and mode, on ``backend``
    (default: the automatic choice for ``device``). Same weights for both modules."""
    from fastvision.benchmark.timing import median_time_ms

    generator = torch.Generator(device="cpu").manual_seed(0)
    expert_topk = QUICK_EXPERT_TOPK if quick or device.type != "cuda" else EXPERT_TOPK
    rows = []
    for batch, tokens, dim, heads in _sizes(device, quick):
        x = torch.randn(batch, tokens, dim, generator=generator).to(device)
        grad_out = torch.randn(batch, tokens, dim, generator=generator).to(device)
        moe = {r: build_module(dim, heads, expert_topk, r, device) for r in ("soft", "top1")}
        with torch.no_grad():
            moe["top1"](x)
        for mode in ("fwd", "fwd+bwd"):
            times = {}
            for routing, module in moe.items():
                fn = _runner(module, module, x, grad_out, mode == "fwd+bwd")
                fn = backend_impl(backend, fn) if backend is not None else fn
                times[routing] = median_time_ms(fn, device, budget_s=budget_s)
            rows.append(
                {
                    "size": f"B{batch} N{tokens} d{dim} h{heads} k{'/'.join(map(str, expert_topk))}",
                    "mode": mode,
                    "backend": backend or "auto",
                    "soft_ms": times["soft"],
                    "top1_ms": times["top1"],
                    "soft_over_top1": times["soft"] / times["top1"],
                    "top1_token_share": [round(f, 3) for f in moe["top1"].expert_utilization.tolist()],
                }
            )
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Soft vs grouped top-1 MoE routing time ratio")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    for row in routing_time_ratios(device, args.quick or device.type != "cuda", args.backend):
        print(
            f"{row['size']}  {row['mode']:<8} backend {row['backend']:<9} soft {row['soft_ms']:.3f} ms  "
            f"top1 {row['top1_ms']:.3f} ms  soft/top1 {row['soft_over_top1']:.2f}  "
            f"top1 token share {row['top1_token_share']}"
        )

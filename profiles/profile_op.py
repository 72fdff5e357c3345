"""Runs one op's benchmark cases under NVTX ranges (for nsys/ncu) or torch.profiler.

python profiles/profile_op.py --op geglu [--torch-profiler] [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastvision.benchmark.runner import environment, load_cases, op_names
from fastvision.benchmark.timing import copy_bandwidth_gbps
from fastvision.profiling import nvtx_range


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--op", required=True, choices=op_names())
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--torch-profiler", action="store_true", help="write a torch.profiler table")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = load_cases(args.op, device, args.quick or device.type != "cuda")

    def run_all():
        for case in cases:
            for name, fn in case.impls.items():
                with nvtx_range(f"{case.op}:{case.label}:{name}"):
                    for _ in range(args.repeats):
                        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    run_all()  # warm-up: compilation and autotuning stay out of the profile
    if not args.torch_profiler:
        run_all()
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run_all()
    sort_key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    env = environment(device, copy_bandwidth_gbps(device))
    table = prof.key_averages().table(sort_by=sort_key, row_limit=25)
    out = Path(__file__).with_name(f"{args.op}_{device.type}_torch_profiler.txt")
    out.write_text(f"{env}\n\n{table}\n")
    print(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

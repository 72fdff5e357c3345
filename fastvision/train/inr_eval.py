"""Evaluation of implicit-representation checkpoints (seed 004): reconstruction and super-resolution.

``python -m fastvision.train.inr_eval compare --run NAME=RUN_DIR ... --data-dir DIR --out OUT`` scores
each run's ``best.pt`` (a verified checkpoint of the ``inr`` task) on the test photographs:

* reconstruction at 32x32: the test thumbnails (``photos`` test split), rendered on their own grid;
* super-resolution at 128x128 and 256x256: original crops of the test photographs (``target``),
  downsampled to 32x32 (antialiased bicubic, the input), rendered by the model at the crop's size, and
  compared with bicubic upsampling of the same input;

with PSNR and SSIM (``fastvision.train.metrics``), inference throughput, the run's parameters and
training wall time (its ``summary.json``), and a figure of sample crops (input, bicubic, each model,
original). ``python -m fastvision.train.inr_eval profile MODEL`` measures one model's training-step
throughput and the process's peak resident memory (run it in a fresh process per model).
Results go to ``OUT/results.json`` and ``OUT/RESULTS.md``; ``merge PART... --out OUT`` combines the outputs of
several ``compare`` runs (one model each, e.g. run in parallel) into one table and figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fastvision.data.photos import super_resolution_pairs
from fastvision.models import create_model
from fastvision.train.checkpoint import load_checkpoint
from fastvision.train.metrics import psnr, ssim

WEIGHTS_KEYS = ("model_name", "epoch", "model", "ema", "config")


def load_run(run_dir: Path, device: torch.device) -> tuple[str, torch.nn.Module, dict[str, Any]]:
    """(model name, model with the best checkpoint's weights in eval mode, the run's summary.json)."""
    state = load_checkpoint(run_dir / "best.pt", map_location=device, required=WEIGHTS_KEYS)
    model = create_model(state["model_name"]).to(device)
    model.load_state_dict(state["ema"]["module"] if state["ema"] is not None else state["model"])
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["checkpoint_epoch"] = state["epoch"]
    return state["model_name"], model.eval(), summary


def bicubic(low: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


@torch.no_grad()
def render(model: torch.nn.Module, low: torch.Tensor, size: int, batch: int) -> tuple[torch.Tensor, float]:
    """``model.render`` of every input at ``size``, in batches; also the seconds it took."""
    start = time.perf_counter()
    parts = [model.render(low[i : i + batch], size).float().clamp(0, 1) for i in range(0, len(low), batch)]
    return torch.cat(parts), time.perf_counter() - start


def _scores(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    return {"psnr": float(psnr(prediction, target).mean()), "ssim": float(ssim(prediction, target).mean())}


def compare(
    runs: dict[str, Path],
    data_dir: str | None,
    out: Path,
    sizes: tuple[int, ...] = (128, 256),
    crops_per_photo: dict[int, int] | None = None,
    test_samples: int = 500,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    from fastvision.data import build_dataset

    crops_per_photo = crops_per_photo or {128: 8, 256: 4}
    resolved = torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    thumbnails = build_dataset("photos", "test", data_dir, seed=seed)
    description = thumbnails.describe
    recon = torch.stack([thumbnails[i][0] for i in range(min(test_samples, len(thumbnails)))])
    pairs = {size: super_resolution_pairs(size, data_dir, crops_per_photo[size], seed) for size in sizes}
    result: dict[str, Any] = {
        "data": description,
        "reconstruction_images": len(recon),
        "super_resolution_crops": {str(size): len(pairs[size][0]) for size in sizes},
        "test_photographs": sorted(set(pairs[sizes[0]][2])),
        "bicubic": {str(size): _scores(bicubic(low, size), high) for size, (low, high, _) in pairs.items()},
        "models": {},
    }
    samples: dict[str, dict[int, torch.Tensor]] = {}
    for label, run_dir in runs.items():
        name, model, summary = load_run(Path(run_dir), resolved)
        entry: dict[str, Any] = {
            "model": name,
            "run_dir": str(run_dir),
            "parameters": sum(p.numel() for p in model.parameters()),
            "checkpoint_epoch": summary.get("checkpoint_epoch"),
            "training_wall_time_s": summary.get("wall_time_s"),
            "training_command": summary.get("command_line"),
        }
        rendered, seconds = render(model, recon.to(resolved), 32, 64)
        entry["reconstruction_32"] = {**_scores(rendered.cpu(), recon), "images_per_s": len(recon) / seconds}
        samples[label] = {}
        for size, (low, high, _) in pairs.items():
            rendered, seconds = render(model, low.to(resolved), size, 4)
            entry[f"super_resolution_{size}"] = {
                **_scores(rendered.cpu(), high),
                "images_per_s": len(low) / seconds,
            }
            samples[label][size] = rendered[:4].cpu()
        result["models"][label] = entry
        print(json.dumps({label: entry}), flush=True)
    inputs = {size: (low[:4], high[:4], names[:4]) for size, (low, high, names) in pairs.items()}
    torch.save({"samples": samples, "inputs": inputs}, out / "samples.pt")
    write(result, samples, inputs, out)
    return result


def write(result: dict[str, Any], samples, inputs, out: Path) -> None:
    """``results.json``, ``RESULTS.md`` and one figure per super-resolution size into ``out``."""
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "RESULTS.md").write_text(markdown(result))
    for size, (low, high, names) in inputs.items():
        figure(out / f"super_resolution_{size}.png", low, high, names, samples, size)


def merge(parts: list[Path], out: Path) -> dict[str, Any]:
    """Combine ``compare`` outputs of the same test data (one model each, run in parallel) into ``out``."""
    results = [json.loads((part / "results.json").read_text()) for part in parts]
    stored = [torch.load(part / "samples.pt") for part in parts]
    merged = {**results[0], "models": {}}
    samples: dict[str, dict[int, torch.Tensor]] = {}
    for result, saved in zip(results, stored, strict=True):
        if result["data"] != merged["data"] or result["bicubic"] != merged["bicubic"]:
            raise ValueError("the parts were scored on different test data")
        merged["models"].update(result["models"])
        samples.update(saved["samples"])
    out.mkdir(parents=True, exist_ok=True)
    write(merged, samples, stored[0]["inputs"], out)
    return merged


def markdown(result: dict[str, Any]) -> str:
    sizes = sorted(int(s) for s in result["super_resolution_crops"])
    head = ["model", "parameters", "train wall time", "recon 32 PSNR / SSIM"]
    head += [f"SR {s} PSNR / SSIM" for s in sizes] + ["render 32 img/s", f"render {sizes[-1]} img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    bic = result["bicubic"]
    row = ["bicubic upsampling", "-", "-", "-"] + [
        f"{bic[str(s)]['psnr']:.2f} / {bic[str(s)]['ssim']:.3f}" for s in sizes
    ]
    lines.append("| " + " | ".join(row + ["-", "-"]) + " |")
    for label, entry in result["models"].items():
        wall = entry["training_wall_time_s"]
        rec = entry["reconstruction_32"]
        row = [f"`{label}`", f"{entry['parameters']:,}", "-" if wall is None else f"{wall / 60:.1f} min"]
        row.append(f"{rec['psnr']:.2f} / {rec['ssim']:.3f}")
        row += [
            f"{entry[f'super_resolution_{s}']['psnr']:.2f} / {entry[f'super_resolution_{s}']['ssim']:.3f}"
            for s in sizes
        ]
        row += [f"{rec['images_per_s']:.1f}", f"{entry[f'super_resolution_{sizes[-1]}']['images_per_s']:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    crops = ", ".join(f"{n} crops at {s}" for s, n in result["super_resolution_crops"].items())
    return (
        f"Data: {result['data']}\n\nTest photographs: {', '.join(result['test_photographs'])}; "
        f"{result['reconstruction_images']} thumbnails for reconstruction, {crops}.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def figure(path: Path, low, high, names, samples: dict[str, dict[int, torch.Tensor]], size: int) -> None:
    from fastvision.data.extras import require

    plt = require("matplotlib.pyplot", "the super-resolution figure")
    columns = ["input 32x32", "bicubic"] + list(samples) + ["original"]
    fig, axes = plt.subplots(
        len(low), len(columns), figsize=(2.2 * len(columns), 2.3 * len(low)), squeeze=False
    )
    up = bicubic(low, size)
    for row in range(len(low)):
        images = [F.interpolate(low[row : row + 1], size=size, mode="nearest")[0], up[row]]
        images += [samples[label][size][row] for label in samples] + [high[row]]
        for col, (title, image) in enumerate(zip(columns, images, strict=True)):
            ax = axes[row][col]
            ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
        axes[row][0].set_ylabel(Path(names[row]).stem, fontsize=7)
    fig.suptitle(f"super-resolution 32 -> {size} on held-out photographs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile(name: str, batch_size: int = 32, queries: int = 256, steps: int = 3) -> dict[str, Any]:
    """Training-step throughput (images/s, after one warm-up step) and the process's peak resident memory."""
    from fastvision.nn.inr import coordinate_grid

    torch.manual_seed(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = create_model(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(batch_size, 3, 32, 32)
    order = torch.rand(batch_size, 1024).argsort(1)[:, :queries]
    coords = coordinate_grid(32, 32).expand(batch_size, -1, -1).gather(1, order[..., None].expand(-1, -1, 2))
    target = torch.rand(batch_size, queries, 3)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = F.mse_loss(model(images, coords), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "model": name,
        "batch_size": batch_size,
        "queries_per_image": queries,
        "train_images_per_s": batch_size * steps / sum(times[1:]),
        "peak_rss_mib": peak / 1024,
        "rss_before_model_mib": before / 1024,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastvision.train.inr_eval", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="score runs' best.pt on the test photographs")
    cmp.add_argument("--run", action="append", required=True, metavar="LABEL=RUN_DIR")
    cmp.add_argument("--data-dir")
    cmp.add_argument("--out", required=True)
    cmp.add_argument("--crops-128", type=int, default=8)
    cmp.add_argument("--crops-256", type=int, default=4)
    cmp.add_argument("--test-samples", type=int, default=500)
    prof = sub.add_parser("profile", help="training-step throughput and peak memory of one model")
    prof.add_argument("model")
    prof.add_argument("--batch-size", type=int, default=32)
    prof.add_argument("--queries", type=int, default=256)
    prof.add_argument("--steps", type=int, default=3)
    mrg = sub.add_parser("merge", help="combine compare outputs (one model each) into one table and figure")
    mrg.add_argument("parts", nargs="+")
    mrg.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "merge":
        merge([Path(part) for part in args.parts], Path(args.out))
        return 0
    if args.command == "profile":
        print(json.dumps(profile(args.model, args.batch_size, args.queries, args.steps)))
        return 0
    runs = dict(item.split("=", 1) for item in args.run)
    compare(
        {label: Path(path) for label, path in runs.items()},
        args.data_dir,
        Path(args.out),
        crops_per_photo={128: args.crops_128, 256: args.crops_256},
        test_samples=args.test_samples,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

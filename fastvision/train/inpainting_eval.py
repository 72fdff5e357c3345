"""Inpainting quality of an FCMAE checkpoint against two baselines, on fixed random patch masks.

``python -m fastvision.train.inpainting_eval MODEL --checkpoint RUN/best.pt --data-dir DIR
--samples 1000 --out DIR`` scores the test images' masked pixels (mean squared error, pixels in
[0, 1]) for:

* the model: its pixel prediction at the masked pixels (pixel-space targets, ``norm_pix_loss``
  off);
* mean fill: each masked pixel set to the mean of its image's visible pixels;
* biharmonic: scikit-image's ``skimage.restoration.inpaint_biharmonic`` on the same mask.

It writes ``inpainting.json`` (per-method mean and standard error over images, the mask ratio and
seed, the checkpoint) and ``inpainting.png`` (rows: masked input, model, biharmonic, mean fill,
original). The masks come from a generator seeded with ``--seed``, so every method and every
checkpoint sees the same ones.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastvision.train.tasks import masked_pixel_mse, mean_fill


def biharmonic_fill(images: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """``images [B, 1, H, W]`` with the masked pixels filled by biharmonic inpainting (scikit-image)."""
    from fastvision.data.extras import require

    restoration = require("skimage.restoration", "biharmonic inpainting (fastvision.train.inpainting_eval)")
    out = images.clone()
    for b in range(images.shape[0]):
        for c in range(images.shape[1]):
            image = images[b, c].double().numpy()
            mask = pixel_mask[b].numpy()
            out[b, c] = torch.from_numpy(restoration.inpaint_biharmonic(image, mask)).to(images.dtype)
    return out


def _stats(values: torch.Tensor) -> dict[str, float]:
    values = values.double()
    n = values.numel()
    std = float(values.std()) if n > 1 else 0.0
    return {"mean": float(values.mean()), "stderr": std / math.sqrt(n) if n else math.nan, "n": n}


@torch.no_grad()
def evaluate_inpainting(
    model: nn.Module,
    images: torch.Tensor,
    *,
    mask_ratio: float = 0.6,
    seed: int = 0,
    batch_size: int = 250,
    biharmonic: bool = True,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Per-method masked-pixel MSE over ``images [N, C, H, W]`` (model in eval mode, CPU), and the
    filled images of every method (for figures)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    filled: dict[str, list[torch.Tensor]] = {"model": [], "mean_fill": [], "biharmonic": [], "mask": []}
    errors: dict[str, list[torch.Tensor]] = {"model": [], "mean_fill": [], "biharmonic": []}
    timings = {"model": 0.0, "mean_fill": 0.0, "biharmonic": 0.0}
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        mask = model.random_mask(batch.shape[0], mask_ratio, generator=generator)
        t0 = time.perf_counter()
        out = model(batch, mask, norm_pix_loss=False)
        hidden = out.pixel_mask
        keep = (~hidden).unsqueeze(1).to(batch.dtype)
        methods = {"model": batch * keep + out.prediction.float().clamp(0, 1) * (1 - keep)}
        t1 = time.perf_counter()
        methods["mean_fill"] = mean_fill(batch, hidden)
        t2 = time.perf_counter()
        timings["model"] += t1 - t0
        timings["mean_fill"] += t2 - t1
        if biharmonic:
            methods["biharmonic"] = biharmonic_fill(batch, hidden)
            timings["biharmonic"] += time.perf_counter() - t2
        for name, result in methods.items():
            errors[name].append(masked_pixel_mse(result, batch, hidden))
            filled[name].append(result)
        filled["mask"].append(hidden)
    summary = {
        name: {**_stats(torch.cat(errs)), "seconds": round(timings[name], 3)}
        for name, errs in errors.items()
        if errs
    }
    return summary, {name: torch.cat(parts) for name, parts in filled.items() if parts}


def save_figure(
    images: torch.Tensor, filled: dict[str, torch.Tensor], path: str | Path, count: int = 8
) -> Path:
    """A grid of ``count`` examples: masked input, model, biharmonic, mean fill, original."""
    from fastvision.data.extras import require

    matplotlib = require("matplotlib", "inpainting figures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hidden = filled["mask"][:count]
    masked = images[:count].clone()
    masked[:, 0][hidden] = 0.5  # masked pixels shown mid-grey
    rows = [("masked input", masked), ("model", filled["model"][:count])]
    if "biharmonic" in filled:
        rows.append(("biharmonic", filled["biharmonic"][:count]))
    rows += [("mean fill", filled["mean_fill"][:count]), ("original", images[:count])]
    fig, axes = plt.subplots(len(rows), count, figsize=(1.3 * count, 1.4 * len(rows)), squeeze=False)
    for r, (title, tensor) in enumerate(rows):
        for c in range(count):
            ax = axes[r][c]
            ax.imshow(tensor[c, 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="registered model name (convnext_v2_fcmae, convnext_v2_fcmae_nogrn)")
    parser.add_argument("--checkpoint", required=True, help="an fcmae run's best.pt (EMA weights used)")
    parser.add_argument("--data-dir", help="Fashion-MNIST IDX folder (default: $FASTVISION_DATA)")
    parser.add_argument("--samples", type=int, default=1000, help="first N test images")
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-biharmonic", action="store_true")
    parser.add_argument("--out", required=True, help="folder for inpainting.json and inpainting.png")
    args = parser.parse_args(argv)

    from fastvision.data import build_dataset
    from fastvision.models import create_model, get_model_spec
    from fastvision.train.checkpoint import load_checkpoint
    from fastvision.train.trainer import WEIGHTS_KEYS

    state = load_checkpoint(args.checkpoint, map_location="cpu", required=WEIGHTS_KEYS)
    if state["model_name"] != args.model:
        raise SystemExit(f"{args.checkpoint} is a checkpoint of {state['model_name']!r}, not {args.model!r}")
    model = create_model(args.model)
    model.load_state_dict(state["ema"]["module"] if state["ema"] is not None else state["model"])
    dataset = build_dataset(get_model_spec(args.model).dataset, "test", args.data_dir)
    count = min(args.samples, len(dataset))
    images = torch.stack([dataset[i][0] for i in range(count)])
    summary, filled = evaluate_inpainting(
        model, images, mask_ratio=args.mask_ratio, seed=args.seed, biharmonic=not args.no_biharmonic
    )
    out = Path(args.out)
    figure = save_figure(images, filled, out / "inpainting.png")
    result = {
        "model": args.model,
        "checkpoint": str(args.checkpoint),
        "checkpoint_epoch": state["epoch"],
        "dataset": getattr(dataset, "describe", type(dataset).__name__),
        "test_images": count,
        "mask_ratio": args.mask_ratio,
        "mask_patch_pixels": model.patch_size,
        "seed": args.seed,
        "metric": "MSE over the masked pixels of each image (pixels in [0, 1]), mean over images",
        "masked_pixel_mse": summary,
        "figure": str(figure),
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
    }
    (out / "inpainting.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

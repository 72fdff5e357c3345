"""Looking at the digit readers: braille sample grids in the terminal, attention overlays, embeddings.

* :func:`braille_lines` / :func:`render_samples` draw images with Unicode braille characters
  (one character = 2x4 pixels), each digit's expected label in its cell's top-left corner and
  the prediction in the bottom-right corner, green when right and red when wrong. Colour is
  used only on a TTY with ``NO_COLOR`` unset; without it a caption line still marks mistakes.
* :class:`BrailleValidationHook` (and the ready-made :func:`show_validation_samples`) plugs into
  ``Trainer(on_validation=...)`` and prints the first validation samples after every epoch.
* :func:`save_attention_maps` writes images with their first-block attention overlaid;
  :func:`save_embedding_plot` writes a 2-D PCA (or t-SNE) projection of learned features,
  coloured by digit. Both draw on matplotlib's Agg canvas and never touch pyplot's global
  backend, so they work headless and inside notebooks alike.
* :func:`save_model_figures` writes all of these for a trained reader
  (``fastvision evaluate MODEL --checkpoint PATH --figures DIR``).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastvision.data.extras import require

BRAILLE_BASE = 0x2800
# Bit of each dot in a braille cell, indexed [row][column] (Unicode's dot numbering 1-8).
BRAILLE_DOTS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))

ANSI_RESET = "\033[0m"
ANSI_GRAY, ANSI_GREEN, ANSI_RED = "\033[90m", "\033[32m", "\033[31m"


def use_color(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default stdout) is a terminal and ``NO_COLOR`` is unset or empty."""
    stream = sys.stdout if stream is None else stream
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _to_numpy_image(image: Any) -> np.ndarray:
    array = (
        image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, float)
    )
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"image must be [H, W] or [1, H, W], got shape {array.shape}")
    return array


def braille_lines(image: Any, threshold: float | None = None) -> list[str]:
    """Braille rendering of a grayscale image: ``ceil(H/4)`` lines of ``ceil(W/2)`` characters.

    A pixel is a raised dot when above ``threshold`` (default: halfway between the image's
    minimum and maximum, which also works for mean/std-normalised images).
    """
    pixels = _to_numpy_image(image)
    if threshold is None:
        low, high = float(pixels.min()), float(pixels.max())
        threshold = (low + high) / 2 if high > low else math.inf
    height, width = pixels.shape
    rows, cols = math.ceil(height / 4), math.ceil(width / 2)
    on = np.zeros((rows * 4, cols * 2), dtype=bool)
    on[:height, :width] = pixels > threshold
    cells = on.reshape(rows, 4, cols, 2)
    codes = np.zeros((rows, cols), dtype=np.int64)
    for dy in range(4):
        for dx in range(2):
            codes |= cells[:, dy, :, dx].astype(np.int64) * BRAILLE_DOTS[dy][dx]
    return ["".join(chr(BRAILLE_BASE + int(c)) for c in row) for row in codes]


def _labels(values: Any) -> list[int]:
    if isinstance(values, torch.Tensor):
        return [int(v) for v in values.reshape(-1).tolist()]
    if isinstance(values, (int, np.integer)):
        return [int(values)]
    return [int(v) for v in values]


def render_sample(image: Any, expected: Any, predicted: Any, color: bool = False) -> list[str]:
    """One boxed sample. With ``n`` labels the image is read as a ``sqrt(n) x sqrt(n)`` grid of digits
    (1 for MNIST, 2x2 for the stacked grids, row-major like the labels); each digit's cell shows its
    expected label top-left and the prediction bottom-right."""
    expected, predicted = _labels(expected), _labels(predicted)
    if len(expected) != len(predicted):
        raise ValueError(f"expected has {len(expected)} labels but predicted has {len(predicted)}")
    side = math.isqrt(len(expected))
    if side * side != len(expected) or side == 0:
        raise ValueError(f"the number of labels must be a square (1, 4, ...), got {len(expected)}")
    chars = [list(line) for line in braille_lines(image)]
    rows, cols = len(chars), len(chars[0])
    cell_h, cell_w = rows // side, cols // side

    def paint(text: str, ansi: str) -> str:
        return f"{ansi}{text}{ANSI_RESET}" if color else text

    for index, (want, got) in enumerate(zip(expected, predicted, strict=True)):
        top, left = (index // side) * cell_h, (index % side) * cell_w
        chars[top][left] = paint(str(want), ANSI_GRAY)
        chars[top + cell_h - 1][left + cell_w - 1] = paint(str(got), ANSI_GREEN if want == got else ANSI_RED)
    box = ["┌" + "─" * cols + "┐"] + ["│" + "".join(line) + "│" for line in chars] + ["└" + "─" * cols + "┘"]
    mistakes = sum(want != got for want, got in zip(expected, predicted, strict=True))
    truth = "".join(map(str, expected))
    caption = f"{truth} ok" if mistakes == 0 else f"{truth}→{''.join(map(str, predicted))} ✗{mistakes}"
    return box + [caption[: cols + 2].ljust(cols + 2)]


def render_samples(
    images: Any,
    expected: Any,
    predicted: Any,
    per_row: int = 5,
    color: bool = False,
    title: str | None = None,
) -> str:
    """Boxed braille renderings of a batch, ``per_row`` side by side, with a legend line.

    ``images`` ``[N, 1, H, W]``; ``expected`` / ``predicted`` ``[N]`` (one digit each) or
    ``[N, k]`` (k digits per image, e.g. 4 for 2x2 grids).
    """
    if per_row < 1:
        raise ValueError(f"per_row must be >= 1, got {per_row}")
    count = len(images)
    if len(expected) != count or len(predicted) != count:
        raise ValueError(
            f"got {count} images but {len(expected)} expected and {len(predicted)} predicted labels"
        )
    blocks = [render_sample(images[i], expected[i], predicted[i], color) for i in range(count)]

    def paint(text: str, ansi: str) -> str:
        return f"{ansi}{text}{ANSI_RESET}" if color else text

    legend = (
        f"Legend: {paint('expected (top-left)', ANSI_GRAY)} | {paint('predicted right', ANSI_GREEN)} / "
        f"{paint('wrong', ANSI_RED)} (bottom-right)"
    )
    out = ([title] if title else []) + [legend]
    for start in range(0, count, per_row):
        row = blocks[start : start + per_row]
        out.extend("  ".join(block[line] for block in row) for line in range(len(row[0])))
        out.append("")
    return "\n".join(out)


def predictions_from_outputs(outputs: Any) -> torch.Tensor:
    """Predicted labels from a task's validation outputs: class scores ``[B, K]`` -> ``[B]``;
    the digit-sequence task's ``{"predicted": [B, 4], ...}`` -> ``[B, 4]``."""
    if isinstance(outputs, dict):
        if "predicted" in outputs:
            return outputs["predicted"]
        if "logits" in outputs:
            return outputs["logits"].argmax(-1)
    if isinstance(outputs, torch.Tensor):
        return outputs.argmax(-1)
    raise TypeError(f"cannot read predictions from validation outputs of type {type(outputs).__name__}")


class BrailleValidationHook:
    """``Trainer(on_validation=BrailleValidationHook())``: prints the first ``num_samples``
    validation samples with expected and predicted digits after every epoch."""

    def __init__(
        self, num_samples: int = 10, per_row: int = 5, stream: TextIO | None = None, color: bool | None = None
    ):
        self.num_samples, self.per_row = num_samples, per_row
        self.stream, self.color = stream, color

    def __call__(self, model: nn.Module, batch: Any, outputs: Any, epoch: int) -> None:
        stream = self.stream if self.stream is not None else sys.stdout
        images, targets = batch[0], batch[1]
        predicted = predictions_from_outputs(outputs)
        n = min(self.num_samples, len(images))
        color = use_color(stream) if self.color is None else self.color
        text = render_samples(
            images[:n].cpu(),
            targets[:n].cpu(),
            predicted[:n].cpu(),
            per_row=self.per_row,
            color=color,
            title=f"Epoch {epoch + 1} - first {n} validation samples",
        )
        rule = "=" * 60
        stream.write(f"\n{rule}\n{text}\n")
        stream.flush()


def show_validation_samples(model: nn.Module, batch: Any, outputs: Any, epoch: int) -> None:
    """A ready-made ``on_validation`` hook: 10 samples, 5 per row, to stdout."""
    BrailleValidationHook()(model, batch, outputs, epoch)


# ------------------------------------------------------------------------------------------ figures
def _figure(width: float, height: float):
    backend_agg = require("matplotlib.backends.backend_agg", "figures (fastvision.viz)")
    figure_module = require("matplotlib.figure", "figures (fastvision.viz)")
    figure = figure_module.Figure(figsize=(width, height), dpi=100)
    backend_agg.FigureCanvasAgg(figure)
    return figure


def attention_heatmaps(
    attention: torch.Tensor, num_prefix_tokens: int, image_size: tuple[int, int]
) -> torch.Tensor:
    """Per-image heatmaps ``[B, H, W]`` from head-averaged attention ``[B, N, N]``.

    With a CLS token (``num_prefix_tokens == 1``) the map is what CLS attends to; without one it
    is the attention each patch receives, averaged over all queries. The patch grid is square and
    is upsampled bilinearly to the image size; each map is scaled to [0, 1].
    """
    if attention.dim() != 3 or attention.shape[1] != attention.shape[2]:
        raise ValueError(f"attention must be [B, N, N], got {tuple(attention.shape)}")
    patches = attention[:, 0, num_prefix_tokens:] if num_prefix_tokens else attention.mean(dim=1)
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not form a square grid")
    grid = patches.float().reshape(-1, 1, side, side)
    maps = F.interpolate(grid, size=image_size, mode="bilinear", align_corners=False)[:, 0]
    low = maps.amin(dim=(1, 2), keepdim=True)
    high = maps.amax(dim=(1, 2), keepdim=True)
    return (maps - low) / (high - low).clamp_min(1e-12)


def save_attention_maps(
    model: nn.Module,
    images: torch.Tensor,
    path: str | os.PathLike,
    labels: Any = None,
    max_images: int = 8,
) -> Path:
    """PNG with the images (top row) and their first-block attention overlaid (bottom row).

    ``model`` needs ``attention_maps(images) -> [B, N, N]`` and ``num_prefix_tokens`` (both
    fastvision digit readers have them).
    """
    images = images[:max_images]
    was_training = model.training
    model.eval()
    try:
        attention = model.attention_maps(images)
    finally:
        model.train(was_training)
    heatmaps = attention_heatmaps(attention.cpu(), getattr(model, "num_prefix_tokens", 0), images.shape[-2:])
    count = len(images)
    figure = _figure(2.0 * count, 4.2)
    axes = figure.subplots(2, count, squeeze=False)
    for i in range(count):
        image = images[i, 0].detach().float().cpu().numpy()
        axes[0, i].imshow(image, cmap="gray")
        if labels is not None:
            axes[0, i].set_title("".join(map(str, _labels(labels[i]))), fontsize=10)
        axes[1, i].imshow(image, cmap="gray", alpha=0.7)
        axes[1, i].imshow(heatmaps[i].numpy(), cmap="hot", alpha=0.5)
        for ax in axes[:, i]:
            ax.axis("off")
    source = (
        "attention from CLS" if getattr(model, "num_prefix_tokens", 0) else "attention received per patch"
    )
    figure.suptitle(f"first-block {source}, averaged over heads", fontsize=11)
    return _save(figure, path)


def embedding_features(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """``model.embed(images)`` as ``[M, D]`` features with one digit label each.

    The ViT gives one CLS vector per image; the digit-sequence model four quadrant encodings,
    labelled with the four target digits.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = model.embed(images)
    finally:
        model.train(was_training)
    features = features.reshape(-1, features.shape[-1]).float().cpu().numpy()
    labels = labels.reshape(-1).cpu().numpy()
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature vectors but {len(labels)} labels")
    return features, labels


def project_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """``[M, D] -> [M, 2]`` with scikit-learn's PCA or t-SNE."""
    if method == "pca":
        PCA = require("sklearn.decomposition", "PCA embedding plots").PCA

        return PCA(n_components=2, random_state=seed).fit_transform(features)
    if method == "tsne":
        TSNE = require("sklearn.manifold", "t-SNE embedding plots").TSNE

        perplexity = float(min(30.0, max(2.0, (len(features) - 1) / 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            features
        )
    raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")


def save_embedding_plot(
    features: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    path: str | os.PathLike,
    method: str = "pca",
    title: str | None = None,
    seed: int = 0,
) -> Path:
    """Scatter PNG of a 2-D projection of ``features`` ``[M, D]``, coloured by digit label."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(
            f"features must be [M, D] with M = len(labels), got {features.shape} and {len(labels)}"
        )
    if len(features) < 3:
        raise ValueError(f"need at least 3 points to project, got {len(features)}")
    points = project_2d(features, method, seed)
    figure = _figure(6.5, 5.5)
    ax = figure.subplots()
    colormap = require("matplotlib", "figures (fastvision.viz)").colormaps["tab10"]
    for digit in np.unique(labels):
        chosen = labels == digit
        ax.scatter(
            points[chosen, 0],
            points[chosen, 1],
            s=8,
            alpha=0.7,
            color=colormap(int(digit) % 10),
            label=str(digit),
        )
    ax.legend(title="digit", markerscale=2, fontsize=8, loc="best")
    ax.set_title(title or f"{method.upper()} of {features.shape[1]}-d features ({len(features)} points)")
    return _save(figure, path)


def save_model_figures(
    model: nn.Module,
    dataset: Any,
    out_dir: str | os.PathLike,
    points: int = 1000,
    device: torch.device | str = "cpu",
) -> list[Path]:
    """Attention overlays and PCA / t-SNE embedding plots of ``model`` on the first samples of
    ``dataset`` (``(image, label)`` items), for whichever of ``attention_maps`` and ``embed`` the
    model has. ``points`` caps the embedded feature vectors (four per digit grid)."""
    out_dir = Path(out_dir)
    has_attention, has_embed = hasattr(model, "attention_maps"), hasattr(model, "embed")
    if not (has_attention or has_embed):
        return []
    first_label = torch.as_tensor(dataset[0][1])
    per_sample = max(1, first_label.numel())
    count = min(len(dataset), max(1, points // per_sample))
    items = [dataset[i] for i in range(count)]
    images = torch.stack([torch.as_tensor(image) for image, _ in items]).to(device)
    labels = torch.stack([torch.as_tensor(label) for _, label in items])
    written = []
    if has_attention:
        written.append(save_attention_maps(model, images, out_dir / "attention.png", labels=labels))
    if has_embed:
        features, digits = embedding_features(model, images, labels)
        for method in ("pca", "tsne"):
            title = f"{method.upper()} of {type(model).__name__} features ({len(features)} test digits)"
            path = out_dir / f"embedding_{method}.png"
            written.append(save_embedding_plot(features, digits, path, method, title))
    return written


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path

"""Datasets: ``build_dataset(name, split, data_dir=None, **kw)``.

Every dataset yields ``(image float32 [C, H, W], target)`` and has a ``describe`` attribute
naming the data actually used (real files and their folder, or which embedded stand-in).

==================  ================================  ==========================================
name                image / target                    source
==================  ================================  ==========================================
``mnist``           [1, 28, 28] / int64 class         IDX files; without a data dir, scikit-learn's
                                                      8x8 digits upscaled (never called MNIST)
``fashion_mnist``   [1, 28, 28] / int64 class         IDX files only (also found in Debian's
                                                      /usr/share/datasets/fashion-mnist)
``stacked_mnist``   [1, 56, 56] / int64 [4] (TL, TR,  2x2 grids of the ``mnist`` digits of the same
                    BL, BR)                           split
``cifar10``         [3, 32, 32] / int64 class         ``cifar-10-batches-py``; without a data dir,
                                                      crops of scikit-image's sample photographs
``photos``          [3, 32, 32] / int64 photograph    thumbnails of crops of a folder of images
                                                      (Pillow), else of scikit-image's colour
                                                      photographs; split by photograph
``detector``        counts [S] / float32 [4] (E, x,   events of the simulated six-face
                    y, z), live [S] bool              scintillation detector (``data.detector``)
==================  ================================  ==========================================

Pixel values are in [0, 1] with no mean/std standardisation by default: the sparse U-Net needs
an exactly-zero background and the denoiser needs [0, 1] targets. ``normalize=True`` applies the
usual MNIST / Fashion-MNIST mean and std for the digit datasets.

The data root is ``data_dir`` or ``$FASTVISION_DATA``; files are looked for in the root and its
usual sub-folders (``mnist/``, ``fashion-mnist/``, ``cifar-10-batches-py/``...). Nothing is downloaded.
"""

from __future__ import annotations

import os

from torch.utils.data import Dataset

from fastvision.data.base import ImageTensorDataset
from fastvision.data.cifar import load_cifar10, load_photo_crops
from fastvision.data.detector import Detector, DetectorEvents, build_detector_dataset
from fastvision.data.digits import (
    DATA_ENV_VAR,
    load_digit_dataset,
    load_embedded_digits,
    load_idx_dataset,
    resolve_data_root,
)
from fastvision.data.extras import MissingExtraError
from fastvision.data.idx import IDXFormatError, read_idx
from fastvision.data.photos import load_photo_inr, super_resolution_pairs
from fastvision.data.stacked import GRID_POSITIONS, StackedDigits

DATASETS = ("mnist", "fashion_mnist", "stacked_mnist", "cifar10", "photos", "detector")
SPLITS = ("train", "test")
DEFAULT_STACKED_SAMPLES = {"train": 60000, "test": 10000}


def build_dataset(name: str, split: str, data_dir: str | os.PathLike | None = None, **kw) -> Dataset:
    """Build dataset ``name`` ("mnist", "fashion_mnist", "stacked_mnist", "cifar10") for ``split``.

    Keyword options: ``normalize`` (mnist/fashion_mnist/stacked_mnist, default False),
    ``num_samples`` and ``seed`` (stacked_mnist grids; cifar10 photo-crop fallback).
    The returned dataset's ``describe`` says what data it holds.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    normalize = kw.pop("normalize", False)
    num_samples = kw.pop("num_samples", None)
    seed = kw.pop("seed", 0)
    if kw:
        raise TypeError(f"build_dataset({name!r}) got unexpected options: {', '.join(sorted(kw))}")

    if name in ("mnist", "fashion_mnist"):
        return load_digit_dataset(name, split, data_dir, normalize=normalize)
    if name == "stacked_mnist":
        digits = load_digit_dataset("mnist", split, data_dir, normalize=normalize)
        # A different default seed per split so train and test grids never share a layout table.
        return StackedDigits(
            digits, num_samples or DEFAULT_STACKED_SAMPLES[split], seed=seed + (split == "test")
        )
    if name == "detector":
        return build_detector_dataset(split, num_samples=num_samples, seed=seed)
    root = resolve_data_root(data_dir)
    if name == "photos":
        return load_photo_inr(split, root, num_samples=num_samples, seed=seed)
    if root is None:
        return load_photo_crops(split, num_samples=num_samples, seed=seed)
    return load_cifar10(split, root)


__all__ = [
    "DATASETS",
    "DATA_ENV_VAR",
    "Detector",
    "DetectorEvents",
    "GRID_POSITIONS",
    "IDXFormatError",
    "ImageTensorDataset",
    "MissingExtraError",
    "StackedDigits",
    "build_dataset",
    "load_cifar10",
    "load_embedded_digits",
    "load_idx_dataset",
    "load_photo_crops",
    "load_photo_inr",
    "read_idx",
    "resolve_data_root",
    "super_resolution_pairs",
]

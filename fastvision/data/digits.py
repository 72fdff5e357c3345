"""MNIST / Fashion-MNIST from local IDX files, and the embedded scikit-learn digits fallback."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastvision.data.base import ImageTensorDataset
from fastvision.data.extras import require
from fastvision.data.idx import IDXFormatError, read_idx

DATA_ENV_VAR = "FASTVISION_DATA"

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Sub-folders of a data root where each dataset's IDX files are commonly kept (torchvision,
# Debian's dataset-fashion-mnist, plain downloads). The root itself is searched last.
_SUBDIRS = {
    "mnist": ("mnist", "MNIST/raw", "MNIST"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw", "FashionMNIST"),
}
# Where `apt-get install dataset-fashion-mnist` puts the files; searched when no root is given.
_SYSTEM_DIRS = {"fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),)}

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DIGIT_CLASSES = [str(d) for d in range(10)]

EMBEDDED_DIGITS_NAME = "sklearn 8x8 digits upscaled"
EMBEDDED_SPLIT_SEED = 0
EMBEDDED_TEST_FRACTION = 0.2


def resolve_data_root(data_dir: str | os.PathLike | None) -> Path | None:
    """The explicit ``data_dir``, else ``$FASTVISION_DATA``, else None (use embedded data)."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV_VAR)
    return Path(env).expanduser() if env else None


def _find_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def find_idx_pair(name: str, split: str, root: Path | None) -> tuple[Path, Path]:
    """Locate the (images, labels) IDX files; the FileNotFoundError lists every folder searched."""
    stems = IDX_FILES[split]
    directories = []
    if root is not None:
        directories += [root / sub for sub in _SUBDIRS[name]] + [root]
    else:
        directories += list(_SYSTEM_DIRS.get(name, ()))
    for directory in directories:
        found = [_find_file(directory, stem) for stem in stems]
        if all(found):
            return found[0], found[1]
    expected = ", ".join(f"{s}[.gz]" for s in stems)
    searched = ", ".join(str(d) for d in directories) or "(none)"
    raise FileNotFoundError(
        f"{name} {split} split not found: expected {expected} in one of: {searched}. "
        f"Pass data_dir=... or set ${DATA_ENV_VAR}; nothing is ever downloaded."
    )


def load_idx_dataset(name: str, split: str, root: Path | None, normalize: bool = False) -> ImageTensorDataset:
    images_path, labels_path = find_idx_pair(name, split, root)
    image_array, label_array = read_idx(images_path), read_idx(labels_path)
    if image_array.ndim != 3 or image_array.dtype != np.uint8:
        raise IDXFormatError(
            images_path,
            f"expected uint8 images [N, H, W], found {image_array.dtype} with shape {image_array.shape}",
        )
    if label_array.ndim != 1 or label_array.dtype.kind not in "iu":
        raise IDXFormatError(
            labels_path,
            f"expected integer labels [N], found {label_array.dtype} with shape {label_array.shape}",
        )
    if len(image_array) != len(label_array):
        raise IDXFormatError(
            labels_path,
            f"holds {len(label_array)} labels but {images_path.name} holds {len(image_array)} images",
        )
    if len(image_array) == 0:
        raise IDXFormatError(images_path, "holds no images")
    classes = DIGIT_CLASSES if name == "mnist" else FASHION_CLASSES
    out_of_range = (label_array < 0) | (label_array >= len(classes))
    if out_of_range.any():
        first = int(np.flatnonzero(out_of_range)[0])
        raise IDXFormatError(
            labels_path,
            f"{int(out_of_range.sum())} labels outside 0-{len(classes) - 1} "
            f"(the first is {int(label_array[first])} at index {first})",
        )
    images = torch.from_numpy(image_array)
    labels = torch.from_numpy(label_array.astype(np.int64))
    title = "MNIST" if name == "mnist" else "Fashion-MNIST"
    mean, std = (0.1307, 0.3081) if name == "mnist" else (0.2860, 0.3530)
    return ImageTensorDataset(
        images.unsqueeze(1).contiguous(),
        labels,
        describe=f"{title} {split} ({len(labels)} images, IDX files from {images_path.parent})",
        classes=classes,
        mean=mean if normalize else None,
        std=std if normalize else None,
    )


def load_embedded_digits(split: str, size: int = 28, normalize: bool = False) -> ImageTensorDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, offline), bilinearly upscaled to ``size``².

    A stand-in for MNIST when no data is available: same shape and value range, far fewer and
    much blurrier digits. Train/test are a fixed-seed 80/20 split, identical on every machine.
    """
    datasets = require(
        "sklearn.datasets", "the embedded stand-in digits (used when no MNIST data_dir is given)"
    )
    digits = datasets.load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    labels = torch.from_numpy(digits.target.astype(np.int64))

    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(EMBEDDED_SPLIT_SEED))
    n_test = int(round(len(labels) * EMBEDDED_TEST_FRACTION))
    indices = order[n_test:] if split == "train" else order[:n_test]
    indices = indices.sort().values
    return ImageTensorDataset(
        images[indices].contiguous(),
        labels[indices],
        describe=(
            f"{EMBEDDED_DIGITS_NAME} to {size}x{size} (embedded fallback, not MNIST): {split} split, "
            f"{len(indices)} of 1797 images, split seed {EMBEDDED_SPLIT_SEED}"
        ),
        classes=DIGIT_CLASSES,
        mean=0.1307 if normalize else None,
        std=0.3081 if normalize else None,
    )


def load_digit_dataset(
    name: str, split: str, data_dir: str | os.PathLike | None = None, normalize: bool = False
) -> ImageTensorDataset:
    """MNIST or Fashion-MNIST from local IDX files; MNIST falls back to the embedded digits.

    Fashion-MNIST has no embedded stand-in (clothing is not digits), so it needs real files.
    """
    root = resolve_data_root(data_dir)
    if name == "mnist" and root is None:
        return load_embedded_digits(split, normalize=normalize)
    return load_idx_dataset(name, split, root, normalize=normalize)

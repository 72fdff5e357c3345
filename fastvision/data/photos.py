"""Colour photographs for implicit-representation training and super-resolution tests (seed 004).

Sources: any folder of images (``data_dir``, read with Pillow, sub-folders included), else the colour
photographs embedded in scikit-image (the ``train`` extra). Every photograph is scaled so that its
shorter side is at most ``PHOTO_SHORT_SIDE`` pixels, and the photographs are split into train and test
*by photograph*: no test crop shares a pixel, or a scene, with a training crop.

* ``load_photo_inr(split, data_dir, num_samples, seed)``: 32x32 images, each a random square crop of
  side ``s`` (log-uniform in ``[32, 256]``) of a photograph of the split, downsampled to 32x32 with
  antialiased bicubic interpolation (``downsample``): what a CIFAR-style thumbnail of a scene part looks
  like. Label: the photograph's index.
* ``super_resolution_pairs(size, ...)``: test pairs ``(low [N, 3, 32, 32], high [N, 3, size, size])``:
  ``high`` an original ``size x size`` crop of a test photograph, ``low`` the same crop downsampled.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastvision.data.base import ImageTensorDataset
from fastvision.data.cifar import SKIMAGE_PHOTOS
from fastvision.data.extras import require

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PHOTO_SHORT_SIDE = 384  # a 256-pixel crop then holds a good part of the scene
EMBEDDED_TEST_PHOTOS = ("chelsea", "rocket")  # the embedded photographs held out for testing
FOLDER_TEST_EVERY = 4  # in a folder, every 4th photograph by sorted path (the 4th, 8th, ...) is a test photo
CROP_RANGE = (32, 256)
DEFAULT_INR_SAMPLES = {"train": 5000, "test": 500}


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, C, H, W]`` float images -> ``[N, C, size, size]``: antialiased bicubic, clamped to [0, 1]."""
    return F.interpolate(
        images, size=(size, size), mode="bicubic", antialias=True, align_corners=False
    ).clamp(0, 1)


def _fit_short_side(photo: torch.Tensor, short_side: int) -> torch.Tensor:
    """uint8 ``[3, H, W]`` scaled down (antialiased) so that ``min(H, W) <= short_side``."""
    scale = short_side / min(photo.shape[1:])
    if scale >= 1:
        return photo
    size = (round(photo.shape[1] * scale), round(photo.shape[2] * scale))
    resized = F.interpolate(
        photo[None].float(), size=size, mode="bicubic", antialias=True, align_corners=False
    )
    return resized[0].clamp(0, 255).round().to(torch.uint8)


def _folder_photos(root: Path) -> list[tuple[str, torch.Tensor]]:
    pil = require("PIL.Image", "reading a folder of photographs")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_EXTENSIONS)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(PHOTO_EXTENSIONS)}) found under {root}")
    photos = []
    for path in paths:
        with pil.open(path) as image:
            image.draft(
                "RGB", (PHOTO_SHORT_SIDE * 2, PHOTO_SHORT_SIDE * 2)
            )  # JPEG: decode at a reduced scale
            array = np.asarray(image.convert("RGB"))
        photos.append((str(path.relative_to(root)), torch.from_numpy(array.copy()).permute(2, 0, 1)))
    return photos


def _embedded_photos() -> list[tuple[str, torch.Tensor]]:
    skimage_data = require("skimage.data", "the embedded photographs (used when no data_dir is given)")
    photos = []
    for name in sorted(SKIMAGE_PHOTOS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = getattr(skimage_data, name)()
        except Exception:  # a data file missing from this install: skip it, never download
            continue
        image = np.asarray(image[0] if isinstance(image, tuple) else image)
        if image.ndim == 3 and image.shape[2] >= 3:
            photos.append((name, torch.from_numpy(np.ascontiguousarray(image[:, :, :3])).permute(2, 0, 1)))
    if not photos:
        raise RuntimeError("no scikit-image sample photographs could be loaded offline")
    return photos


def load_photographs(split: str, data_dir: str | Path | None = None) -> tuple[list[str], list[torch.Tensor]]:
    """The names and uint8 ``[3, H, W]`` photographs of ``split`` ("train" or "test"), split by photograph."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if data_dir is None:
        photos = _embedded_photos()
        is_test = [name in EMBEDDED_TEST_PHOTOS for name, _ in photos]
    else:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"photograph folder {root} does not exist")
        photos = _folder_photos(root)
        if len(photos) < 2:
            raise ValueError(
                f"{root} holds {len(photos)} image(s); a train/test split by photograph needs >= 2"
            )
        is_test = [(i + 1) % FOLDER_TEST_EVERY == 0 for i in range(len(photos))]
        if not any(is_test):
            is_test[-1] = True
    chosen = [(name, _fit_short_side(photo, PHOTO_SHORT_SIDE)) for (name, photo), test in zip(photos, is_test,
              strict=True) if test == (split == "test")]  # fmt: skip
    return [name for name, _ in chosen], [photo for _, photo in chosen]


def _source(data_dir) -> str:
    return (
        f"photographs in {data_dir}"
        if data_dir is not None
        else "scikit-image's colour photographs (embedded)"
    )


def load_photo_inr(
    split: str,
    data_dir: str | Path | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    size: int = 32,
) -> ImageTensorDataset:
    """``num_samples`` deterministic ``size``² thumbnails of random crops of the split's photographs."""
    names, photos = load_photographs(split, data_dir)
    num_samples = num_samples or DEFAULT_INR_SAMPLES[split]
    generator = torch.Generator().manual_seed(seed * 2 + (split == "test"))
    photo_ids = torch.randint(len(photos), (num_samples,), generator=generator)
    images = torch.empty(num_samples, 3, size, size, dtype=torch.uint8)
    lo, hi = math.log(CROP_RANGE[0]), math.log(CROP_RANGE[1])
    for i, photo_id in enumerate(photo_ids.tolist()):
        photo = photos[photo_id]
        height, width = photo.shape[1:]
        side = min(
            round(math.exp(lo + (hi - lo) * float(torch.rand((), generator=generator)))), height, width
        )
        y = int(torch.randint(0, height - side + 1, (1,), generator=generator))
        x = int(torch.randint(0, width - side + 1, (1,), generator=generator))
        crop = photo[None, :, y : y + side, x : x + side].float() / 255
        images[i] = (downsample(crop, size)[0] * 255).round().to(torch.uint8)
    return ImageTensorDataset(
        images,
        photo_ids,
        describe=(
            f"{_source(data_dir)}: {num_samples} {split} {size}x{size} thumbnails of crops of "
            f"{CROP_RANGE[0]}-"
            f"{CROP_RANGE[1]} px, seed {seed}, from {len(names)} {split} photographs ({', '.join(names)})"
        ),
        classes=names,
    )


def super_resolution_pairs(
    size: int,
    data_dir: str | Path | None = None,
    crops_per_photo: int = 8,
    seed: int = 0,
    low: int = 32,
    split: str = "test",
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(low_res [N, 3, low, low], high_res [N, 3, size, size], names)`` float in ``[0, 1]``: random
    ``size x size`` crops of the split's photographs (``crops_per_photo`` each) and their
    downsampled copies."""
    names, photos = load_photographs(split, data_dir)
    generator = torch.Generator().manual_seed(10_007 * seed + size)
    highs, labels = [], []
    for name, photo in zip(names, photos, strict=True):
        height, width = photo.shape[1:]
        if min(height, width) < size:
            continue
        for _ in range(crops_per_photo):
            y = int(torch.randint(0, height - size + 1, (1,), generator=generator))
            x = int(torch.randint(0, width - size + 1, (1,), generator=generator))
            highs.append(photo[:, y : y + size, x : x + size].float() / 255)
            labels.append(name)
    if not highs:
        raise ValueError(f"no {split} photograph is at least {size} pixels on its shorter side")
    high = torch.stack(highs)
    return downsample(high, low), high, labels

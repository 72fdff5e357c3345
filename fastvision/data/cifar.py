"""CIFAR-10 from a local ``cifar-10-batches-py`` folder, or crops of scikit-image's sample photographs.

The batch files of the Python distribution of CIFAR-10 are pickles. They are read with a restricted
unpickler (:class:`_CifarUnpickler`) that admits only what the format holds (dicts, lists, bytes,
strings, numbers and numpy uint8 arrays), so a crafted file under the data folder cannot run code:
any other global it names is refused before it is looked up.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastvision.data.base import ImageTensorDataset
from fastvision.data.extras import require

CIFAR_DIRNAME = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCHES = ("test_batch",)
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Colour photographs shipped inside the scikit-image wheel (no network). "cat" is the same photo
# as "chelsea", so it is left out; any that fail to load on a given install are skipped.
SKIMAGE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "colorwheel",
    "stereo_motorcycle",
)
PHOTO_SHORT_SIDE = 160  # photos are downscaled first so a 32x32 crop holds an object part, not flat texture
PHOTO_TEST_FRACTION = 0.25  # rightmost strip of every photo is reserved for test crops (no pixel overlap)
DEFAULT_PHOTO_CROPS = {"train": 5000, "test": 1000}


def find_cifar_dir(root: Path) -> Path:
    """``root`` itself or ``root/cifar-10-batches-py``, whichever holds the pickled batches."""
    candidates = [root / CIFAR_DIRNAME, root]
    for candidate in candidates:
        if all((candidate / name).is_file() for name in CIFAR_TRAIN_BATCHES + CIFAR_TEST_BATCHES):
            return candidate
    expected = ", ".join(CIFAR_TRAIN_BATCHES + CIFAR_TEST_BATCHES)
    raise FileNotFoundError(
        f"CIFAR-10 batches not found: expected {expected} in one of: {', '.join(map(str, candidates))}. "
        "Nothing is ever downloaded."
    )


# The only globals a CIFAR-10 batch pickle names: numpy's array and dtype reconstructors (under
# numpy 1's ``numpy.core`` and numpy 2's ``numpy._core``; ``_frombuffer`` for protocol-5 pickles) and
# ``_codecs.encode``, with which Python 3 writes bytes at protocol 2. None of them runs code.
_CIFAR_GLOBALS = frozenset(
    {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
    | {(f"{core}.multiarray", "_reconstruct") for core in ("numpy.core", "numpy._core")}
    | {(f"{core}.numeric", "_frombuffer") for core in ("numpy.core", "numpy._core")}
)


class CifarFormatError(ValueError):
    """A CIFAR-10 batch file that is not one; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"CIFAR-10 batch {self.path}: {problem}")


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only the globals in ``_CIFAR_GLOBALS``; anything else is refused unresolved."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: a CIFAR-10 batch holds only dicts, lists, bytes, "
                "numbers and numpy arrays"
            )
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, list[int]]:
    """The images (uint8 ``[N, 3, 32, 32]``) and labels of one CIFAR-10 batch file, read without
    executing anything from it; a foreign or malformed file raises :class:`CifarFormatError`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as error:
        raise CifarFormatError(path, f"not a CIFAR-10 batch pickle ({error})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as error:
        raise CifarFormatError(path, f"damaged pickle ({type(error).__name__}: {error})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise CifarFormatError(path, "expected a dict with b'data' and b'labels'")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shown = type(data).__name__
        if isinstance(data, np.ndarray):
            shown = f"{data.dtype} array of shape {data.shape}"
        raise CifarFormatError(path, f"b'data' must be a uint8 array of shape (N, 3072), got {shown}")
    if not isinstance(labels, list) or len(labels) != len(data):
        raise CifarFormatError(path, f"b'labels' must be a list of {len(data)} class indices")
    if not all(type(label) is int and 0 <= label < len(CIFAR_CLASSES) for label in labels):
        raise CifarFormatError(path, f"b'labels' must hold integers in [0, {len(CIFAR_CLASSES)})")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(split: str, root: Path) -> ImageTensorDataset:
    directory = find_cifar_dir(root)
    images, labels = [], []
    for name in CIFAR_TRAIN_BATCHES if split == "train" else CIFAR_TEST_BATCHES:
        batch_images, batch_labels = read_cifar_batch(directory / name)
        images.append(batch_images)
        labels.extend(batch_labels)
    return ImageTensorDataset(
        torch.from_numpy(np.concatenate(images)),
        torch.tensor(labels),
        describe=f"CIFAR-10 {split} ({len(labels)} images from {directory})",
        classes=CIFAR_CLASSES,
    )


def _load_photos() -> tuple[list[str], list[torch.Tensor]]:
    """The available sample photos as uint8 ``[3, H, W]``, shorter side resized to ``PHOTO_SHORT_SIDE``."""
    skimage_data = require(
        "skimage.data", "the embedded stand-in photographs (used when no CIFAR-10 data_dir is given)"
    )
    names, photos = [], []
    for name in SKIMAGE_PHOTOS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = getattr(skimage_data, name)()
        except Exception:  # missing optional data file on this install: skip it, never download
            continue
        if isinstance(image, tuple):  # stereo pairs: keep the left view
            image = image[0]
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] < 3:
            continue
        tensor = torch.from_numpy(np.ascontiguousarray(image[:, :, :3])).permute(2, 0, 1).float()
        scale = PHOTO_SHORT_SIDE / min(tensor.shape[1:])
        size = (round(tensor.shape[1] * scale), round(tensor.shape[2] * scale))
        tensor = F.interpolate(tensor[None], size=size, mode="bilinear", antialias=True, align_corners=False)[
            0
        ]
        photos.append(tensor.clamp(0, 255).round().to(torch.uint8))
        names.append(name)
    if not photos:
        raise RuntimeError("no scikit-image sample photographs could be loaded offline")
    return names, photos


def load_photo_crops(
    split: str, num_samples: int | None = None, seed: int = 0, size: int = 32
) -> ImageTensorDataset:
    """Deterministic ``size``² crops of scikit-image's sample photographs; label = which photo.

    A stand-in for CIFAR-10 when no local copy exists: real natural colour images at the same
    resolution, but only a handful of source photos, so the labels are not CIFAR classes.
    Train crops come from the left 75% of each photo and test crops from the right 25%.
    """
    names, photos = _load_photos()
    num_samples = num_samples or DEFAULT_PHOTO_CROPS[split]
    generator = torch.Generator().manual_seed(seed * 2 + (split == "test"))
    photo_ids = torch.randint(len(photos), (num_samples,), generator=generator)
    crops = torch.empty(num_samples, 3, size, size, dtype=torch.uint8)
    for i, photo_id in enumerate(photo_ids.tolist()):
        photo = photos[photo_id]
        height, width = photo.shape[1:]
        split_col = int(width * (1 - PHOTO_TEST_FRACTION))
        x_lo, x_hi = (0, split_col - size) if split == "train" else (split_col, width - size)
        x = int(torch.randint(x_lo, x_hi + 1, (1,), generator=generator))
        y = int(torch.randint(0, height - size + 1, (1,), generator=generator))
        crops[i] = photo[:, y : y + size, x : x + size]
    return ImageTensorDataset(
        crops,
        photo_ids,
        describe=(
            f"scikit-image sample photographs (embedded fallback, not CIFAR-10): {num_samples} {split} crops "
            f"{size}x{size}, seed {seed}, from {', '.join(names)}"
        ),
        classes=names,
    )

"""Tests for fastvision.data: IDX reading, dataset discovery, embedded stand-ins, stacked digits."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from fastvision.data import (
    DATA_ENV_VAR,
    GRID_POSITIONS,
    ImageTensorDataset,
    StackedDigits,
    build_dataset,
    load_embedded_digits,
    load_photo_crops,
    read_idx,
)


def write_idx(path, array: np.ndarray, type_code: int) -> None:
    """Write ``array`` in IDX format by hand (independent of the reader under test)."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    payload = header + big_endian.tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist_files(directory, n_train=12, n_test=6, gz=True, train_value=None):
    """Tiny MNIST-format files: image i of a split is filled with a split-specific constant."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    rng = np.random.default_rng(0)
    for prefix, n, offset in (("train", n_train, 0), ("t10k", n_test, 100)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:] = (np.arange(n, dtype=np.uint8) + offset)[:, None, None]
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, 0x08)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 0x08)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    images = np.random.default_rng(1).integers(0, 256, (3, 4, 5)).astype(np.uint8)
    floats = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"images{suffix}", images, 0x08)
    write_idx(tmp_path / f"floats{suffix}", floats, 0x0D)
    assert np.array_equal(read_idx(tmp_path / f"images{suffix}"), images)
    loaded = read_idx(tmp_path / f"floats{suffix}")
    assert loaded.dtype == np.float32 and np.array_equal(loaded, floats)


def test_idx_rejects_truncated_file(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="header says"):
        read_idx(path)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_idx_files(tmp_path, gz):
    write_mnist_files(tmp_path / "mnist", gz=gz)
    train = build_dataset("mnist", "train", data_dir=tmp_path)
    test = build_dataset("mnist", "test", data_dir=tmp_path)
    assert (len(train), len(test)) == (12, 6)
    image, label = train[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert torch.allclose(image, torch.full_like(image, 3 / 255))
    assert label.dtype == torch.int64
    assert train.describe.startswith("MNIST train") and str(tmp_path / "mnist") in train.describe


def test_data_root_from_environment(tmp_path, monkeypatch):
    write_mnist_files(tmp_path / "fashion-mnist")
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    dataset = build_dataset("fashion_mnist", "test")
    assert len(dataset) == 6 and dataset.describe.startswith("Fashion-MNIST test")
    assert dataset.classes[0] == "T-shirt/top"


def test_missing_files_error_names_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        build_dataset("mnist", "test", data_dir=tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "t10k-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message


def test_embedded_digits_are_deterministic_and_labelled_honestly():
    train, test = load_embedded_digits("train"), load_embedded_digits("test")
    assert len(train) + len(test) == 1797
    assert train.describe.startswith("sklearn 8x8 digits upscaled")
    assert "not MNIST" in train.describe
    image, _ = train[0]
    assert image.shape == (1, 28, 28) and image.min() >= 0.0 and image.max() <= 1.0
    again = load_embedded_digits("train")
    assert torch.equal(train.images, again.images) and torch.equal(train.targets, again.targets)
    # Train and test are disjoint: no test image appears among the train images.
    train_rows = {bytes(row) for row in train.images.flatten(1).numpy()}
    assert sum(bytes(row) in train_rows for row in test.images.flatten(1).numpy()) < 5  # sklearn has dupes


def test_build_dataset_uses_embedded_digits_without_data_dir(monkeypatch):
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    dataset = build_dataset("mnist", "test")
    assert dataset.describe.startswith("sklearn 8x8 digits upscaled")


def constant_digits(values: list[int]) -> ImageTensorDataset:
    """Digits whose 28x28 image is filled with 10 * label, so each grid quadrant is identifiable."""
    labels = torch.tensor(values)
    images = (labels * 10).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 28, 28).contiguous()
    return ImageTensorDataset(images, labels, describe="constant digits")


def test_stacked_digits_layout():
    stacked = StackedDigits(constant_digits(list(range(10))), num_samples=20, seed=3)
    assert GRID_POSITIONS == ("top_left", "top_right", "bottom_left", "bottom_right")
    for i in range(len(stacked)):
        image, labels = stacked[i]
        assert image.shape == (1, 56, 56) and labels.shape == (4,)
        quadrants = [image[0, :28, :28], image[0, :28, 28:], image[0, 28:, :28], image[0, 28:, 28:]]
        for quadrant, label in zip(quadrants, labels, strict=True):
            assert torch.allclose(quadrant, torch.full_like(quadrant, float(label) * 10 / 255))


def test_stacked_digits_determinism():
    digits = constant_digits(list(range(10)) * 3)
    a, b = StackedDigits(digits, 50, seed=7), StackedDigits(digits, 50, seed=7)
    c = StackedDigits(digits, 50, seed=8)
    assert torch.equal(a.indices, b.indices)
    assert all(torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1]) for i in range(50))
    assert not torch.equal(a.indices, c.indices)


def test_stacked_digits_holdout_uses_disjoint_digits():
    digits = constant_digits(list(range(10)) * 20)  # 200 digits
    grids = StackedDigits(digits, 400, seed=5)
    train, val = grids.split_holdout(0.1, seed=2)
    assert (len(train), len(val)) == (360, 40)
    train_digits, val_digits = set(train.indices.flatten().tolist()), set(val.indices.flatten().tolist())
    assert not train_digits & val_digits
    assert len(train_digits) <= 180 and len(val_digits) <= 20 and len(val_digits) > 10
    again_train, again_val = grids.split_holdout(0.1, seed=2)
    assert torch.equal(train.indices, again_train.indices) and torch.equal(val.indices, again_val.indices)
    assert "held-out digits" in val.describe and "180 digits" in train.describe
    image, labels = val[3]  # items are composed from the chosen digits
    assert torch.equal(labels, digits.targets[val.indices[3]])
    for fraction in (0.0, 1.0):
        with pytest.raises(ValueError, match="fraction"):
            grids.split_holdout(fraction)
    with pytest.raises(ValueError, match="pool"):
        StackedDigits(digits, 4, pool=torch.tensor([], dtype=torch.long))


def test_stacked_digits_redraw_per_epoch():
    digits = constant_digits(list(range(10)) * 20)
    grids = StackedDigits(digits, 100, seed=4)
    first = grids.indices.clone()
    grids.set_epoch(3)
    third = grids.indices.clone()
    assert third.shape == first.shape and not torch.equal(third, first)
    grids.set_epoch(0)  # epoch 0 is the constructor's draw; every epoch's table is reproducible
    assert torch.equal(grids.indices, first)
    grids.set_epoch(3)
    assert torch.equal(grids.indices, third)
    image, labels = grids[5]  # items follow the redrawn table
    assert torch.equal(labels, digits.targets[third[5]])
    train, _ = grids.split_holdout(0.2, seed=1)  # a holdout split keeps drawing from its own pool
    pool = set(train.pool.tolist())
    for epoch in range(1, 4):
        train.set_epoch(epoch)
        assert set(train.indices.flatten().tolist()) <= pool
    with pytest.raises(ValueError, match="epoch"):
        grids.set_epoch(-1)


def test_split_train_val_holds_out_digits_for_grids():
    from fastvision.train import TrainConfig
    from fastvision.train.trainer import split_train_val

    digits = constant_digits(list(range(10)) * 20)
    grids, test = StackedDigits(digits, 300, seed=1), StackedDigits(digits, 30, seed=2)
    train, val, _ = split_train_val(grids, test, TrainConfig(val_fraction=0.2, train_samples=100))
    assert (len(train), len(val)) == (100, 60)
    index_of = lambda subset: set(subset.dataset.indices[list(subset.indices)].flatten().tolist())  # noqa: E731
    assert not index_of(train) & index_of(val)


def test_stacked_mnist_grids_use_digits_of_their_split(tmp_path):
    write_mnist_files(tmp_path, n_train=12, n_test=6)
    train = build_dataset("stacked_mnist", "train", data_dir=tmp_path, num_samples=30)
    test = build_dataset("stacked_mnist", "test", data_dir=tmp_path, num_samples=10)
    assert len(train) == 30 and len(test) == 10
    # Train digit images hold values 0..11, test digit images 100..105 (see write_mnist_files).
    assert all(train[i][0].max() * 255 < 50 for i in range(len(train)))
    assert all(test[i][0].min() * 255 > 99 for i in range(len(test)))
    assert "2x2 grids" in train.describe and "MNIST train" in train.describe


def write_cifar_batches(directory, per_batch=4):
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
        }
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_from_local_batches(tmp_path):
    write_cifar_batches(tmp_path / "cifar-10-batches-py")
    train = build_dataset("cifar10", "train", data_dir=tmp_path)
    test = build_dataset("cifar10", "test", data_dir=tmp_path)
    assert (len(train), len(test)) == (20, 4)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0 and 0 <= int(label) < 10
    assert train.describe.startswith("CIFAR-10 train")


def test_cifar10_missing_batches(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        build_dataset("cifar10", "train", data_dir=tmp_path)


def test_photo_crops_fallback():
    a = load_photo_crops("train", num_samples=16, seed=0)
    b = load_photo_crops("train", num_samples=16, seed=0)
    test = load_photo_crops("test", num_samples=8, seed=0)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    image, label = a[0]
    assert image.shape == (3, 32, 32) and image.min() >= 0.0 and image.max() <= 1.0
    assert 0 <= int(label) < a.num_classes
    assert a.describe.startswith("scikit-image sample photographs") and "not CIFAR-10" in a.describe
    assert len(test) == 8


def test_build_dataset_argument_errors():
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="split"):
        build_dataset("mnist", "validation")
    with pytest.raises(TypeError, match="unexpected options"):
        build_dataset("mnist", "train", colour=True)


# ------------------------------------------------------------------------------- augmentation
def translate_reference(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Per-image zero-filled shift by (dy, dx), written as slicing (independent of the gather)."""
    out = torch.zeros_like(images)
    height, width = images.shape[-2:]
    for b in range(images.shape[0]):
        y, x = int(dy[b]), int(dx[b])
        out[b, :, max(y, 0) : height + min(y, 0), max(x, 0) : width + min(x, 0)] = images[
            b, :, max(-y, 0) : height + min(-y, 0), max(-x, 0) : width + min(-x, 0)
        ]
    return out


@pytest.mark.parametrize("shape", [(5, 1, 28, 28), (3, 3, 7, 11), (1, 2, 4, 4)])
@pytest.mark.parametrize("max_shift", [1, 3])
def test_random_translate_matches_slicing_reference(shape, max_shift):
    from fastvision.data.augment import random_translate

    images = torch.rand(shape)
    seed = torch.randint(0, 2**31, ()).item()
    shifted = random_translate(images, max_shift, torch.Generator().manual_seed(seed))
    # The same generator draws the offsets into the padded image; shift = max_shift - offset.
    offsets = torch.randint(
        0, 2 * max_shift + 1, (2, shape[0]), generator=torch.Generator().manual_seed(seed)
    )
    expected = translate_reference(images, max_shift - offsets[0], max_shift - offsets[1])
    assert torch.equal(shifted, expected)


def test_random_translate_edge_cases():
    from fastvision.data.augment import random_translate

    images = torch.rand(4, 1, 6, 6)
    assert random_translate(images, 0) is images
    assert random_translate(images[:0], 2).shape == (0, 1, 6, 6)
    strided = torch.rand(4, 1, 6, 12)[..., ::2]  # non-contiguous input
    assert random_translate(strided, 2).shape == (4, 1, 6, 6)
    shifts = {
        tuple(random_translate(torch.ones(1, 1, 5, 5), 2).sum((0, 1)).nonzero().min(0).values.tolist())
        for _ in range(60)
    }
    assert len(shifts) > 1  # offsets vary between calls
    with pytest.raises(ValueError, match="max_shift"):
        random_translate(images, -1)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        random_translate(images[0], 1)


@pytest.mark.parametrize("tiles,shape", [(2, (3, 1, 12, 16)), (3, (2, 2, 9, 9)), (1, (2, 1, 6, 6))])
def test_random_translate_tiles_shift_each_cell_on_its_own(tiles, shape):
    from fastvision.data.augment import random_translate

    images = torch.rand(shape)
    max_shift, seed = 2, torch.randint(0, 2**31, ()).item()
    shifted = random_translate(images, max_shift, torch.Generator().manual_seed(seed), tiles=tiles)
    batch, channels, height, width = shape
    h, w = height // tiles, width // tiles
    # Cells in (image, tile row, tile column) order, each with its own offsets from the same stream.
    cells = torch.stack(
        [
            images[b, :, i * h : (i + 1) * h, j * w : (j + 1) * w]
            for b in range(batch)
            for i in range(tiles)
            for j in range(tiles)
        ]
    )
    offsets = torch.randint(
        0, 2 * max_shift + 1, (2, len(cells)), generator=torch.Generator().manual_seed(seed)
    )
    expected_cells = translate_reference(cells, max_shift - offsets[0], max_shift - offsets[1])
    k = 0
    for b in range(batch):
        for i in range(tiles):
            for j in range(tiles):
                cell = shifted[b, :, i * h : (i + 1) * h, j * w : (j + 1) * w]
                assert torch.equal(cell, expected_cells[k]), (b, i, j)
                k += 1


def test_random_translate_tiles_errors():
    from fastvision.data.augment import random_translate

    with pytest.raises(ValueError, match="tiles"):
        random_translate(torch.rand(1, 1, 8, 8), 1, tiles=0)
    with pytest.raises(ValueError, match="tiles=3 must divide"):
        random_translate(torch.rand(1, 1, 8, 8), 1, tiles=3)


class _WritesAMarker:
    """Unpickling this runs ``open(marker, "w")``: the file appears if the loader executes code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_real_format_pickles_load(tmp_path, protocol):
    """The restricted reader admits what the format uses, at every pickle protocol numpy writes."""
    from fastvision.data.cifar import read_cifar_batch

    data = np.random.default_rng(protocol).integers(0, 256, (3, 3072)).astype(np.uint8)
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [0, 9, 4], b"data": data,
             b"filenames": [b"a.png", b"b.png", b"c.png"]}  # fmt: skip
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    images, labels = read_cifar_batch(path)
    assert labels == [0, 9, 4] and images.shape == (3, 3, 32, 32)
    assert np.array_equal(images.reshape(3, -1), data)


def test_cifar10_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(directory)
    marker = tmp_path / "marker"
    crafted = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3], b"x": _WritesAMarker(marker)}
    (directory / "data_batch_3").write_bytes(pickle.dumps(crafted))
    with pytest.raises(ValueError, match=r"data_batch_3: not a CIFAR-10 batch pickle \(refused to load"):
        build_dataset("cifar10", "train", data_dir=tmp_path)
    assert not marker.exists()
    pickle.loads((directory / "data_batch_3").read_bytes())  # the unrestricted loader would run it
    assert marker.exists()


@pytest.mark.parametrize(
    "batch, problem",
    [
        ([1, 2], "expected a dict"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8 array of shape"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "list of 2 class indices"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"integers in \[0, 10\)"),
    ],
)
def test_cifar10_malformed_batches_name_the_file(tmp_path, batch, problem):
    from fastvision.data.cifar import CifarFormatError, read_cifar_batch

    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(batch))
    with pytest.raises(CifarFormatError, match=problem) as info:
        read_cifar_batch(path)
    assert str(path) in str(info.value)
    whole = pickle.dumps(batch)
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CifarFormatError, match="truncated"):
        read_cifar_batch(path)

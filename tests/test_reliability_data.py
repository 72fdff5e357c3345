"""Damaged or inconsistent IDX files give an IDXFormatError naming the file and the problem."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from fastvision.data import IDXFormatError, build_dataset, read_idx


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path, data: bytes) -> None:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def mnist_dir(tmp_path, images=None, labels=None, gz=False):
    """A data root with MNIST test files; ``images``/``labels`` replace the raw contents."""
    directory = tmp_path / "mnist"
    directory.mkdir(exist_ok=True)
    suffix = ".gz" if gz else ""
    good_images = np.zeros((4, 28, 28), dtype=np.uint8)
    good_labels = np.array([0, 1, 2, 9], dtype=np.uint8)
    write(
        directory / f"t10k-images-idx3-ubyte{suffix}",
        images if images is not None else idx_bytes(good_images),
    )
    write(
        directory / f"t10k-labels-idx1-ubyte{suffix}",
        labels if labels is not None else idx_bytes(good_labels),
    )
    return tmp_path


IMAGES = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"", "header truncated"),
        (b"\x00\x00", "header truncated"),
        (IMAGES[:15], "header truncated"),  # 3-D header needs 16 bytes
        (IMAGES[:12], "header truncated"),
        (b"\x1f\x8b\x08\x08" + IMAGES[4:], "bad magic number"),
        (b"PK\x03\x04" + IMAGES[4:], "bad magic number"),
        (bytes([0, 0, 0x07, 3]) + IMAGES[4:], "unknown IDX element type"),
        (IMAGES[:-1], "truncated: the header says"),
        (IMAGES + b"\x00", "too long"),
    ],
)
def test_bad_idx_files_name_the_file(tmp_path, data, problem):
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(IDXFormatError, match=problem) as info:
        read_idx(path)
    assert str(path) in str(info.value) and info.value.path == path


def test_truncated_and_corrupt_gzip_name_the_file(tmp_path):
    path = tmp_path / "images-idx3-ubyte.gz"
    compressed = gzip.compress(IMAGES)
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(IDXFormatError, match=r"images-idx3-ubyte\.gz.*truncated gzip"):
        read_idx(path)
    path.write_bytes(b"\x1f\x8b" + b"\xff" * 40)
    with pytest.raises(IDXFormatError, match=r"images-idx3-ubyte\.gz.*corrupt gzip"):
        read_idx(path)
    path.write_bytes(IMAGES)  # named .gz but not compressed
    with pytest.raises(IDXFormatError, match=r"images-idx3-ubyte\.gz.*gzip"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_labels_outside_0_to_9(tmp_path, gz):
    root = mnist_dir(tmp_path, labels=idx_bytes(np.array([0, 200, 3, 10], dtype=np.uint8)), gz=gz)
    with pytest.raises(IDXFormatError, match=r"t10k-labels-idx1-ubyte.*2 labels outside 0-9.*200 at index 1"):
        build_dataset("mnist", "test", data_dir=root)


def test_count_mismatch_names_both_files(tmp_path):
    root = mnist_dir(tmp_path, labels=idx_bytes(np.array([0, 1, 2], dtype=np.uint8)))
    with pytest.raises(
        IDXFormatError, match=r"t10k-labels-idx1-ubyte: holds 3 labels but t10k-images-idx3-ubyte holds 4"
    ):
        build_dataset("mnist", "test", data_dir=root)


def test_wrong_shapes_and_types(tmp_path):
    root = mnist_dir(tmp_path, images=idx_bytes(np.zeros((4, 784), dtype=np.uint8)))
    with pytest.raises(IDXFormatError, match=r"t10k-images-idx3-ubyte.*expected uint8 images \[N, H, W\]"):
        build_dataset("mnist", "test", data_dir=root)
    root = mnist_dir(tmp_path, images=IMAGES, labels=idx_bytes(np.zeros(4, dtype=np.float32), 0x0D))
    with pytest.raises(IDXFormatError, match=r"t10k-labels-idx1-ubyte.*expected integer labels"):
        build_dataset("mnist", "test", data_dir=root)
    root = mnist_dir(
        tmp_path,
        images=idx_bytes(np.zeros((0, 28, 28), dtype=np.uint8)),
        labels=idx_bytes(np.zeros(0, dtype=np.uint8)),
    )
    with pytest.raises(IDXFormatError, match="holds no images"):
        build_dataset("mnist", "test", data_dir=root)


def test_good_files_still_load(tmp_path):
    dataset = build_dataset("mnist", "test", data_dir=mnist_dir(tmp_path))
    assert len(dataset) == 4 and int(dataset[3][1]) == 9


def test_idx_shape_product_does_not_wrap(tmp_path):
    """(2**32-1)**3 wraps around in int64; the size check uses exact integers and names the sizes."""
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1)
    raw = tmp_path / "images-idx3-ubyte"
    raw.write_bytes(header + b"\x00" * 64)
    sizes = r"\(4294967295, 4294967295, 4294967295\)"
    with pytest.raises(IDXFormatError, match=rf"truncated: the header says {sizes}"):
        read_idx(raw)
    packed = tmp_path / "images-idx3-ubyte.gz"
    write(packed, header + b"\x00" * 64)
    with pytest.raises(IDXFormatError, match=rf"dimension sizes {sizes} .*more than a \d+-byte gzip file"):
        read_idx(packed)


def test_gzip_idx_memory_is_bounded_by_the_header(tmp_path):
    """A small gzip file that expands to 64 MiB behind a 4-image header: only what the header
    announces (plus one byte) is decompressed before it is refused as too long."""
    import tracemalloc

    path = tmp_path / "bomb-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(IMAGES)
        zeros = bytes(2**20)
        for _ in range(64):
            f.write(zeros)
    assert path.stat().st_size < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(IDXFormatError, match="too long"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak


def test_gzip_idx_header_announcing_more_than_the_file_can_hold(tmp_path):
    path = tmp_path / "claims-idx3-ubyte.gz"
    write(path, bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 10**9, 28, 28))
    with pytest.raises(IDXFormatError, match="announce 784,000,000,000 bytes of data, more than"):
        read_idx(path)

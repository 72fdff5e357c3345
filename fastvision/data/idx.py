"""Reader for the IDX format used by MNIST and Fashion-MNIST (gzip-compressed or raw)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IDXFormatError(ValueError):
    """An IDX file that cannot be read as such; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"IDX file {self.path}: {problem}")


def _read_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except EOFError:
        raise IDXFormatError(path, "truncated gzip file (the compressed stream ends early)") from None
    except (gzip.BadGzipFile, zlib.error) as error:
        raise IDXFormatError(path, f"corrupt gzip file ({error})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file into a native-endian numpy array; ``.gz`` files are decompressed.

    A file that is not IDX, has a short header, or holds more or fewer bytes than its header
    announces raises :class:`IDXFormatError` naming the file.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXFormatError(path, f"header truncated: {len(data)} bytes, the magic number alone needs 4")
    if data[0] != 0 or data[1] != 0:
        raise IDXFormatError(
            path,
            f"not an IDX file (bad magic number 0x{data[:4].hex()}; IDX files start with two zero bytes)",
        )
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise IDXFormatError(path, f"unknown IDX element type 0x{type_code:02x}")
    dtype = _IDX_DTYPES[type_code]
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        raise IDXFormatError(
            path,
            f"header truncated: {len(data)} bytes, a {ndim}-dimensional IDX header needs {header_end}",
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header_end
    if found != expected:
        what = "truncated" if found < expected else "too long"
        raise IDXFormatError(
            path, f"{what}: the header says {shape} ({expected} bytes of data) but {found} bytes follow"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_end).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)

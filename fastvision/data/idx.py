"""Reader for the IDX format used by MNIST and Fashion-MNIST (gzip-compressed or raw)."""

from __future__ import annotations

import gzip
import math
import struct
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


# Deflate expands at most about 1032:1; a gzip file whose header announces more data than that
# cannot hold it, and is refused before anything is decompressed.
_GZIP_MAX_RATIO = 1032
_CHUNK = 1 << 20


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_at_most(f, path: Path, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``f``, read in chunks (memory grows with what the file holds, never
    with what a header claims); gzip errors name the file."""
    parts, size = [], 0
    try:
        while size < limit:
            chunk = f.read(min(_CHUNK, limit - size))
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
    except EOFError:
        raise IDXFormatError(path, "truncated gzip file (the compressed stream ends early)") from None
    except (gzip.BadGzipFile, zlib.error) as error:
        raise IDXFormatError(path, f"corrupt gzip file ({error})") from None
    return b"".join(parts)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file into a native-endian numpy array; ``.gz`` files are decompressed.

    A file that is not IDX, has a short header, or holds more or fewer bytes than its header
    announces raises :class:`IDXFormatError` naming the file. The header is read and checked first:
    the data is then read only up to the size it announces (plus one byte, to notice a file that is
    too long), and a size that a gzip file cannot hold is refused before anything is decompressed.
    """
    path = Path(path)
    with _open(path) as f:
        head = _read_at_most(f, path, 4)
        if len(head) < 4:
            raise IDXFormatError(
                path, f"header truncated: {len(head)} bytes, the magic number alone needs 4"
            )
        if head[0] != 0 or head[1] != 0:
            raise IDXFormatError(
                path,
                f"not an IDX file (bad magic number 0x{head.hex()}; IDX files start with two zero bytes)",
            )
        type_code, ndim = head[2], head[3]
        if type_code not in _IDX_DTYPES:
            raise IDXFormatError(path, f"unknown IDX element type 0x{type_code:02x}")
        dtype = _IDX_DTYPES[type_code]
        header_end = 4 + 4 * ndim
        dims = _read_at_most(f, path, 4 * ndim)
        if len(dims) < 4 * ndim:
            raise IDXFormatError(
                path,
                f"header truncated: {4 + len(dims)} bytes, a {ndim}-dimensional IDX header needs "
                f"{header_end}",
            )
        shape = struct.unpack(f">{ndim}I", dims)
        expected = math.prod(shape) * dtype.itemsize  # Python ints: no wrap-around
        if path.suffix == ".gz":
            # A raw file is read only as far as it goes; a gzip file could expand without bound.
            limit = path.stat().st_size * _GZIP_MAX_RATIO + _CHUNK
            if expected > limit:
                raise IDXFormatError(
                    path,
                    f"the header's dimension sizes {shape} announce {expected:,} bytes of data, more "
                    f"than a {path.stat().st_size:,}-byte gzip file can hold",
                )
        data = _read_at_most(f, path, expected + 1)
    found = len(data)
    if found != expected:
        what = "truncated" if found < expected else "too long"
        more = "" if found < expected else " or more"
        raise IDXFormatError(
            path,
            f"{what}: the header says {shape} ({expected} bytes of data) but {found} bytes{more} follow",
        )
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


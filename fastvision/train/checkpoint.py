"""Verified, atomic checkpoint files and RNG-state capture for exact resumption.

A checkpoint file is a short header followed by the ``torch.save`` payload::

    b"FASTVISION-CHECKPOINT\\n"   magic (22 bytes)
    uint32 little-endian           format version (1)
    uint64 little-endian           payload length in bytes
    32 bytes                       SHA-256 of the payload
    payload                        torch.save(state), loaded with weights_only=True

``load_checkpoint`` checks the length and the digest before unpickling anything, so a truncated,
bit-flipped or foreign file is refused with a :class:`CheckpointError` that names the file and the
problem. Files are written to a temporary name in the same folder, fsynced and renamed over the
target, so ``path`` is always either the old or the complete new file; temporary files that a
killed process left behind are removed by later saves (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import re
import signal
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAGIC = b"FASTVISION-CHECKPOINT\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<IQ32s")  # version, payload length, SHA-256 digest
HEADER_SIZE = len(MAGIC) + _HEADER.size
_ZIP_MAGIC = b"PK\x03\x04"  # a bare torch.save file (no header, no digest)

# Fault injection for the crash-consistency tests: "<stage>:<file name>[:<n>]" kills this process
# with SIGKILL at the n-th (default first) save of that file reaching that stage. Stages:
# "before-replace" (temporary file written and fsynced, not yet renamed) and "after-replace".
CRASH_ENV_VAR = "FASTVISION_CHECKPOINT_CRASH"
CRASH_STAGES = ("before-replace", "after-replace")
_crash_counts: dict[tuple[str, str], int] = {}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: empty, truncated, corrupt, foreign or incomplete."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"checkpoint {self.path}: {problem}")


def _crash_point(stage: str, path: Path) -> None:
    spec = os.environ.get(CRASH_ENV_VAR)
    if not spec:
        return
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] != stage or parts[1] != path.name:
        return
    target = int(parts[2]) if len(parts) == 3 else 1
    key = (stage, path.name)
    _crash_counts[key] = _crash_counts.get(key, 0) + 1
    if _crash_counts[key] == target:
        os.kill(os.getpid(), signal.SIGKILL)


def _temporary_name(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.tmp-{pid}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete ``.<name>.tmp-<pid>`` files beside ``path`` left by processes that no longer run.

    Returns the removed paths. A save in progress in another live process is left alone.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.tmp-(\d+)$")
    removed = []
    for candidate in path.parent.iterdir():
        match = pattern.match(candidate.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        try:
            candidate.unlink()
        except FileNotFoundError:
            continue
        removed.append(candidate)
    return removed


def encode_checkpoint(state: dict[str, Any]) -> bytes:
    """The file contents for ``state``: header (magic, version, length, SHA-256) and payload."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = _HEADER.pack(FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
    return MAGIC + header + payload


def write_atomic(data: bytes, path: str | Path) -> Path:
    """Write ``data`` so that ``path`` is always either the old or the complete new file.

    The temporary file lives in the same directory (``os.replace`` is only atomic within a
    filesystem) and is fsynced before the rename; the directory is fsynced after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temporary_name(path, os.getpid())
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _crash_point("before-replace", path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # persist the rename itself; not possible on every platform/filesystem
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    _crash_point("after-replace", path)
    return path


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically write ``state`` with its SHA-256 digest (see the module docstring)."""
    return write_atomic(encode_checkpoint(state), path)


def copy_checkpoint(source: str | Path, destination: str | Path) -> Path:
    """Atomically copy a checkpoint file after verifying it; the copy is byte-identical."""
    data = Path(source).read_bytes()
    _verified_payload(data, Path(source))
    return write_atomic(data, destination)


def _verified_payload(data: bytes, path: Path) -> bytes | None:
    """The payload of a checkpoint file's bytes, after checking header, length and digest.

    None for a bare ``torch.save`` zip archive (no digest to check).
    """
    if not data:
        raise CheckpointError(path, "the file is empty (0 bytes)")
    if data.startswith(_ZIP_MAGIC):
        return None
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):
            raise CheckpointError(
                path, f"truncated: {len(data)} bytes, shorter than the {HEADER_SIZE}-byte header"
            )
        raise CheckpointError(path, "not a fastvision checkpoint (unknown file header)")
    if len(data) < HEADER_SIZE:
        raise CheckpointError(
            path, f"truncated: {len(data)} bytes, shorter than the {HEADER_SIZE}-byte header"
        )
    version, length, digest = _HEADER.unpack_from(data, len(MAGIC))
    if version != FORMAT_VERSION:
        raise CheckpointError(
            path, f"unsupported checkpoint format version {version} (this fastvision reads {FORMAT_VERSION})"
        )
    found = len(data) - HEADER_SIZE
    if found < length:
        raise CheckpointError(
            path, f"truncated: the header announces {length} payload bytes, {found} are present"
        )
    if found > length:
        raise CheckpointError(
            path, f"corrupt: {found - length} bytes follow the {length}-byte payload the header announces"
        )
    payload = data[HEADER_SIZE:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(
            path, "corrupt: the SHA-256 digest of the payload does not match the one stored in the file"
        )
    return payload


def _unpickle(source, path: Path, map_location) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a ``CheckpointError``."""
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text suggests unsafe loading; this loader only reads tensors and containers.
        raise CheckpointError(
            path,
            "the payload is not a weights-only checkpoint (it holds objects other than tensors, "
            "numbers, strings and containers, or it is damaged)",
        ) from None
    except (EOFError, zipfile.BadZipFile) as error:
        raise CheckpointError(path, f"truncated or damaged payload ({type(error).__name__})") from None
    except RuntimeError as error:
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else type(error).__name__
        if "weights_only" in first_line:
            first_line = "not a weights-only checkpoint"
        raise CheckpointError(path, f"the payload cannot be read: {first_line}") from None


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    required: Iterable[str] = (),
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, verifying its length and SHA-256 digest.

    ``required`` names keys the checkpoint must hold. Any problem with the file (empty, truncated,
    bit-flipped, not a checkpoint, not a mapping, missing keys) raises :class:`CheckpointError`
    naming the file; a missing file raises ``FileNotFoundError``. A bare ``torch.save`` archive
    (no header) is read too, with the same weights-only loader but without a digest to check.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(path, "is a directory, not a checkpoint file")
    data = path.read_bytes()
    payload = _verified_payload(data, path)
    state = _unpickle(io.BytesIO(data if payload is None else payload), path, map_location)
    if not isinstance(state, dict):
        raise CheckpointError(
            path, f"expected a mapping of checkpoint fields, found a {type(state).__name__}"
        )
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(
            path, f"incomplete checkpoint: missing {', '.join(repr(key) for key in missing)}"
        )
    return state


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, in weights_only-loadable types."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])

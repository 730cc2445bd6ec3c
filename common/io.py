"""Atomic file writes and content checksums.

Every file the pipeline writes goes through here, so a killed job never leaves a
half-written file under its final name: we write to a hidden temporary name in the
same folder, fsync, then rename (atomic on POSIX)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

try:
    from zlib_ng.zlib_ng import crc32 as _simd_crc32
except ImportError:  # an interpreter without our venv (bench/gpu_check.py's bootstrap, a
    from zlib import crc32 as _simd_crc32  # GPU machine's own Python): same values, slower

CHUNK = 1 << 20
_UMASK = os.umask(0o022)  # read once, restored at once: mkstemp makes 0600 files, and
os.umask(_UMASK)          # outputs (shards on shared storage) must get the usual mode


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a binary file that appears under `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def crc32(data) -> int:
    """zlib.crc32 of a bytes-like object, same value, from zlib-ng's SIMD code: about 15x
    faster here, which lets readers check every sample at disk speed."""
    return _simd_crc32(data)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete leftovers of writes that were killed mid-way; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)

"""Atomic file writes and content checksums.

Every file the pipeline writes goes through here, so a killed job never leaves a
half-written file under its final name: we write to a hidden temporary name in the
same folder, fsync, then rename (atomic on POSIX)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
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


class DiskFullError(OSError):
    """No space left (or quota exceeded) while writing `path`; the message names the file,
    what was being written and the fix. Nothing under the final name was touched: the
    partial temporary is removed. Callers catch it at their command line and print it."""

    def __init__(self, path, what: str = "a file"):
        self.path = Path(path)
        where = self.path.parent
        super().__init__(errno.ENOSPC, f"disk full while writing {what} to {self.path}: no "
                         f"space left on the file system holding {where} (nothing was replaced; "
                         "the partial file was removed). Free space there, or point WORK_DIR / "
                         "the output folder at a larger disk, then rerun: finished work is kept")

    def __str__(self) -> str:
        return self.strerror


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or one it was raised from or during, is ENOSPC/EDQUOT: torch.save
    and pyarrow re-raise a failed write as their own RuntimeError / ArrowIOError."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and (error.errno in DISK_FULL or "No space left" in str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, what: str = "a file") -> Iterator[BinaryIO]:
    """Open a binary file that appears under `path` only if the block finishes.
    A full disk raises DiskFullError naming `path` and `what` (e.g. "shard tar")."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFullError(path, what) from None
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if not isinstance(e, DiskFullError) and is_disk_full(e):
            raise DiskFullError(path, what) from None
        raise


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created, never deleted) for the block, or
    raise SystemExit(busy) at once when another process holds it. One writer per output
    folder: a second one would redo the first's work or delete its temporaries."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(busy) from None
        yield


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str = "a file") -> None:
    with atomic_open(path, what) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "a file") -> None:
    atomic_write_bytes(path, text.encode("utf-8"), what)


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

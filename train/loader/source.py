"""Random access to shard samples through their DALI index files (`<shard>.idx`, v1.2).

Why not `fn.readers.webdataset`: the loader draws every crop in Python (SoCo's proposal
selection needs both crops), and a reader's sample order cannot be aligned with an
external_source (pipeline.md 1.7). So we read members by offset ourselves, in exactly
the order `split.py` chose, and feed the bytes to DALI. Checking every index entry
against the tar's size at start-up turns a truncated shard into one clear error."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common.keys import check_key

REQUIRED = ("jpg", "boxes", "json")
FIX = "rebuild it with `make shards DATASET=<ds>` (or copy the shard again)"


class ShardReadError(ValueError):
    """A shard or index that cannot be read as our loader expects; names the file and fix."""


@dataclass(frozen=True)
class SampleRef:
    shard: int  # position in ShardSource.tars
    key: str
    members: dict  # ext -> (offset, size)


@dataclass
class RawSample:
    """One sample as the recipes need it: bytes for DALI, arrays for the geometry."""
    key: str
    jpeg: bytes
    width: int
    height: int
    boxes: np.ndarray  # (N,4) float32 x1y1x2y2 source pixels, half-open
    members: dict  # ext -> bytes for the optional members that were asked for


def parse_index(idx_path: Path, tar_path: Path) -> list[tuple[str, dict]]:
    """Parse one v1.2 index; every member must lie inside the tar file."""
    try:
        lines = idx_path.read_text().splitlines()
    except FileNotFoundError:
        raise ShardReadError(f"{idx_path}: DALI index missing for {tar_path.name}; write it "
                             f"with `wds2idx {tar_path} {idx_path}` or {FIX}") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != "v1.2" or not head[1].isdigit():
        raise ShardReadError(f"{idx_path}: not a DALI v1.2 index (first line {lines[:1]}); {FIX}")
    if int(head[1]) != len(lines) - 1:
        raise ShardReadError(f"{idx_path}: header says {head[1]} samples but the index has "
                             f"{len(lines) - 1} lines (truncated index); {FIX}")
    tar_size = tar_path.stat().st_size
    samples = []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts or len(parts) % 4:
            raise ShardReadError(f"{idx_path}:{n}: malformed index line; {FIX}")
        members, key = {}, None
        for ext, off, size, name in zip(*[iter(parts)] * 4):
            key = name.partition(".")[0]
            off, size = int(off), int(size)
            if off + size > tar_size:
                raise ShardReadError(
                    f"{tar_path}: truncated shard: member {name} ends at byte {off + size} but "
                    f"the file has {tar_size} bytes; {FIX}")
            members[ext] = (off, size)
        check_key(key, str(idx_path))
        missing = [e for e in REQUIRED if e not in members]
        if missing:
            raise ShardReadError(f"{tar_path}: sample {key} lacks members {missing}; {FIX}")
        samples.append((key, members))
    return samples


class ShardSource:
    """All samples of a shards folder in (tar name, index) order; reads members by offset."""

    def __init__(self, shards_dir: str | os.PathLike):
        self.dir = Path(shards_dir)
        self.tars = sorted(self.dir.glob("*.tar"))
        if not self.tars:
            raise ShardReadError(f"{self.dir}: no *.tar shards found; build them with "
                                 "`make shards DATASET=<ds>` and pass that shards folder")
        self.refs: list[SampleRef] = []
        for i, tar in enumerate(self.tars):
            for key, members in parse_index(tar.with_suffix(".idx"), tar):
                self.refs.append(SampleRef(i, key, members))
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.refs)

    def __getstate__(self):  # file descriptors do not travel to worker processes
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def _read(self, ref: SampleRef, ext: str) -> bytes:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(ref.shard)
        if fd is None:
            fd = self._fds[ref.shard] = os.open(self.tars[ref.shard], os.O_RDONLY)
        off, size = ref.members[ext]
        data = os.pread(fd, size, off)
        if len(data) != size:
            raise ShardReadError(f"{self.tars[ref.shard]}: truncated shard: {ref.key}.{ext} "
                                 f"needs {size} bytes at offset {off}, got {len(data)}; {FIX}")
        return data

    def where(self, index: int) -> str:
        """'<tar> sample <key>': how error messages name a sample."""
        ref = self.refs[index]
        return f"{self.tars[ref.shard]} sample {ref.key}"

    def load(self, index: int, extra: tuple[str, ...] = ()) -> RawSample:
        ref = self.refs[index]
        where = self.where(index)
        try:
            meta = json.loads(self._read(ref, "json"))
            width, height = int(meta["width"]), int(meta["height"])
        except (ValueError, KeyError, TypeError) as e:
            raise ShardReadError(f"{where}: {ref.key}.json lacks integer width/height ({e}); "
                                 f"{FIX}") from e
        raw = self._read(ref, "boxes")
        if len(raw) % 16:
            raise ShardReadError(f"{where}: {ref.key}.boxes has {len(raw)} bytes, not a multiple "
                                 f"of 16 (N*4 float32); {FIX}")
        boxes = np.frombuffer(raw, "<f4").reshape(-1, 4).astype(np.float32)
        members = {}
        for ext in extra:
            if ext not in ref.members:
                raise ShardReadError(f"{where}: member {ref.key}.{ext} is missing but the recipe "
                                     f"needs it (choose another mask source, or {FIX})")
            members[ext] = self._read(ref, ext)
        return RawSample(ref.key, self._read(ref, "jpg"), width, height, boxes, members)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def decode_png(data: bytes, where: str) -> np.ndarray:
    """8- or 16-bit single-channel PNG -> (H,W) uint16, values kept exactly."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim != 2:
        raise ShardReadError(f"{where}: not a single-channel PNG label map; {FIX}")
    return arr.astype(np.uint16, copy=False)

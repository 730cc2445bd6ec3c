"""Python reader of our shards: iterate samples, or fetch one by key through the index.

Used by tests, the reference loader and the audit report; DALI reads the same tars
with the .idx files instead. Every sample read is checked against the crc32 in
index.parquet, so a truncated or altered shard raises ShardError naming the shard and
offset. Nothing is unpickled: members are JPEG, PNG, JSON and raw float32."""
from __future__ import annotations

import io
import json
from functools import cached_property
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from common.io import crc32
from common.keys import check_key
from schemas import SchemaError, validate
from schemas.index import INDEX, check_manifest
from shards.tarfmt import ShardError, check_member_name, check_shard_name, iter_members

MANIFEST = "manifest.json"
INDEX_FILE = "index.parquet"


def decode_png(data: bytes, what: str) -> np.ndarray:
    """A single-channel 8- or 16-bit PNG as a 2-D uint16 array."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim != 2:
        raise ShardError(f"{what}: not a single-channel PNG; rebuild the shards with make shards")
    return arr.astype(np.uint16, copy=False)


class Sample:
    """One sample's members, decoded lazily (only what a caller touches is decoded).

    Arrays follow docs/interfaces.md: boxes (N,4) float32 x1y1x2y2 pixels half-open,
    fh (H,W) uint16 segment ids, mcg (K,H,W) bool, gt_labels (H,W) uint16 or None."""

    def __init__(self, key: str, members: dict[str, bytes], where: str = ""):
        self.key, self.members, self.where = key, members, where or key
        for ext in ("jpg", "boxes", "json"):
            if ext not in members:
                raise ShardError(f"{self.where}: member {key}.{ext} is missing; "
                                 "rebuild the shards with make shards")

    def __repr__(self) -> str:
        return f"Sample({self.key!r}, members={sorted(self.members)})"

    @property
    def jpeg(self) -> bytes:
        return self.members["jpg"]

    @cached_property
    def meta(self) -> dict:
        return json.loads(self.members["json"])

    @cached_property
    def image(self) -> np.ndarray:
        """RGB uint8 (H,W,3) of the stored JPEG; it needs no EXIF fix by construction."""
        with Image.open(io.BytesIO(self.jpeg)) as im:
            return np.asarray(im.convert("RGB"))

    @cached_property
    def boxes(self) -> np.ndarray:
        raw = self.members["boxes"]
        if len(raw) % 16:
            raise ShardError(f"{self.where}: {self.key}.boxes has {len(raw)} bytes, not a "
                             "multiple of 16 (4 float32 per box); rebuild with make shards")
        return np.frombuffer(raw, "<f4").reshape(-1, 4).astype(np.float32)

    @cached_property
    def fh(self) -> np.ndarray:
        return decode_png(self.members["fh.png"], f"{self.where}: {self.key}.fh.png")

    @cached_property
    def mcg(self) -> np.ndarray:
        bits = decode_png(self.members["mcg.png"], f"{self.where}: {self.key}.mcg.png")
        k = np.arange(int(self.meta["num_masks"]), dtype=np.uint16)
        return ((bits[None] >> k[:, None, None]) & 1).astype(bool)

    @cached_property
    def gt_labels(self) -> np.ndarray | None:
        data = self.members.get("gt.png")
        return None if data is None else decode_png(data, f"{self.where}: {self.key}.gt.png")

    @cached_property
    def gt(self) -> dict | None:
        data = self.members.get("gt.json")
        return None if data is None else json.loads(data)


class ShardDataset:
    """The packed samples of one dataset's shards folder, in shard order."""

    def __init__(self, shards_dir, verify_crc: bool = True):
        self.dir = Path(shards_dir)
        self.verify_crc = verify_crc
        manifest_path = self.dir / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found: the shards are missing or "
                                    "unfinished; run make shards DATASET=<name>")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise SchemaError(f"{manifest_path}: not valid JSON ({e}); rebuild with make shards")
        self.manifest = check_manifest(manifest, str(manifest_path))
        index_path = self.dir / INDEX_FILE
        self.index = validate(pq.read_table(index_path), INDEX, str(index_path))
        self.shards = [check_shard_name(s["name"], str(manifest_path))
                       for s in self.manifest["shards"]]
        order = {name: i for i, name in enumerate(self.shards)}
        rows = [r for r in self.index.select(["key", "status", "error", "shard", "position",
                                              "tar_offset", "tar_size", "crc32", "members"]
                                             ).to_pylist()]
        for r in rows:
            check_key(r["key"], str(index_path))
        self.failed = {r["key"]: r["error"] for r in rows if r["status"] != "ok"}
        ok = [r for r in rows if r["status"] == "ok"]
        for r in ok:
            if r["shard"] not in order:
                raise SchemaError(f"{index_path}: sample {r['key']} is in shard {r['shard']!r}, "
                                  f"which {manifest_path} does not list; rebuild with make shards")
        ok.sort(key=lambda r: (order[r["shard"]], r["position"]))
        self._rows = ok
        self._by_key = {r["key"]: r for r in ok}
        self._by_shard: dict[str, list[dict]] = {name: [] for name in self.shards}
        for r in ok:
            self._by_shard[r["shard"]].append(r)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def keys(self) -> list[str]:
        return [r["key"] for r in self._rows]

    @property
    def tar_paths(self) -> list[Path]:
        return [self.dir / name for name in self.shards]

    @property
    def idx_paths(self) -> list[Path]:
        return [p.with_suffix(".idx") for p in self.tar_paths]

    def _read(self, f, row: dict) -> Sample:
        shard, start, size = row["shard"], row["tar_offset"], row["tar_size"]
        f.seek(start)
        span = f.read(size)
        if len(span) < size:
            raise ShardError(f"{shard}: truncated at offset {start + len(span)}: sample "
                             f"{row['key']} spans bytes {start}..{start + size}; rebuild the "
                             "shard with make shards")
        if self.verify_crc and crc32(span) != row["crc32"]:
            raise ShardError(f"{shard}: sample {row['key']} at offset {start}: crc32 mismatch, "
                             "the shard was altered or corrupted; run make verify and rebuild "
                             "with make shards")
        members = {m["ext"]: span[m["offset"] - start:m["offset"] - start + m["size"]]
                   for m in row["members"]}
        return Sample(row["key"], members, where=shard)

    def get(self, key: str) -> Sample:
        check_key(key, "ShardDataset.get")
        row = self._by_key.get(key)
        if row is None:
            if key in self.failed:
                raise KeyError(f"sample {key!r} was not packed: {self.failed[key]}")
            raise KeyError(f"sample {key!r} is not in {self.dir / INDEX_FILE}")
        with open(self.dir / row["shard"], "rb") as f:
            return self._read(f, row)

    def iter_shard(self, name: str) -> Iterator[Sample]:
        """The samples of one tar, in tar order (for splitting work by shard)."""
        if name not in self._by_shard:
            raise KeyError(f"{name!r} is not a shard of {self.dir}; see ShardDataset.shards")
        with open(self.dir / name, "rb") as f:
            for row in self._by_shard[name]:
                yield self._read(f, row)

    def __iter__(self) -> Iterator[Sample]:
        for name in self.shards:
            yield from self.iter_shard(name)


def iter_tar(path) -> Iterator[tuple[str, dict[str, bytes], int]]:
    """Samples of a tar read without any index: (key, {ext: bytes}, header offset).

    For verify and for tars from elsewhere. Member names are checked (no escaping
    keys); members of one key must be adjacent, as webdataset requires."""
    path = Path(path)
    shard = path.name
    key, members, start = None, {}, 0
    with open(path, "rb") as f:
        for name, header_offset, data_offset, size in iter_members(f, shard):
            k, ext = check_member_name(name, f"{shard} at offset {header_offset}")
            f.seek(data_offset)
            data = f.read(size)
            if len(data) < size:
                raise ShardError(f"{shard}: truncated at offset {data_offset + len(data)} "
                                 f"inside member {name}; rebuild it with make shards")
            if k != key:
                if key is not None:
                    yield key, members, start
                key, members, start = k, {}, header_offset
            if ext in members:
                raise ShardError(f"{shard}: duplicate member {name} at offset {header_offset}")
            members[ext] = data
    if key is not None:
        yield key, members, start

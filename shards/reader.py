"""Python reader of our shards: iterate samples, or fetch one by key through the index.

Used by the training loader (train.loader.source), the evaluation, tests and the audit
report. Opening checks the folder against manifest.json; every read is checked against
the crc32s in index.parquet, so a truncated or altered shard raises ShardError naming the
shard, key, member and offset. Members decode through shards.format. Nothing is
unpickled: members are JPEG, PNG, JSON and raw float32."""
from __future__ import annotations

import io
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from common.io import crc32
from common.keys import check_key
from schemas import SchemaError, validate
from schemas.index import INDEX, check_manifest
from shards import format as fmt
from shards.tarfmt import ShardError, check_member_name, check_shard_name, iter_members

MANIFEST = "manifest.json"
INDEX_FILE = "index.parquet"


class Sample:
    """One sample's members, decoded lazily (only what a caller touches is decoded).

    Arrays follow docs/interfaces.md: boxes (N,4) float32 x1y1x2y2 pixels half-open,
    fh (H,W) uint16 segment ids, mcg (K,H,W) bool, gt_labels (H,W) uint16 or None."""

    def __init__(self, key: str, members: dict[str, bytes], where: str = ""):
        self.key, self.members, self.where = key, members, where or key
        for ext in fmt.REQUIRED:
            if ext not in members:
                raise ShardError(f"{self.where}: member {key}.{ext} is missing; "
                                 "rebuild the shards with make shards")

    def __repr__(self) -> str:
        return f"Sample({self.key!r}, members={sorted(self.members)})"

    @property
    def jpeg(self) -> bytes:
        return self.members["jpg"]

    def _decode(self, fn, *args):
        try:
            return fn(*args)
        except fmt.MemberError as e:
            raise ShardError(f"{self.where}: {e}; rebuild the shards with make shards") from None

    @cached_property
    def meta(self) -> dict:
        return self._decode(fmt.decode_meta, self.members["json"], f"{self.key}.json")

    @cached_property
    def image(self) -> np.ndarray:
        """RGB uint8 (H,W,3) of the stored JPEG; it needs no EXIF fix by construction."""
        with Image.open(io.BytesIO(self.jpeg)) as im:
            return np.asarray(im.convert("RGB"))

    @cached_property
    def boxes(self) -> np.ndarray:
        return self._decode(fmt.decode_boxes, self.members["boxes"], f"{self.key}.boxes")

    @cached_property
    def fh(self) -> np.ndarray:
        return self._decode(fmt.decode_label_png, self.members["fh.png"], f"{self.key}.fh.png")

    @cached_property
    def mcg(self) -> np.ndarray:
        return self._decode(fmt.decode_bitfield_png, self.members["mcg.png"],
                            int(self.meta.get("num_masks") or 0), f"{self.key}.mcg.png")

    @cached_property
    def gt_labels(self) -> np.ndarray | None:
        data = self.members.get("gt.png")
        return None if data is None else self._decode(fmt.decode_label_png, data, f"{self.key}.gt.png")

    @cached_property
    def gt(self) -> dict | None:
        data = self.members.get("gt.json")
        return None if data is None else json.loads(data)


def fix_for(dataset: str) -> str:
    """The fix every read error of a dataset's shards ends with."""
    return (f"rebuild the shards with make shards DATASET={dataset} SHARDS_ARGS=--overwrite "
            f"(make verify DATASET={dataset} lists every problem)")


class ShardDataset:
    """The packed samples of one dataset's shards folder, in shard order.

    Opening checks the folder against manifest.json (schema major version, every listed
    shard present with its size, no unlisted tar, sample counts per shard and in all) and
    raises ShardError naming the shard and the fix. Every read is crc32-checked against
    index.parquet: each member against its own crc32 (index 1.1), or the whole sample's
    span for shards written before per-member checksums (index 1.0)."""

    COLUMNS = ["key", "status", "error", "shard", "position", "tar_offset", "tar_size", "crc32",
               "members", "member_crc32", "width", "height", "num_masks"]

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
        self.fix = fix_for(self.manifest["dataset"])
        index_path = self.dir / INDEX_FILE
        try:
            self.index = validate(pq.read_table(index_path), INDEX, str(index_path))
        except (OSError, pa.ArrowException) as e:
            raise ShardError(f"{index_path}: unreadable ({e}); {self.fix}") from None
        self.shards = [check_shard_name(s["name"], str(manifest_path))
                       for s in self.manifest["shards"]]
        order = {name: i for i, name in enumerate(self.shards)}
        rows = self.index.select(self.COLUMNS).to_pylist()
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
        self.check_folder()
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def check_folder(self) -> None:
        """The folder holds exactly the manifest's shards, each of its size and count."""
        listed = {s["name"]: s for s in self.manifest["shards"]}
        for name, record in listed.items():
            path = self.dir / name
            if not path.is_file():
                raise ShardError(f"{path}: shard listed in {MANIFEST} is missing (deleted or "
                                 f"not copied); copy it back, or {self.fix}")
            size = path.stat().st_size
            if size != record["bytes"]:
                raise ShardError(f"{path}: {size} bytes but {MANIFEST} says {record['bytes']} "
                                 f"(truncated or altered); {self.fix}")
            if len(self._by_shard[name]) != record["num_samples"]:
                raise ShardError(f"{path}: {INDEX_FILE} lists {len(self._by_shard[name])} "
                                 f"samples in it, {MANIFEST} says {record['num_samples']}; {self.fix}")
        stray = sorted(p.name for p in self.dir.glob("*.tar") if p.name not in listed)
        if stray:
            raise ShardError(f"{self.dir / stray[0]}: a tar that {MANIFEST} does not list "
                             f"({len(stray)} such); remove it (other data does not belong in a "
                             f"shards folder), or {self.fix}")
        if len(self._rows) != self.manifest["num_samples"]:
            raise ShardError(f"{self.dir}: {INDEX_FILE} lists {len(self._rows)} packed samples, "
                             f"{MANIFEST} says {self.manifest['num_samples']}; {self.fix}")

    def __getstate__(self):  # file descriptors do not travel to worker processes
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def keys(self) -> list[str]:
        return [r["key"] for r in self._rows]

    def row(self, i: int) -> dict:
        """Index row of the i-th packed sample (shard order)."""
        return self._rows[i]

    @property
    def tar_paths(self) -> list[Path]:
        return [self.dir / name for name in self.shards]

    @property
    def idx_paths(self) -> list[Path]:
        return [p.with_suffix(".idx") for p in self.tar_paths]

    def _pread(self, shard: str, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.dir / shard, os.O_RDONLY)
        return os.pread(fd, size, offset)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def _span(self, row: dict, data: bytes | None = None) -> bytes:
        shard, start, size = row["shard"], row["tar_offset"], row["tar_size"]
        span = self._pread(shard, start, size) if data is None else data
        if len(span) < size:
            raise ShardError(f"{self.dir / shard}: truncated at offset {start + len(span)}: "
                             f"sample {row['key']} spans bytes {start}..{start + size}; {self.fix}")
        if self.verify_crc and crc32(span) != row["crc32"]:
            bad = [f"member {row['key']}.{m['ext']} at offset {m['offset']}"
                   for m, want in zip(row["members"], row["member_crc32"] or [])
                   if crc32(span[m["offset"] - start:][:m["size"]]) != want]
            raise ShardError(f"{self.dir / shard}: sample {row['key']} at offset {start}: "
                             f"crc32 mismatch{' in ' + ', '.join(bad) if bad else ''}, the shard "
                             f"was altered or corrupted; {self.fix}")
        return span

    def read_members(self, row: dict, exts) -> dict[str, bytes]:
        """The named members of one sample, each read by offset and checked against its
        crc32 in the index (1.0 indexes: the whole sample once)."""
        entries = {m["ext"]: (m, c) for m, c in zip(row["members"], row["member_crc32"] or
                                                    [None] * len(row["members"]))}
        missing = [e for e in exts if e not in entries]
        if missing:
            raise ShardError(f"{self.dir / row['shard']}: sample {row['key']} has no member "
                             f"{', '.join(row['key'] + '.' + e for e in missing)}; {self.fix}")
        if row["member_crc32"] is None:
            span, start = self._span(row), row["tar_offset"]
            return {e: span[entries[e][0]["offset"] - start:][:entries[e][0]["size"]] for e in exts}
        out = {}
        for ext in exts:
            m, want = entries[ext]
            data = self._pread(row["shard"], m["offset"], m["size"])
            where = f"{self.dir / row['shard']}: sample {row['key']} member {row['key']}.{ext} " \
                    f"at offset {m['offset']}"
            if len(data) != m["size"]:
                raise ShardError(f"{where}: truncated ({len(data)} of {m['size']} bytes); {self.fix}")
            if self.verify_crc and crc32(data) != want:
                raise ShardError(f"{where}: crc32 mismatch, the shard was altered or corrupted; "
                                 f"{self.fix}")
            out[ext] = data
        return out

    def _read(self, row: dict) -> Sample:
        span, start = self._span(row), row["tar_offset"]
        members = {m["ext"]: span[m["offset"] - start:m["offset"] - start + m["size"]]
                   for m in row["members"]}
        return Sample(row["key"], members, where=row["shard"])

    def get(self, key: str) -> Sample:
        check_key(key, "ShardDataset.get")
        row = self._by_key.get(key)
        if row is None:
            if key in self.failed:
                raise KeyError(f"sample {key!r} was not packed: {self.failed[key]}")
            raise KeyError(f"sample {key!r} is not in {self.dir / INDEX_FILE}")
        return self._read(row)

    def iter_shard(self, name: str) -> Iterator[Sample]:
        """The samples of one tar, in tar order (for splitting work by shard)."""
        if name not in self._by_shard:
            raise KeyError(f"{name!r} is not a shard of {self.dir}; see ShardDataset.shards")
        for row in self._by_shard[name]:
            yield self._read(row)

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

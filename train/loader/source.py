"""The loader's view of a shards folder: shards.reader.ShardDataset, checked, by sample index.

Why not `fn.readers.webdataset`: the loader draws every crop in Python (SoCo's proposal
selection needs both crops), and a reader's sample order cannot be aligned with an
external_source (pipeline.md 1.7). So we read members by offset, in exactly the order
`split.py` chose, and feed the bytes to DALI. Everything about the format and its checks
lives in the shards package: opening checks the folder against manifest.json (schema
major version, listed shards present with their sizes, no unlisted tar, sample counts),
every member read is crc32-checked against index.parquet, and boxes are checked to lie
inside the image (shards.format). Any failure is a ShardReadError naming shard, key,
member, offset and the fix.

Bad samples mid-run (`BadSamples`): with max_bad_samples = 0 (the default) the first one
stops the run with its message; with N > 0 up to N are skipped and recorded as (key,
reason), and each is replaced in its batch by the next readable sample of the dataset
(index + 1, + 2, ...), so every batch keeps its size and every rank its batch count."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from schemas import SchemaError
from shards import format as fmt
from shards.reader import ShardDataset
from shards.tarfmt import ShardError

FIX = "rebuild it with `make shards DATASET=<ds>` (or copy the shard again)"


class ShardReadError(ShardError):
    """A shard or index that cannot be read as our loader expects; names the file and fix."""


@dataclass
class RawSample:
    """One sample as the recipes need it: bytes for DALI, arrays for the geometry."""
    key: str
    jpeg: bytes
    width: int
    height: int
    boxes: np.ndarray  # (N,4) float32 x1y1x2y2 source pixels, half-open
    members: dict  # ext -> bytes for the optional members that were asked for


def decode_png(data: bytes, where: str) -> np.ndarray:
    """8- or 16-bit single-channel PNG -> (H,W) uint16, values kept exactly (shards.format)."""
    try:
        return fmt.decode_label_png(data, where)
    except fmt.MemberError as e:
        raise ShardReadError(f"{e}; {FIX}") from None


class ShardSource:
    """All packed samples of a shards folder in manifest (shard, position) order."""

    def __init__(self, shards_dir: str | os.PathLike):
        self.dir = Path(shards_dir)
        try:
            self.data = ShardDataset(self.dir)
        except FileNotFoundError as e:
            raise ShardReadError(f"{e}; pass a shards folder written by make shards") from None
        except (ShardError, SchemaError) as e:
            raise ShardReadError(str(e)) from None
        self.keys = self.data.keys

    def __len__(self) -> int:
        return len(self.data)

    def where(self, index: int) -> str:
        """'<tar> sample <key>': how error messages name a sample."""
        row = self.data.row(index)
        return f"{self.dir / row['shard']} sample {row['key']}"

    def load(self, index: int, extra: tuple[str, ...] = ()) -> RawSample:
        row = self.data.row(index)
        where = self.where(index)
        for ext in extra:
            if ext not in {m["ext"] for m in row["members"]}:
                raise ShardReadError(f"{where}: member {row['key']}.{ext} is missing but the "
                                     f"recipe needs it (choose another mask source, or {FIX})")
        try:
            members = self.data.read_members(row, ("boxes", "jpg", *extra))
            boxes = fmt.check_boxes(fmt.decode_boxes(members["boxes"], f"{row['key']}.boxes"),
                                    row["width"], row["height"], f"{row['key']}.boxes")
        except ShardError as e:
            raise ShardReadError(str(e)) from None
        except fmt.MemberError as e:
            raise ShardReadError(f"{where}: {e}; {FIX}") from None
        return RawSample(row["key"], members.pop("jpg"), row["width"], row["height"], boxes,
                         {e: members[e] for e in extra})

    def close(self) -> None:
        self.data.close()


class BadSamples:
    """The bad-sample policy of one loader: stop at the first (limit 0), or skip and
    record up to `limit` samples, replacing each by the next readable one."""

    def __init__(self, limit: int = 0):
        if limit < 0:
            raise ValueError(f"max_bad_samples must be >= 0, got {limit}")
        self.limit, self.items = int(limit), []

    def record(self, key: str, error: Exception) -> None:
        """Count one bad sample, or re-raise when the policy says stop."""
        if len(self.items) >= self.limit:
            if self.limit:
                raise ShardReadError(f"{error} (bad sample {len(self.items) + 1}, more than "
                                     f"data.max_bad_samples = {self.limit}; skipped so far: "
                                     f"{', '.join(k for k, _ in self.items)})") from None
            raise error
        self.items.append((key, str(error)))

    def run(self, source: ShardSource, index: int, fn):
        """fn(index) for the sample at `index`, or for the next readable sample after
        recording a bad one (ShardReadError) under this policy."""
        for step in range(len(source)):
            i = (index + step) % len(source)
            try:
                return fn(i)
            except ShardReadError as e:
                self.record(source.keys[i], e)
        raise ShardReadError(f"{source.dir}: no sample could be read; {FIX}")

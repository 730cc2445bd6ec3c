"""A dataset's key-sorted image list, built on disk by Ray tasks so no process holds it.

Pass 1 (`list_source`, one Ray task per preprocess.datasets.Source: the COCO annotation
file, a class folder, a tree, a chunk of a file list) writes the source's records as
sorted runs of at most RUN_RECORDS (Arrow IPC files under `<listing>/runs/`).
Pass 2 (`merge_runs`, one Ray task) merges the runs by key, streaming, and cuts the
merged order into the job's parts: `<listing>/part-NNNNN.arrow`, `part_size` records
each, the same records and order as `preprocess.datasets.list_images` gives in memory.
It also hashes the list (the job's image_list_sha256) and counts what it dropped.

A part's records are then read by the worker that processes that part (`read_part`);
the driver only ever holds the summaries.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import shutil
from collections import namedtuple
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from common.io import atomic_open
from preprocess.datasets import Counts, DatasetError, ImageRecord, Source, check_unique, source_records

RUN_RECORDS = 50_000   # records sorted in memory at once by a listing task
READ_BATCH = 1024      # records a merge holds per run
PART_FILE = "part-{:05d}.arrow"

SCHEMA = pa.schema([("key", pa.string()), ("path", pa.string()), ("relpath", pa.string()),
                    ("label", pa.int64()), ("gt", pa.string()), ("gt_w", pa.int64()),
                    ("gt_h", pa.int64()), ("error", pa.string())])


Listed = namedtuple("Listed", SCHEMA.names)  # a record as stored (gt as JSON text): the merge's unit


def _listed_table(rows: list[Listed]) -> pa.Table:
    return pa.table({name: [r[i] for r in rows] for i, name in enumerate(SCHEMA.names)}, schema=SCHEMA)


def _table(records: list[ImageRecord]) -> pa.Table:
    return pa.table({
        "key": [r.key for r in records], "path": [r.path for r in records],
        "relpath": [r.relpath for r in records], "label": [r.label for r in records],
        "gt": [None if r.gt is None else json.dumps(r.gt) for r in records],
        "gt_w": [None if r.gt_size is None else r.gt_size[0] for r in records],
        "gt_h": [None if r.gt_size is None else r.gt_size[1] for r in records],
        "error": [r.error for r in records]}, schema=SCHEMA)


def _records(batch) -> Iterator[ImageRecord]:
    for row in batch.to_pylist():
        yield ImageRecord(row["key"], row["path"], row["relpath"], row["label"],
                          None if row["gt"] is None else json.loads(row["gt"]),
                          None if row["gt_w"] is None else (row["gt_w"], row["gt_h"]), row["error"])


def _write(path: Path, records: list[ImageRecord], what: str) -> None:
    with atomic_open(path, what) as f, pa.ipc.new_file(f, SCHEMA) as w:
        for i in range(0, len(records), READ_BATCH):
            w.write_table(_table(records[i:i + READ_BATCH]))


def _sort_key(r):  # ImageRecord or Listed
    return r.key, r.relpath


def list_source(source: Source, runs_dir: str, tag: int) -> dict:
    """Pass 1 for one source: its records as sorted runs; returns the listing counts."""
    counts, buf, n = Counts(), [], 0

    def flush():
        nonlocal buf, n
        if buf:
            buf.sort(key=_sort_key)
            _write(Path(runs_dir) / f"run-{tag:06d}-{n:05d}.arrow", buf, "a listing run")
            buf, n = [], n + 1

    for record in source_records(source, counts):
        buf.append(record)
        if len(buf) >= RUN_RECORDS:
            flush()
    flush()
    return dict(counts)


def _read_run(path: Path) -> Iterator[ImageRecord]:
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield from _records(reader.get_batch(i))


def _read_listed(path: Path) -> Iterator[Listed]:
    """A run's rows as stored, no JSON decoded (the merge only compares and copies them)."""
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            yield from map(Listed._make, zip(*(c.to_pylist() for c in batch.columns)))


def _write_listed(path: Path, rows: list[Listed]) -> None:
    with atomic_open(path, "a listing part") as f, pa.ipc.new_file(f, SCHEMA) as w:
        for i in range(0, len(rows), READ_BATCH):
            w.write_table(_listed_table(rows[i:i + READ_BATCH]))


def image_list_hash_update(h, record) -> None:
    h.update(f"{record.key}\t{record.relpath}\n".encode("utf-8"))


def merge_runs(listing_dir: str, part_size: int, limit: int | None = None) -> dict:
    """Pass 2: the runs merged by key into part files; {num_images, num_parts,
    image_list_sha256, counts}. Raises DatasetError on two paths with one key."""
    listing = Path(listing_dir)
    runs = sorted((listing / "runs").glob("run-*.arrow"))
    counts, h, n, part, previous = Counts(), hashlib.sha256(), 0, [], None
    for record in heapq.merge(*map(_read_listed, runs), key=_sort_key):
        if limit and n >= limit:
            break
        if not check_unique(previous, record, counts):
            continue
        previous = record
        image_list_hash_update(h, record)
        part.append(record)
        n += 1
        if len(part) == part_size:
            _write_listed(listing / PART_FILE.format((n - 1) // part_size), part)
            part = []
    if part:
        _write_listed(listing / PART_FILE.format((n - 1) // part_size), part)
    shutil.rmtree(listing / "runs", ignore_errors=True)
    return {"num_images": n, "num_parts": -(-n // part_size), "image_list_sha256": h.hexdigest(),
            "counts": dict(counts)}


def read_part(listing_dir, part: int) -> list[ImageRecord]:
    """The records of one part, in key order."""
    return list(_read_run(Path(listing_dir) / PART_FILE.format(part)))


def part_keys(listing_dir, part: int) -> list[str]:
    with pa.memory_map(str(Path(listing_dir) / PART_FILE.format(part))) as source:
        return pa.ipc.open_file(source).read_all().column("key").to_pylist()


def build(sources: list[Source], listing_dir: Path, part_size: int, limit: int | None) -> dict:
    """Both passes as Ray tasks (Ray must be initialised); the driver gets summaries only.
    Errors (a bad layout, a full disk) come back as the exception the task raised."""
    import ray
    shutil.rmtree(listing_dir, ignore_errors=True)
    (listing_dir / "runs").mkdir(parents=True)
    lister = ray.remote(num_cpus=1, max_retries=1)(_safe(list_source))
    counts = Counts()
    pending = [lister.remote(s, str(listing_dir / "runs"), i) for i, s in enumerate(sources)]
    while pending:  # in batches, so a million chunks never sit in the driver at once
        done, pending = ray.wait(pending, num_returns=min(len(pending), 64))
        for c in ray.get(done):
            for what, k in _unwrap(c).items():
                counts.add(what, k)
    merger = ray.remote(num_cpus=1, max_retries=1)(_safe(merge_runs))
    summary = _unwrap(ray.get(merger.remote(str(listing_dir), part_size, limit)))
    for what, k in summary.pop("counts").items():
        counts.add(what, k)
    return summary | {"counts": counts}


def _safe(fn):
    """Run `fn`, returning an OSError / ValueError (a full disk, a bad layout) as a value so
    the driver re-raises the same error with its own message, not a Ray traceback."""
    def call(*args):
        try:
            return {"ok": fn(*args)}
        except (OSError, ValueError) as e:  # not the exception: DiskFullError does not unpickle
            return {"error": str(e), "layout": isinstance(e, DatasetError)}
    call.__name__ = fn.__name__
    return call


class ListingError(OSError):
    """Listing failed in a Ray task (a full disk, an unreadable folder); the task's message."""


def _unwrap(result: dict):
    if "error" in result:
        raise (DatasetError if result["layout"] else ListingError)(result["error"])
    return result["ok"]

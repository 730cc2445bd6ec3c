"""`make shards` on Ray: the shards of shards.write written in parallel by tasks, byte for
byte the same as the in-process writer (shards.write.Writer) for the same parts and seed.

The shard a sample lands in depends on the byte sizes of every sample before it (a shard
closes at a sample count or a byte size), so the work is cut in three:
1. build (Ray tasks, fixed chunks of CHUNK samples of the global shuffled order): each
   sample's members are built and checked (shards.write.sample_members: the source read
   once, hashed, its JPEG decoded strictly) and packed as tar bytes at offset 0 (a
   member's bytes do not depend on where it lands; its offsets shift). A chunk leaves
   `_rows/chunks/chunk-NNNNNN.bin` (the packed samples) and `.arrow` (sizes, offsets,
   CRCs, errors) and returns the sizes.
2. plan (the driver, sizes only): the shard boundaries, by the same rule as
   Writer.write_shard, decided as chunks come in (Planner).
3. write (Ray tasks, one a shard, started as soon as its boundaries are known, so
   writing overlaps building): the tar (the chunk bytes at their offsets, the end of
   archive), the DALI .idx and the shard's index rows, each atomic; a shard whose three
   files are there with the planned start, end and size is kept (resume per shard).
The driver then merges index.parquet and manifest.json (Writer.finish) and removes the
chunks. The spilled proposals table, the chunks, the sources and the output must be on
storage every Ray node sees at the same path (one machine, or a shared file system).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.io import atomic_open, atomic_write_text, crc32
from common.progress import Progress
from schemas.index import INDEX
from shards import format as fmt
from shards.tarfmt import end_of_archive, pack_sample
from shards.write import PackParams, SampleError, Writer, index_row, sample_members

CHUNK = 64            # samples built by one task (about a second of work each)
CHUNKS_DIR = "chunks"
IN_FLIGHT = 4         # tasks in flight per CPU: enough to keep every core busy, bounded memory
META = pa.schema([("pos", pa.int64()), ("error", pa.string()), ("size", pa.int64()),
                  ("offset", pa.int64()), ("entries", pa.string()),
                  ("member_crc32", pa.list_(pa.int64())), ("crc32", pa.int64()),
                  ("jpeg_sha256", pa.string()), ("jpeg_reencoded", pa.bool_()), ("has_gt", pa.bool_())])


def _table(spill: str) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(spill)).read_all()


def _row(table: pa.Table, i: int) -> dict:
    return table.slice(i, 1).to_pylist()[0]


def build_chunk(spill: str, rows: list[int], first: int, chunk: str, root: str, params: dict,
                dataset: str) -> tuple[int, list[int]]:
    """Phase 1 for the samples at order positions first.. (their table rows `rows`): packed
    bytes to `chunk`.bin, their facts to `chunk`.arrow; returns (first, the sizes), -1 for
    a sample that failed packing."""
    table, pack = _table(spill), PackParams(**params)
    meta, sizes, offset = [], [], 0
    with atomic_open(Path(chunk + ".bin"), "a packing chunk") as f:
        for pos, i in enumerate(rows, first):
            row = _row(table, i)
            try:
                members, extra = sample_members(row, Path(root), pack, dataset)
            except SampleError as e:
                meta.append({"pos": pos, "error": f"packing: {e}", "size": -1, "offset": offset})
                sizes.append(-1)
                continue
            data, entries = pack_sample(row["key"], members, 0, pack.mtime)
            f.write(data)
            meta.append({"pos": pos, "error": None, "size": len(data), "offset": offset,
                         "entries": json.dumps(entries), "crc32": crc32(data),
                         "member_crc32": [crc32(m) for _, m in members], **extra})
            sizes.append(len(data))
            offset += len(data)
    with atomic_open(Path(chunk + ".arrow"), "a packing chunk's index") as f, \
            pa.ipc.new_file(f, META) as w:
        w.write_table(pa.Table.from_pylist(meta, schema=META))
    return first, sizes


class Planner:
    """Shard boundaries over the order positions by Writer.write_shard's rule, on sizes
    (-1 = a failed sample, which never closes a shard and belongs to the one it is in),
    decided as the sizes arrive: a shard is final once the sample that closes it is known."""

    def __init__(self, params: PackParams):
        self.params, self.start = params, 0

    def advance(self, sizes: list, known: int) -> list[tuple[int, int]]:
        """The shards closed by the first `known` sizes (all known: the last one too)."""
        out, n = [], len(sizes)
        while True:
            pos, size, count = self.start, 0, 0
            while pos < known:
                if sizes[pos] < 0:
                    pos += 1
                    continue
                grown = size + sizes[pos]
                if count and (count >= self.params.max_samples
                              or grown + len(end_of_archive(grown)) > self.params.max_bytes):
                    break
                size, count, pos = grown, count + 1, pos + 1
            if pos < known or (known == n and count):
                out.append((self.start, pos))
                self.start = pos
                if pos < n:
                    continue
            return out


def plan_shards(sizes: list[int], params: PackParams) -> tuple[list[tuple[int, int]], int]:
    """[(start, end)] of each shard, and where the failures after the last packable sample
    start (with no packable sample at all: 0, every failure left to the index)."""
    planner = Planner(params)
    shards = planner.advance(sizes, len(sizes))
    return shards, planner.start


def _chunk_meta(chunks: Path, c: int) -> list[dict]:
    with pa.memory_map(str(chunks / f"chunk-{c:06d}.arrow")) as source:
        return pa.ipc.open_file(source).read_all().to_pylist()


def write_one_shard(spill: str, order: list[int], start: int, end: int, name: str, out: str,
                    rows_dir: str, chunks: str, chunk: int) -> dict:
    """Phase 3: shard `name` from order positions [start, end) (`order`: their table rows),
    reading the chunks of `chunk` samples that hold them."""
    table, out, chunks = _table(spill), Path(out), Path(chunks)
    metas: dict[int, dict] = {}
    for c in range(start // chunk, (end - 1) // chunk + 1):
        metas.update((m["pos"], m) for m in _chunk_meta(chunks, c))
    rows, failures, idx_lines, size = [], [], [], 0
    digest = hashlib.sha256()
    files: dict[int, object] = {}
    try:
        with atomic_open(out / name, "a shard tar") as f:
            for pos, i in zip(range(start, end), order):
                m, row = metas[pos], _row(table, i)
                if m["error"]:
                    failures.append(index_row(row, status="failed", error=m["error"]))
                    continue
                c = pos // chunk
                if c not in files:
                    files[c] = open(chunks / f"chunk-{c:06d}.bin", "rb")
                files[c].seek(m["offset"])
                data = files[c].read(m["size"])
                entries = [e | {"offset": e["offset"] + size} for e in json.loads(m["entries"])]
                f.write(data)
                digest.update(data)
                rows.append(index_row(row, status="ok", error=None, shard=name, position=len(rows),
                                      tar_offset=size, tar_size=len(data), crc32=m["crc32"],
                                      members=entries, member_crc32=m["member_crc32"],
                                      jpeg_sha256=m["jpeg_sha256"], jpeg_reencoded=m["jpeg_reencoded"],
                                      has_gt=m["has_gt"]))
                idx_lines.append(fmt.index_line(row["key"], entries))
                size += len(data)
            tail = end_of_archive(size)
            f.write(tail)
            digest.update(tail)
    finally:
        for fh in files.values():
            fh.close()
    atomic_write_text((out / name).with_suffix(".idx"), fmt.index_text(idx_lines), "a DALI index (.idx)")
    record = {"name": name, "sha256": digest.hexdigest(), "bytes": size + len(tail),
              "num_samples": len(rows), "start": start, "end": end}
    index = INDEX.from_rows(rows + failures)
    index = index.replace_schema_metadata(index.schema.metadata | {
        b"shard": json.dumps(record, sort_keys=True).encode()})
    with atomic_open(Path(rows_dir) / name.replace(".tar", ".parquet"), "a shard's index rows") as rf:
        pq.write_table(index, rf, compression="zstd")
    return record


def _safe(fn):
    """A full disk or unreadable file in a task comes back as its message (one line for
    the command line), not as a Ray traceback."""
    def call(*args):
        try:
            return {"ok": fn(*args)}
        except OSError as e:
            return {"error": str(e)}
    call.__name__ = fn.__name__
    return call


class TaskError(OSError):
    """A Ray task of make shards failed on a file (a full disk, say); its message."""


class RayWriter(Writer):
    """Writer whose samples are built and whose shards are written by Ray tasks."""

    def __init__(self, *args, cpus: int = 1, chunk: int = CHUNK, **kw):
        start = time.perf_counter()
        super().__init__(*args, **kw)
        self.cpus, self.chunk = cpus, chunk
        self.seconds = {"load_parts": time.perf_counter() - start}  # by phase (bench-shards)

    def _run(self, overwrite: bool) -> dict:
        """Build chunks in order; each shard is written as soon as the chunks that close it
        are built (planning needs only the sizes), so writing overlaps building."""
        import ray
        self.check_plan(overwrite)
        chunks = self.rows_dir / CHUNKS_DIR
        chunks.mkdir(parents=True, exist_ok=True)
        spill, n, size = str(self.spill), len(self.order), self.chunk
        sizes: list = [None] * n
        progress = Progress(f"shards {self.dataset}", n, unit="img")
        builder = ray.remote(num_cpus=1)(_safe(build_chunk))
        writer = ray.remote(num_cpus=1)(_safe(write_one_shard))
        planner, names, known = Planner(self.params), [], 0
        pending: dict = {}  # ref -> "build" | "write"
        self.skipped = 0

        def built(first: int, got: list[int]) -> None:
            nonlocal known
            sizes[first:first + len(got)] = got
            progress.update(len(got))
            while known < n and sizes[known] is not None:
                known += 1
            for start, end in planner.advance(sizes, known):
                name = self.shard_name(len(names))
                names.append(name)
                if self._kept(name, start, end):
                    self.skipped += 1
                    continue
                pending[writer.remote(spill, self.order[start:end], start, end, name, str(self.out),
                                      str(self.rows_dir), str(chunks), size)] = "write"

        def drain(below: int) -> None:
            while len(pending) > below:
                done, _ = ray.wait(list(pending), num_returns=1)
                kind, result = pending.pop(done[0]), ray.get(done[0])
                if "error" in result:
                    for ref in pending:
                        ray.cancel(ref)
                    raise TaskError(result["error"])
                if kind == "build":
                    built(*result["ok"])

        start = time.perf_counter()
        for c in range(-(-n // size)):
            path, first = chunks / f"chunk-{c:06d}", c * size
            if path.with_suffix(".arrow").is_file() and path.with_suffix(".bin").is_file():
                built(first, [-1 if m["error"] else m["size"] for m in _chunk_meta(chunks, c)])
                continue
            pending[builder.remote(spill, self.order[first:first + size], first, str(path),
                                   str(self.root), asdict(self.params), self.dataset)] = "build"
            drain(IN_FLIGHT * self.cpus)
        if n == 0:
            built(0, [])
        drain(0)
        self.seconds["build_and_write"] = time.perf_counter() - start
        start = time.perf_counter()
        shards = [self._record(name) for name in names]
        tail = [index_row(self.row(self.order[p]), status="failed", error=m["error"])
                for c in range(planner.start // size, -(-n // size)) for m in _chunk_meta(chunks, c)
                if m["pos"] >= planner.start]
        manifest = self.finish(shards, tail, progress)
        shutil.rmtree(chunks, ignore_errors=True)
        self.seconds["finish"] = time.perf_counter() - start
        return manifest

    def _record(self, name: str) -> dict:
        rows = self.rows_dir / name.replace(".tar", ".parquet")
        return json.loads(pq.read_schema(rows).metadata[b"shard"]) | {"rows": pq.read_table(rows).to_pylist()}

    def _kept(self, name: str, start: int, end: int) -> bool:
        """Whether shard `name` is complete from an earlier run, for these positions."""
        tar, rows = self.out / name, self.rows_dir / name.replace(".tar", ".parquet")
        if not (rows.is_file() and tar.is_file() and tar.with_suffix(".idx").is_file()):
            return False
        record = json.loads(pq.read_schema(rows).metadata[b"shard"])
        return (record["start"], record["end"], record["bytes"]) == (start, end, tar.stat().st_size)


def write_shards_on_ray(dataset: str, params: PackParams, pdir: Path, out: Path, root, overwrite: bool,
                        num_cpus: int | None, chunk: int = CHUNK) -> dict:
    """RayWriter.run on RAY_ADDRESS's cluster or a local Ray of `num_cpus` CPUs."""
    import ray
    from preprocess.job import start_ray
    started, cpus = start_ray(num_cpus)
    try:
        return RayWriter(dataset, pdir, out, params, root, cpus=cpus, chunk=chunk).run(overwrite)
    finally:
        if started:
            ray.shutdown()

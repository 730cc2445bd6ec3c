"""`python -m shards.write --dataset X`: proposals parts -> WebDataset tar shards.

Writes WORK_DIR/<ds>/shards/<ds>-NNNNNN.tar + .idx (DALI index v1.2), index.parquet
and manifest.json. Samples are shuffled globally with a recorded seed (DALI only
shuffles inside a small buffer), then cut into shards bounded by a sample count and a
byte size. Everything is deterministic, so a rerun gives byte-identical files.

Resume: each finished shard leaves `_rows/<ds>-NNNNNN.parquet` (its index rows, the
range of the shuffled order it covers, its sha256) after its tar and .idx; a rerun
skips shards that have all three and restarts at the first one missing. manifest.json
is written last, so its presence means the whole set is complete."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.io import (DiskFullError, atomic_open, atomic_write_text, crc32, exclusive,
                       is_disk_full, remove_stale_temporaries, sha256_bytes, sha256_file)
from common.keys import check_key
from common.paths import proposals_dir, shards_dir
from common.progress import Progress
from preprocess.decode import STORED_JPEG_QUALITY, DecodeError, stored_jpeg_bytes
from schemas import SchemaError, table_params, validate
from schemas.index import INDEX, MANIFEST_VERSION, check_manifest
from schemas.proposals import PROPOSALS
from shards import format as fmt
from shards.tarfmt import check_shard_name, end_of_archive, pack_sample

ROWS_DIR = "_rows"
PLAN_FILE = "plan.json"
PACKAGES = ("numpy", "pyarrow", "pillow", "opencv-contrib-python-headless", "webdataset",
            "nvidia-dali-cuda120", "ray", "torch", "torchvision", "simplejpeg")
STAT_COLUMNS = ("resnet_distance_mean", "resnet_distance_std", "resnet_distance_pairs",
                "stats_meaningful")


def refresh_fix(dataset: str) -> str:
    """What to run when a source image changed after make proposals."""
    return (f"reprocess the changed images with make proposals DATASET={dataset} "
            f"PROPOSALS_ARGS=--refresh-changed, then repack with make shards DATASET={dataset} "
            "SHARDS_ARGS=--overwrite")


@dataclass(frozen=True)
class PackParams:
    """Every parameter that changes the bytes of the shards (recorded in the manifest)."""
    seed: int = 0
    max_samples: int = 2000          # per shard
    max_bytes: int = 1 << 30         # per shard (a single larger sample gets its own shard)
    jpeg_quality: int = STORED_JPEG_QUALITY  # only when the source must be re-encoded
    mtime: int = 0                   # of every tar member
    tar_format: str = "gnu"


class SampleError(ValueError):
    """One image cannot be packed; it becomes a failed index row, the rest go on."""


def sample_members(row: dict, root: Path, params: PackParams, dataset: str = "<ds>"
                   ) -> tuple[list, dict]:
    """The tar members of one proposals row (shards.format order and codecs), and the
    extra index fields they imply.

    Reads the source image once: its sha256 must match what preprocessing saw, and the
    stored JPEG must decode strictly (no libjpeg warning) to the size the boxes and
    label maps refer to; shards.format checks every member before it is packed."""
    key, w, h = row["key"], row["width"], row["height"]
    src = root / row["source_path"]
    try:
        data = src.read_bytes()
    except OSError as e:
        raise SampleError(f"source image {src} unreadable ({e.strerror or e}); restore it or "
                          "rerun make proposals") from e
    if row["sha256"] and sha256_bytes(data) != row["sha256"]:
        raise SampleError(f"source image {src} changed since make proposals (sha256 differs); "
                          f"{refresh_fix(dataset)}")
    try:
        jpeg = stored_jpeg_bytes(src, params.jpeg_quality, data=data)   # decoded once, strictly, below
    except DecodeError as e:
        raise SampleError(str(e)) from e
    boxes = np.asarray(row["boxes"] or [], dtype=np.float32).reshape(-1, 4)
    if len(boxes) != row["num_boxes"]:
        raise SampleError(f"{key}: {len(boxes)} boxes but num_boxes={row['num_boxes']}; "
                          "rerun make proposals")
    members = [("jpg", jpeg), ("boxes", fmt.encode_boxes(boxes))]
    for ext, col in (("fh.png", "fh_png"), ("mcg.png", "mcg_png"), ("gt.png", "gt_png")):
        if row[col] is None:
            if col == "gt_png":
                continue
            raise SampleError(f"{key}: no {col} in the proposals row; rerun make proposals")
        members.append((ext, row[col]))  # stored as produced, 8- or 16-bit (format.decode_label_png)
    if row["gt_json"] is not None:
        members.append(("gt.json", row["gt_json"].encode("utf-8")))
    meta = {"key": key, "width": w, "height": h, "source_path": row["source_path"],
            "sha256": row["sha256"], "num_boxes": len(boxes), "num_segments": row["num_segments"],
            "num_masks": row["num_masks"], "label": row["label"], "filter_rule": row["filter_rule"],
            "mask_scores": [float(s) for s in (row["mask_scores"] or [])]}
    members.append(("json", fmt.encode_meta(meta)))
    problems = fmt.sample_problems(key, dict(members), w, h, jpeg=True, pngs=True,
                                   num_masks=row["num_masks"] or 0)
    if problems:
        raise SampleError(f"{src}: {'; '.join(problems)}; rerun make proposals (or replace the "
                          "source image if it is damaged)")
    extra = {"jpeg_sha256": sha256_bytes(jpeg), "jpeg_reencoded": jpeg != data,
             "has_gt": row["gt_json"] is not None}
    return members, extra


def index_row(row: dict, **fields) -> dict:
    """An INDEX row from a proposals row plus packing fields."""
    out = {k: row.get(k) for k in ("key", "status", "error", "source_path", "sha256", "width",
                                    "height", "label", "num_boxes", "filter_rule",
                                    "num_segments", "num_masks", *STAT_COLUMNS)}
    out.update(fields)
    return out


def content_digest(table: pa.Table) -> str:
    """sha256 of every column that reaches the tars (not the audit statistics, which only
    go to index.parquet and are refreshed on every run, nor timings), chunking-independent."""
    h = hashlib.sha256()
    for name in table.column_names:
        if name in STAT_COLUMNS or name == "elapsed_ms":
            continue
        h.update(name.encode())
        for value in table.column(name).to_pylist():
            data = value if isinstance(value, bytes) else json.dumps(value).encode()
            h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def load_parts(pdir: Path, spill: Path) -> tuple[pa.Table, list[dict], dict]:
    """All parts, validated, as one table; plus their fingerprints and the job's params.

    Parts are copied one at a time into an uncompressed Arrow file at `spill` and read
    back memory-mapped: the shuffled order touches rows all over the dataset, and the
    label-map bytes of a large dataset would not fit in memory."""
    parts = sorted(pdir.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no proposals parts (part-*.parquet) in {pdir}; run "
                                "make proposals DATASET=<name> first")
    job_path = pdir / "_job.json"
    job = json.loads(job_path.read_text()) if job_path.is_file() else {}
    if job.get("complete") is False:
        raise SystemExit(f"{job_path} says the proposals job has not finished; rerun "
                         "make proposals (it resumes) before make shards")
    fingerprints, params, seen = [], {}, {}
    spill.parent.mkdir(parents=True, exist_ok=True)
    try:
        with pa.OSFile(str(spill), "wb") as sink, pa.ipc.new_file(sink, PROPOSALS.schema) as out:
            for p in parts:
                t = validate(pq.read_table(p), PROPOSALS, str(p))
                params = params or table_params(t.schema)
                for key in t.column("key").to_pylist():
                    check_key(key, str(p))
                    if key in seen:
                        raise SchemaError(f"duplicate sample key {key!r} in {pdir / seen[key]} "
                                          f"and {p}; rerun make proposals into an empty folder")
                    seen[key] = p.name
                out.write_table(t.replace_schema_metadata(None))
                fingerprints.append({"name": p.name, "rows": t.num_rows,
                                     "content_sha256": content_digest(t)})
    except BaseException as e:
        spill.unlink(missing_ok=True)
        if is_disk_full(e):
            raise DiskFullError(spill, "a temporary copy of the proposals parts") from None
        raise
    table = pa.ipc.open_file(pa.memory_map(str(spill))).read_all()
    return table, fingerprints, {"job": job, "part_params": params}


def dataset_root(job: dict, override, pdir: Path) -> Path:
    root = override or job.get("root") or job.get("dataset_root")
    if not root:
        raise FileNotFoundError(f"{pdir / '_job.json'} does not name the dataset root; pass "
                                "--root or rerun make proposals")
    return Path(root)


def package_versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def shuffled_order(keys: list[str], seed: int) -> list[int]:
    """Positions of `keys` in a global order fixed by the seed alone (not by part layout)."""
    by_key = sorted(range(len(keys)), key=keys.__getitem__)
    perm = np.random.default_rng(seed).permutation(len(by_key))
    return [by_key[i] for i in perm]


def write_index(rows: list[dict], path: Path, params: dict) -> None:
    rows = sorted(rows, key=lambda r: r["key"])
    table = INDEX.from_rows(rows, params=params)
    with atomic_open(path, "the shard index (index.parquet)") as f:
        pq.write_table(table, f, compression="zstd")


@dataclass
class Built:
    """One sample of the shuffled order, ready to pack (members) or failed (error)."""
    pos: int
    row: dict
    members: list | None = None
    extra: dict | None = None
    error: str | None = None


class Lookahead:
    """An iterator with one item of look-ahead (the sample that starts the next shard)."""

    def __init__(self, it):
        self.it, self.buf = it, None

    def peek(self):
        if self.buf is None:
            self.buf = next(self.it, None)
        return self.buf

    def pop(self):
        item, self.buf = self.peek(), None
        return item


class Writer:
    def __init__(self, dataset: str, pdir: Path, out: Path, params: PackParams, root=None,
                 workers: int | None = None):
        self.dataset, self.pdir, self.out, self.params = dataset, Path(pdir), Path(out), params
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.shard_name(0)  # refuse an unusable dataset name before any work
        self.rows_dir = self.out / ROWS_DIR
        self.spill = self.rows_dir / ".proposals.arrow.tmp"  # see load_parts
        remove_stale_temporaries(self.out)
        remove_stale_temporaries(self.rows_dir)
        self.table, self.inputs, self.preprocessing = load_parts(self.pdir, self.spill)
        self.root = dataset_root(self.preprocessing["job"], root, self.pdir)
        status = self.table.column("status").to_pylist()
        self.ok = [i for i, s in enumerate(status) if s == "ok"]
        keys = self.table.column("key").to_pylist()
        self.order = [self.ok[i] for i in shuffled_order([keys[i] for i in self.ok], params.seed)]
        self.failed = [i for i, s in enumerate(status) if s != "ok"]

    def row(self, i: int) -> dict:
        return self.table.slice(i, 1).to_pylist()[0]

    def shard_name(self, n: int) -> str:
        return check_shard_name(f"{self.dataset}-{n:06d}.tar", "--dataset (use letters, "
                                "digits, '_' and '-')")

    def plan(self) -> dict:
        return {"dataset": self.dataset, "packing": asdict(self.params), "inputs": self.inputs}

    def check_plan(self, overwrite: bool) -> None:
        """Refuse to mix shards of other inputs or parameters into this set."""
        plan_path = self.rows_dir / PLAN_FILE
        plan = json.dumps(self.plan(), sort_keys=True, indent=1)
        if plan_path.is_file() and plan_path.read_text() != plan and not overwrite:
            old = json.loads(plan_path.read_text())
            changed = [f"{k}: {v} -> {self.plan()['packing'].get(k)}"
                       for k, v in old.get("packing", {}).items()
                       if v != self.plan()["packing"].get(k)]
            if old.get("inputs") != self.inputs:
                changed.append(f"the proposals parts in {self.pdir} changed")
            raise SystemExit(f"{self.out} holds shards made differently ({'; '.join(changed)}); "
                             "rerun with --overwrite to replace them, or with the same "
                             "parameters to resume")
        if overwrite:
            for p in list(self.out.glob(f"{self.dataset}-*.tar")) + list(
                    self.out.glob(f"{self.dataset}-*.idx")):
                p.unlink()
            for name in ("index.parquet", "manifest.json"):
                (self.out / name).unlink(missing_ok=True)
            for p in [*self.rows_dir.glob("*.parquet"), self.rows_dir / PLAN_FILE]:
                p.unlink(missing_ok=True)
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        if not plan_path.is_file():
            atomic_write_text(plan_path, plan, "the packing plan")

    def finished_shards(self) -> list[dict]:
        """Records of the leading run of complete shards (tar, idx and rows all present)."""
        done = []
        while True:
            name = self.shard_name(len(done))
            tar, rows = self.out / name, self.rows_dir / name.replace(".tar", ".parquet")
            if not (rows.is_file() and tar.is_file() and tar.with_suffix(".idx").is_file()):
                return done
            record = json.loads(pq.read_schema(rows).metadata[b"shard"])
            if tar.stat().st_size != record["bytes"]:
                return done
            done.append(record | {"rows": pq.read_table(rows).to_pylist()})

    def run(self, overwrite: bool = False) -> dict:
        try:
            return self._run(overwrite)
        finally:
            self.table = None
            self.spill.unlink(missing_ok=True)

    def _run(self, overwrite: bool) -> dict:
        self.check_plan(overwrite)
        shards = self.finished_shards()
        self.skipped = len(shards)
        pos = shards[-1]["end"] if shards else 0
        progress = Progress(f"shards {self.dataset}", len(self.order), unit="img")
        progress.update(pos, force=bool(pos))
        with ThreadPoolExecutor(self.workers) as pool:
            stream = Lookahead(self.built_samples(pos, pool))
            while (record := self.write_shard(len(shards), stream, progress))["name"]:
                shards.append(record)
        return self.finish(shards, record["rows"], progress)

    def build(self, pos: int) -> Built:
        row = self.row(self.order[pos])
        try:
            return Built(pos, row, *sample_members(row, self.root, self.params, self.dataset))
        except SampleError as e:
            return Built(pos, row, error=f"packing: {e}")

    def built_samples(self, pos: int, pool: ThreadPoolExecutor):
        """Samples from order position `pos` on, built by the pool, yielded in order.

        Decoding and hashing release the GIL, so threads overlap them; the window
        bounds memory, and consuming in order keeps the output deterministic."""
        window: deque = deque()
        for p in range(pos, len(self.order)):
            window.append(pool.submit(self.build, p))
            if len(window) >= 4 * self.workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    def write_shard(self, number: int, stream: "Lookahead", progress: Progress) -> dict:
        """Write shard `number` from the stream, stopping before the first sample that would
        break a bound. Returns its record; name None (and only failure rows) when no
        packable sample was left."""
        failures: list[dict] = []
        start = stream.peek().pos if stream.peek() else len(self.order)
        while stream.peek() and stream.peek().error:  # leading failures belong to this shard
            item = stream.pop()
            failures.append(index_row(item.row, status="failed", error=item.error))
            progress.update()
        if not stream.peek():
            return {"name": None, "rows": failures}
        name = self.shard_name(number)
        rows, idx_lines, size = [], [], 0
        digest = hashlib.sha256()
        with atomic_open(self.out / name, "a shard tar") as f:
            while item := stream.peek():
                if item.error:
                    failures.append(index_row(item.row, status="failed", error=item.error))
                    stream.pop()
                    progress.update()
                    continue
                data, entries = pack_sample(item.row["key"], item.members, size, self.params.mtime)
                grown = size + len(data)
                if rows and (len(rows) >= self.params.max_samples
                             or grown + len(end_of_archive(grown)) > self.params.max_bytes):
                    break
                stream.pop()
                f.write(data)
                digest.update(data)
                rows.append(index_row(item.row, status="ok", error=None, shard=name,
                                      position=len(rows), tar_offset=size, tar_size=len(data),
                                      crc32=crc32(data), members=entries,
                                      member_crc32=[crc32(m) for _, m in item.members],
                                      **item.extra))
                idx_lines.append(fmt.index_line(item.row["key"], entries))
                size = grown
                progress.update()
            tail = end_of_archive(size)
            f.write(tail)
            digest.update(tail)
        end = stream.peek().pos if stream.peek() else len(self.order)
        atomic_write_text((self.out / name).with_suffix(".idx"), fmt.index_text(idx_lines),
                          "a DALI index (.idx)")
        record = {"name": name, "sha256": digest.hexdigest(), "bytes": size + len(tail),
                  "num_samples": len(rows), "start": start, "end": end}
        table = INDEX.from_rows(rows + failures)
        table = table.replace_schema_metadata(table.schema.metadata | {
            b"shard": json.dumps(record, sort_keys=True).encode()})
        with atomic_open(self.rows_dir / name.replace(".tar", ".parquet"), "a shard's index rows") as rf:
            pq.write_table(table, rf, compression="zstd")
        return record | {"rows": rows + failures}

    def refresh_statistics(self, rows: list[dict]) -> None:
        """Audit statistics from the parts as they are now: `make stats` may have filled
        them after the shards were packed, and they change no tar byte."""
        where = {k: i for i, k in enumerate(self.table.column("key").to_pylist())}
        stats = {c: self.table.column(c).to_pylist() for c in STAT_COLUMNS}
        for row in rows:
            i = where[row["key"]]
            row.update({c: stats[c][i] for c in STAT_COLUMNS})

    def finish(self, shards: list[dict], tail_failures: list[dict], progress: Progress) -> dict:
        for stale in sorted(self.out.glob(f"{self.dataset}-*.tar")):
            number = stale.stem.rsplit("-", 1)[-1]
            if number.isdigit() and int(number) >= len(shards):
                for p in (stale, stale.with_suffix(".idx"),
                          self.rows_dir / stale.with_suffix(".parquet").name):
                    p.unlink(missing_ok=True)
        rows = [r for s in shards for r in s["rows"]] + tail_failures
        rows += [index_row(self.row(i)) for i in self.failed]
        self.refresh_statistics(rows)
        params = {"dataset": self.dataset, "packing": asdict(self.params)}
        write_index(rows, self.out / "index.parquet", params)
        packed = sum(s["num_samples"] for s in shards)
        manifest = {
            "schema_version": MANIFEST_VERSION,
            "dataset": self.dataset,
            "num_samples": packed,
            "num_failed": len(rows) - packed,
            "num_images": len(rows),
            "shards": [{k: s[k] for k in ("name", "sha256", "bytes", "num_samples")} for s in shards],
            "index": {"file": "index.parquet", "schema_version": INDEX.version,
                      "sha256": sha256_file(self.out / "index.parquet")},
            "packing": asdict(self.params) | {"member_order": list(fmt.MEMBER_ORDER),
                                              "shuffle": "numpy default_rng(seed).permutation "
                                                         "of the key-sorted ok samples"},
            "preprocessing": self.preprocessing,
            "inputs": {"proposals_dir": str(self.pdir), "dataset_root": str(self.root),
                       "parts": self.inputs},
            "packages": package_versions(),
        }
        check_manifest(manifest, "manifest being written")
        atomic_write_text(self.out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True),
                          "manifest.json")
        failed_pack = sum(1 for r in rows if (r["error"] or "").startswith("packing:"))
        print(f"[shards {self.dataset}] done: {packed} samples in {len(shards)} shards "
              f"({sum(s['bytes'] for s in shards) / 1e6:.1f} MB) at {self.out}; "
              f"{len(rows) - packed} not packed ({failed_pack} failed packing, "
              f"{len(rows) - packed - failed_pack} failed preprocessing: see index.parquet "
              f"column 'error'); {self.skipped} shards were complete already and kept; "
              f"{progress.elapsed:.1f}s", file=sys.stderr, flush=True)
        return manifest


def write_shards(dataset: str, params: PackParams = PackParams(), *, proposals=None, out=None,
                 root=None, overwrite: bool = False, workers: int | None = None,
                 ray: bool = False, num_cpus: int | None = None) -> dict:
    """Pack WORK_DIR/<dataset>/proposals into WORK_DIR/<dataset>/shards; returns the manifest.
    `ray`: shards written in parallel by Ray tasks (shards.parallel; RAY_ADDRESS's cluster
    or a local Ray of `num_cpus`), the same bytes as in this process with `workers` threads."""
    pdir = Path(proposals) if proposals else proposals_dir(dataset)
    out = Path(out) if out else shards_dir(dataset)
    if not any(pdir.glob("part-*.parquet")):  # before creating anything under `out`
        raise FileNotFoundError(f"no proposals parts (part-*.parquet) in {pdir}; run "
                                f"make proposals DATASET={dataset} first")
    with exclusive(out / ROWS_DIR / ".lock", f"another make shards is writing {out}; wait for "
                   "it to finish"):
        if ray:
            from shards.parallel import write_shards_on_ray
            return write_shards_on_ray(dataset, params, pdir, out, root, overwrite, num_cpus)
        return Writer(dataset, pdir, out, params, root, workers).run(overwrite)


def byte_size(text: str) -> int:
    """'1000000', '512M', '1.5G' (powers of 1024) -> bytes, for --max-bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if text[-1:] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500000000, 512M, 2G)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, help="dataset name under WORK_DIR")
    ap.add_argument("--proposals", help="parts folder (default WORK_DIR/<ds>/proposals)")
    ap.add_argument("--out", help="shards folder (default WORK_DIR/<ds>/shards)")
    ap.add_argument("--root", help="dataset root (default: the one in _job.json)")
    d = PackParams()
    ap.add_argument("--seed", type=int, default=d.seed, help="global shuffle seed")
    ap.add_argument("--max-samples", type=int, default=d.max_samples, help="samples per shard")
    ap.add_argument("--max-bytes", type=byte_size, default=d.max_bytes,
                    help="bytes per shard, e.g. 512M or 2G (default 1G)")
    ap.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality,
                    help="quality of re-encoded images (plain JPEG sources are kept as is)")
    ap.add_argument("--workers", type=int, default=None,
                    help="--local: threads reading and checking images (default: cores, at most 8)")
    ap.add_argument("--local", action="store_true",
                    help="pack in this process (threads) instead of Ray tasks; the same bytes")
    ap.add_argument("--num-cpus", type=int, default=None,
                    help="local Ray CPUs (default: all; RAY_ADDRESS set: the cluster's)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace shards written with other inputs or parameters")
    a = ap.parse_args(argv)
    if a.max_samples < 1 or a.max_bytes < 1 or not 1 <= a.jpeg_quality <= 100:
        ap.error("--max-samples and --max-bytes must be >= 1, --jpeg-quality in 1..100")
    params = PackParams(seed=a.seed, max_samples=a.max_samples, max_bytes=a.max_bytes,
                        jpeg_quality=a.jpeg_quality)
    try:
        write_shards(a.dataset, params, proposals=a.proposals, out=a.out, root=a.root,
                     overwrite=a.overwrite, workers=a.workers, ray=not a.local, num_cpus=a.num_cpus)
    except (OSError, ValueError) as e:  # disk full, missing parts, bad rows: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # through the module, so Ray workers import what it ships
    from shards.write import main as module_main
    sys.exit(module_main())

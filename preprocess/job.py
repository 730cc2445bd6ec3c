"""The preprocessing Ray job: images -> proposals, FH segments, MCG-style masks -> Parquet parts.

    python -m preprocess.job --dataset sample|coco|imagenet|folder|filelist [--root DIR] [--split S]

Shape: listing (preprocess.listing: Ray tasks list the dataset's sources and merge them
into key-sorted part listings on disk) -> `ray.data.range(parts)` -> the image items of
each unfinished part, read from its listing by a worker -> `map_batches(process_batch)`
on a task pool (one CPU per task, so nothing starves) -> the stages handed to
`run(config, stages)` (preprocess.stages.Stage; the command line passes the audit's
distance stage when --stats asks for it) -> `write_rows`: the workers write each part
atomically (rows of a part that arrive in several batches meet as fragments until the
last one writes the part). The driver holds summaries only, never the image list or a
row: its memory does not grow with the dataset. Parts are fixed chunks of the key-sorted
image list, so a part's content does not depend on how Ray batched or ordered the work,
and a rerun skips parts whose file exists. Local Ray by default (all the machine's
cores); RAY_ADDRESS (or `ray job submit`) runs the same code on a cluster, where the
images and WORK_DIR must be on storage every node sees at the same path.

Every input image yields exactly one row: failures are rows with status 'failed' and the
reason, including images whose worker died (status 'failed', error 'lost: ...').
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.io import (atomic_open, atomic_write_text, exclusive, remove_stale_temporaries,
                       sha256_bytes, sha256_file)
from common.paths import proposals_dir, work_dir
from common.progress import Progress, format_duration
from preprocess import listing
from preprocess.datasets import (FILE_LIST_COLUMN, KINDS, DatasetError, ImageRecord, dataset_root,
                                 dataset_sources, gt_in_stored_frame)
from preprocess.decode import DecodeError, decode, max_pixels
from preprocess.mcg import MaskParams, encode_bitfield_png, mcg_masks
from preprocess.proposals import ProposalParams, propose
from preprocess.segments import SegmentParams, encode_label_png, fh_segments
from preprocess.stages import Stage
from schemas.proposals import PROPOSALS

PART_NAME = "part-{:05d}.parquet"
JOB_FILE = "_job.json"
PATH_COLUMN = "_path"  # absolute source path, carried through the stages, dropped before writing
PART_COLUMN = "_part"  # the part a row belongs to, carried like PATH_COLUMN
LISTING_DIR = "_listing"  # the job's key-sorted image list (preprocess.listing); removed at the end
STAGING = "_staging"  # fragments of parts whose rows arrived in several batches
ITEM_SCHEMA = pa.schema([("key", pa.string()), ("path", pa.string()), ("relpath", pa.string()),
                         ("label", pa.int64()), ("gt", pa.string()), ("gt_size", pa.list_(pa.int64())),
                         ("part", pa.int64()), ("error", pa.string())])
SUMMARY_SCHEMA = pa.schema([("part", pa.int64()), ("rows", pa.int64()), ("failed", pa.int64()),
                            ("written", pa.bool_()), ("error", pa.string())])
MAX_BLOCKS = 4096  # Ray blocks of the job's first step; beyond, a block holds several batches
DRY_RUN_ERROR = "dry run (--dry-run): listed, not read"


class JobError(RuntimeError):
    """A job-level problem (bad arguments, output made with other parameters)."""


@dataclass
class JobConfig:
    dataset: str                      # sample | coco | imagenet | folder | filelist
    root: str | None                  # dataset root (filelist: default the list's folder)
    split: str | None = None
    name: str | None = None           # output folder name under WORK_DIR (default: dataset)
    work_dir: str | None = None
    part_size: int = 64               # images per Parquet part (fixes resume granularity)
    batch_size: int | None = None     # images per Ray task; None = sized to keep cores busy
    num_cpus: int | None = None       # local Ray CPUs; None = all of this machine's
    limit: int | None = None          # only the first N images (by key), for trials
    max_pixels: int = field(default_factory=max_pixels)
    proposals: ProposalParams = field(default_factory=ProposalParams)
    segments: SegmentParams = field(default_factory=SegmentParams)
    masks: MaskParams = field(default_factory=MaskParams)
    refresh_changed: bool = False     # redo the parts holding images whose bytes changed (sha256)
    file_list: str | None = None      # filelist: a text file (a path a line) or a Parquet file
    file_list_column: str = FILE_LIST_COLUMN  # filelist: the Parquet column of paths
    dry_run: bool = False             # list and write parts of failed rows, reading no image

    @property
    def out_name(self) -> str:
        return self.name or self.dataset

    def out_dir(self) -> Path:
        return proposals_dir(self.out_name, self.work_dir)

    def params(self) -> dict:
        """Everything that changes the rows; recorded in every part and in _job.json."""
        params = {"dataset": self.dataset, "split": self.split, "part_size": self.part_size,
                  "max_pixels": self.max_pixels, "proposals": self.proposals.as_dict(),
                  "segments": self.segments.as_dict(), "masks": self.masks.as_dict(),
                  "schema_version": PROPOSALS.version}
        return params | ({"dry_run": True} if self.dry_run else {})


# ---------------------------------------------------------------- per image (runs in workers)
def _item(record: ImageRecord, part: int) -> dict:
    return {"key": record.key, "path": record.path, "relpath": record.relpath, "label": record.label,
            "gt": None if record.gt is None else json.dumps(record.gt),
            "gt_size": None if record.gt_size is None else list(record.gt_size), "part": part,
            "error": record.error}


def process_image(item: dict, params: dict) -> dict:
    """One PROPOSALS row for one image; never raises (failures become status 'failed')."""
    start = time.perf_counter()
    row = {"key": item["key"], "source_path": item["relpath"], "status": "failed",
           "label": item.get("label")}
    try:
        if item.get("error"):  # the dataset listing refused this entry (preprocess.datasets)
            raise DecodeError(item["error"])
        if params.get("dry_run"):  # the bench of the job's own overhead (bench.preprocess)
            raise DecodeError(DRY_RUN_ERROR)
        try:
            data = Path(item["path"]).read_bytes()
        except OSError as e:
            raise DecodeError(f"{item['path']}: cannot read the file ({e.strerror or e}); check "
                              "that it exists and is readable") from e
        row["sha256"] = sha256_bytes(data)
        decoded = decode(item["path"], data, params["max_pixels"])
        rgb = decoded.rgb
        boxes, rule, _ = propose(rgb, ProposalParams(**params["proposals"]))
        labels = fh_segments(rgb, SegmentParams(**params["segments"]))
        masks, scores = mcg_masks(rgb, MaskParams.from_dict(params["masks"]))
        row.update(width=rgb.shape[1], height=rgb.shape[0], boxes=boxes.tolist(), num_boxes=len(boxes),
                   filter_rule=rule, fh_png=encode_label_png(labels), num_segments=int(labels.max()) + 1,
                   mcg_png=encode_bitfield_png(masks), num_masks=len(masks), mask_scores=scores.tolist())
        if item.get("gt") is not None:
            anns, label_map = gt_in_stored_frame(json.loads(item["gt"]), item.get("gt_size"),
                                                 decoded.raw_size, decoded.orientation)
            row["gt_json"] = json.dumps({"width": rgb.shape[1], "height": rgb.shape[0], "annotations": anns},
                                        sort_keys=True)
            row["gt_png"] = None if label_map is None else encode_label_png(label_map, bits=16)
        row["status"] = "ok"
    except (DecodeError, DatasetError) as e:  # the file or its annotations: the user's to fix
        row["error"] = str(e)
    except Exception as e:  # any other per-image failure is recorded, never fatal to the job
        row["error"] = (f"{type(e).__name__}: {e} (while processing {item['path']}); "
                        "this is likely a bug: please report it with this file")
    if row["status"] != "ok":  # a failed row carries no partial results
        row = {k: row.get(k) for k in ("key", "source_path", "sha256", "status", "error", "label")}
    row["elapsed_ms"] = (time.perf_counter() - start) * 1000.0
    return row


def process_batch(batch: pa.Table, params: dict) -> pa.Table:
    """Ray map_batches function: a batch of image items -> PROPOSALS rows (+ the _path column)."""
    import cv2
    cv2.setNumThreads(1)  # Ray gives each task one CPU; OpenCV threads would oversubscribe
    items = batch.to_pylist()
    table = PROPOSALS.from_rows([process_image(item, params) for item in items])
    table = table.append_column(PATH_COLUMN, pa.array([i["path"] for i in items], pa.string()))
    return table.append_column(PART_COLUMN, pa.array([i["part"] for i in items], pa.int64()))


def _item_table(items: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(items, schema=ITEM_SCHEMA)


@functools.lru_cache(maxsize=4)
def _listed(listing_dir: str, list_sha256: str, part: int) -> list[ImageRecord]:
    """A part's records, cached in the worker (a part feeds several batches); the list's
    hash in the key, so a later job on the same folder never sees an old listing."""
    return listing.read_part(listing_dir, part)


def expand_batches(batch: pa.Table, listing_dir: str, list_sha256: str, out_dir: str,
                   part_size: int, batch_size: int) -> pa.Table:
    """Ray map_batches function: batch numbers -> the image items of those batches, read
    from the listing; batch b is images [j*batch_size, (j+1)*batch_size) of part
    b // per_part (j = b % per_part). Parts already on disk give nothing (one stat)."""
    per_part, items = -(-part_size // batch_size), []
    for b in batch.column("id").to_pylist():
        part, j = divmod(b, per_part)
        if (Path(out_dir) / PART_NAME.format(part)).is_file():
            continue
        records = _listed(listing_dir, list_sha256, part)
        items += [_item(r, part) for r in records[j * batch_size:(j + 1) * batch_size]]
    return _item_table(items)


def build_pipeline(n_images: int, todo_images: int, list_sha256: str, config: JobConfig, num_cpus: int,
                   listing_dir: Path, out: Path, write_params: dict, stages: Sequence[Stage] = ()):
    """range(batches) -> the items of each batch of unfinished parts -> per-image rows ->
    stages -> parts written by the workers; yields one small summary row per part (or
    fragment) written. One batch a Ray block (up to MAX_BLOCKS blocks, so the driver's
    share stays bounded): a task that dies loses one batch, whose images become lost rows."""
    import ray.data
    batch_size = config.batch_size or max(1, min(16, math.ceil(todo_images / (4 * num_cpus))))
    n_batches = math.ceil(n_images / config.part_size) * -(-config.part_size // batch_size)
    pool = ray.data.TaskPoolStrategy(size=num_cpus)
    ds = ray.data.range(n_batches, override_num_blocks=min(n_batches, MAX_BLOCKS))
    ds = ds.map_batches(expand_batches, fn_kwargs={
        "listing_dir": str(listing_dir), "list_sha256": list_sha256, "out_dir": str(out),
        "part_size": config.part_size, "batch_size": batch_size},
        batch_size=None, batch_format="pyarrow", num_cpus=1, compute=pool)
    ds = ds.map_batches(process_batch, fn_kwargs={"params": config.params()}, batch_size=batch_size,
                        batch_format="pyarrow", num_cpus=1, compute=pool)
    for stage in stages:  # in order, on PROPOSALS rows plus PATH_COLUMN (preprocess.stages)
        ds = stage(ds, config, num_cpus)
    return ds.map_batches(write_rows, fn_kwargs={"listing_dir": str(listing_dir), "out_dir": str(out),
                                                 "params": write_params},
                          batch_size=None, batch_format="pyarrow", num_cpus=1, compute=pool)


# ---------------------------------------------------------------- writing parts (in workers)
def write_part(path: Path, rows: list[dict], params: dict) -> None:
    rows = sorted(rows, key=lambda r: r["key"])
    table = PROPOSALS.from_rows([{k: v for k, v in r.items() if k not in (PATH_COLUMN, PART_COLUMN)}
                                 for r in rows], params)
    with atomic_open(path, "a proposals part") as f:
        pq.write_table(table, f, compression="zstd")


def _fragments(out: Path, part: int) -> Path:
    return out / STAGING / PART_NAME.format(part).replace(".parquet", "")


def _fragment_rows(folder: Path) -> dict[str, dict]:
    """The rows of a part's fragments. A fragment gone meanwhile means another worker, which
    saw the part complete at the same moment, wrote the part and removed them."""
    rows: dict[str, dict] = {}
    for f in sorted(folder.glob("*.arrow")) if folder.is_dir() else []:
        try:
            with pa.memory_map(str(f)) as source:
                table = pa.ipc.open_file(source).read_all()
        except FileNotFoundError:
            continue
        for row in table.to_pylist():
            rows.setdefault(row["key"], row)
    return rows


def write_rows(batch: pa.Table, listing_dir: str, out_dir: str, params: dict) -> pa.Table:
    """Ray map_batches function, the job's last step: the rows of a part that arrive
    together are written as that part; rows of a part split across batches are kept as
    fragments (atomic, named by their first key, so a retried task rewrites the same
    file) until the fragment that completes the part writes it. Returns one summary row
    per part touched: rows written, failures, or the error (a full disk) for the driver."""
    out, summary = Path(out_dir), []
    parts = batch.column(PART_COLUMN).to_pylist()
    for part in sorted(set(parts)):
        rows = batch.filter(pc.equal(batch.column(PART_COLUMN), part)).to_pylist()
        entry = {"part": part, "rows": len(rows), "failed": sum(r["status"] != "ok" for r in rows),
                 "written": False, "error": None}
        try:
            expected = listing.part_keys(listing_dir, part)
            path = out / PART_NAME.format(part)
            folder = _fragments(out, part)
            if path.is_file():  # a retried task's rows of a part already written
                pass
            elif len(rows) == len(expected) and not folder.is_dir():
                write_part(path, rows, params)
                entry["written"] = True
            else:
                folder.mkdir(parents=True, exist_ok=True)
                first = min(r["key"] for r in rows)
                table = PROPOSALS.from_rows([{k: v for k, v in r.items() if k not in (PATH_COLUMN, PART_COLUMN)}
                                             for r in rows])
                with atomic_open(folder / f"{first}-{len(rows)}.arrow", "a proposals part fragment") as f, \
                        pa.ipc.new_file(f, table.schema) as w:
                    w.write_table(table)
                have = _fragment_rows(folder)  # listed after our own write: the last writer sees all
                if set(have) >= set(expected) and not path.is_file():
                    write_part(path, [have[k] for k in expected], params)
                    shutil.rmtree(folder, ignore_errors=True)
                    entry["written"] = True
        except OSError as e:  # a full disk: one message, raised by the driver
            entry["error"] = str(e)
        summary.append(entry)
    return pa.Table.from_pylist(summary, schema=SUMMARY_SCHEMA)


# ---------------------------------------------------------------- driver
def _lost_row(item: dict) -> dict:
    return {"key": item["key"], "source_path": item["relpath"], "status": "failed", "label": item["label"],
            "error": f"lost: no result came back for {item['path']} (its Ray worker died, e.g. out of "
                     "memory or a crash in a native library); rerun after fixing, or remove the file"}


def _check_previous(out: Path, job: dict) -> None:
    previous_file = out / JOB_FILE
    if not previous_file.is_file():
        return
    previous = json.loads(previous_file.read_text())
    for what in ("params", "image_list_sha256"):
        if previous.get(what) != json.loads(json.dumps(job[what])):  # compare as stored (tuples -> lists)
            raise JobError(f"{out} holds parts made with different {what.replace('_', ' ')}; a "
                           "resume would mix them. Delete that folder, or use another WORK_DIR/--name")


def read_parts(out_dir, columns: list[str] | None = None) -> pa.Table:
    """All parts of a proposals folder as one table, in key order."""
    files = sorted(Path(out_dir).glob("part-*.parquet"))
    if not files:
        raise JobError(f"{out_dir}: no proposal parts; run `make proposals` first")
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def start_ray(num_cpus: int | None) -> tuple[bool, int]:
    """Connect to RAY_ADDRESS or start a local Ray; returns (started here, CPUs to use)."""
    import ray
    if ray.is_initialized():
        return False, int(ray.cluster_resources().get("CPU", 1))
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return True, int(ray.cluster_resources().get("CPU", 1))
    cpus = num_cpus or os.cpu_count() or 1
    repo = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}})
    return True, cpus


def changed_images(out: Path, listing_dir: Path, n_parts: int) -> dict[int, list[str]]:
    """{part: keys} of the images whose file bytes no longer have the sha256 their row
    recorded (changed, replaced, or readable now and not before); reads every image."""
    changed: dict[int, list[str]] = {}
    for p in range(n_parts):
        path = out / PART_NAME.format(p)
        if not path.is_file():
            continue
        mine = {r.key: r for r in listing.read_part(listing_dir, p)}
        table = pq.read_table(path, columns=["key", "sha256"])
        for key, recorded in zip(table.column("key").to_pylist(), table.column("sha256").to_pylist()):
            try:
                now = sha256_file(mine[key].path) if key in mine else recorded
            except OSError:
                now = None
            if now != recorded:
                changed.setdefault(p, []).append(key)
    return changed


def run(config: JobConfig, stages: Sequence[Stage] = ()) -> dict:
    """Run (or resume) the job with `stages` after the per-image step; returns the summary
    that is also written to _job.json.
    One job per output folder at a time (a lock in it); a second one stops at once."""
    sources = dataset_sources(config.dataset, config.root, config.split, config.file_list,
                              config.file_list_column)  # the layout checked before anything runs
    out = config.out_dir()
    with exclusive(out / ".lock", f"another make proposals is writing {out}; wait for it to "
                   "finish (or stop it), then rerun: finished parts are kept"):
        started, cpus = start_ray(config.num_cpus)
        try:
            return _run_locked(config, sources, out, stages, cpus)
        finally:
            if started:
                import ray
                ray.shutdown()


def _max_rss_mb() -> float:
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _run_locked(config: JobConfig, sources, out: Path, stages: Sequence[Stage], cpus: int) -> dict:
    removed = remove_stale_temporaries(out)
    if removed:
        print(f"[proposals] removed {removed} unfinished temporary file(s) of a killed run", flush=True)
    shutil.rmtree(out / STAGING, ignore_errors=True)  # fragments of a killed run: redone
    listing_dir = out / LISTING_DIR
    summary = listing.build(sources, listing_dir, config.part_size, config.limit)
    counts, n_images, n_parts = summary["counts"], summary["num_images"], summary["num_parts"]
    if counts:
        print(f"[proposals] listing {config.dataset}: " + "; ".join(
            f"{n} {what}" for what, n in sorted(counts.items())), flush=True)
    if not n_images:
        raise JobError(f"no images found for dataset {config.dataset!r} under {config.root}; "
                       "check the root folder and the split")
    params = config.params()
    job = {"params": params, "root": str(dataset_root(config.dataset, config.root, config.file_list)),
           "image_list_sha256": summary["image_list_sha256"],
           "num_images": n_images, "num_parts": n_parts, "complete": False}
    _check_previous(out, job)
    atomic_write_text(out / JOB_FILE, json.dumps(job, indent=2, sort_keys=True), "the job summary (_job.json)")

    refreshed = changed_images(out, listing_dir, n_parts) if config.refresh_changed else {}
    for part, keys in sorted(refreshed.items()):
        print(f"[proposals] part {part}: {len(keys)} image(s) changed since they were processed "
              f"({', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}); redoing the part", flush=True)
        (out / PART_NAME.format(part)).unlink()

    def part_rows(p: int) -> int:
        return min(config.part_size, n_images - p * config.part_size)

    todo_parts = todo_images = 0
    for p in range(n_parts):  # counted, never listed: a part number costs the driver nothing
        if not (out / PART_NAME.format(p)).is_file():
            todo_parts, todo_images = todo_parts + 1, todo_images + part_rows(p)
    print(f"[proposals] {n_images} images in {n_parts} parts -> {out}; "
          f"{n_parts - todo_parts} parts already done, {todo_parts} to do"
          f"{'' if todo_parts or config.refresh_changed else ' (source images changed since? PROPOSALS_ARGS=--refresh-changed re-checks them)'}",
          flush=True)
    start = time.perf_counter()
    if todo_parts:
        for stage in stages:
            print(f"[proposals] stage {stage.name}: {stage.describe or 'on'}", flush=True)
        # Stage params go into the parts only (not _job.json): `make stats` may refresh them.
        stage_params = {s.name: s.params for s in stages if s.params is not None}
        _run_parts(config, n_images, todo_images, summary["image_list_sha256"], listing_dir, out,
                   {**params, **stage_params}, stages, cpus)
    elapsed = time.perf_counter() - start

    by_status, by_rule, n_rows = Counter(), Counter(), 0
    for f in sorted(out.glob("part-*.parquet")):  # one part at a time
        table = pq.read_table(f, columns=["status", "filter_rule"])
        n_rows += table.num_rows
        by_status.update(table.column("status").to_pylist())
        by_rule.update(r for r in table.column("filter_rule").to_pylist() if r is not None)
    shutil.rmtree(listing_dir, ignore_errors=True)
    job.update(complete=True, counts={"status": dict(sorted(by_status.items())),
                                      "filter_rule": dict(sorted(by_rule.items()))},
               listing=dict(sorted(counts.items())),
               refreshed={"parts": len(refreshed), "images": sum(map(len, refreshed.values()))},
               processed_this_run=todo_images, elapsed_s=round(elapsed, 3),
               images_per_s=round(todo_images / elapsed, 3) if todo_images and elapsed > 0 else None,
               driver_max_rss_mb=_max_rss_mb())
    atomic_write_text(out / JOB_FILE, json.dumps(job, indent=2, sort_keys=True), "the job summary (_job.json)")
    rate = f"{todo_images / elapsed:.2f} img/s" if todo_images and elapsed > 0 else "nothing to do"
    print(f"[proposals] done: {n_rows} rows in {n_parts} parts; status {dict(by_status)}; "
          f"filter rule {dict(by_rule)}; this run {todo_images} images in {format_duration(elapsed)} "
          f"({rate})", flush=True)
    return job


def _run_parts(config: JobConfig, n_images: int, todo_images: int, list_sha256: str, listing_dir: Path,
               out: Path, params: dict, stages: Sequence[Stage], cpus: int) -> None:
    n_parts = math.ceil(n_images / config.part_size)
    from ray.data import DataContext
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # our own Progress line instead
    # A task that still fails after Ray's retries (its worker crashed, e.g. in native code
    # on a malformed image) must not sink the job: its images become 'lost' rows below.
    ctx.max_errored_blocks = -1
    progress = Progress("proposals", todo_images)
    failed = 0
    for batch in build_pipeline(n_images, todo_images, list_sha256, config, cpus, listing_dir, out, params, stages).iter_batches(
            batch_size=None, batch_format="pyarrow"):
        for entry in batch.to_pylist():
            if entry["error"]:
                raise JobError(entry["error"])
            failed += entry["failed"]
            progress.update(entry["rows"])
    for part in range(n_parts):  # rows that never came back: record, never drop
        path = out / PART_NAME.format(part)
        if path.is_file():
            continue
        rows = _fragment_rows(_fragments(out, part))
        lost = [_lost_row(_item(r, part)) for r in listing.read_part(listing_dir, part) if r.key not in rows]
        print(f"[proposals] part {part}: {len(lost)} image(s) lost by Ray workers, recorded as failed",
              file=sys.stderr, flush=True)
        failed += len(lost)
        write_part(path, list(rows.values()) + lost, params)
    shutil.rmtree(out / STAGING, ignore_errors=True)
    if failed:
        print(f"[proposals] {failed} image(s) failed this run; their rows say why (status, error)",
              file=sys.stderr, flush=True)


# ---------------------------------------------------------------- command line
def _default_root(dataset: str, args) -> str | None:
    if args.root:
        return args.root
    if dataset == "filelist":
        return None  # the list's folder (preprocess.datasets.dataset_root)
    if dataset == "sample":
        root = work_dir(args.work_dir) / "sample" / "raw"
        if not (root / "annotations" / "instances_sample.json").is_file():
            from preprocess.sample import generate
            print(f"[proposals] generating the built-in sample into {root}", flush=True)
            generate(root)
        return str(root)
    env = "COCO_ROOT" if dataset == "coco" else "DATA_ROOT"
    value = os.environ.get(env)
    if not value:
        raise JobError(f"dataset {dataset!r} needs its root: pass --root DIR or set {env}=DIR")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=list(KINDS))
    p.add_argument("--file-list", default=os.environ.get("FILE_LIST") or None,
                   help="filelist: a text file (one path a line) or a Parquet file of paths")
    p.add_argument("--file-list-column", default=FILE_LIST_COLUMN,
                   help="filelist: the Parquet column holding the paths")
    p.add_argument("--dry-run", action="store_true",
                   help="list and write parts of failed rows without reading any image "
                        "(measures the job's own cost: bench.preprocess)")
    p.add_argument("--root", help="dataset root (default: COCO_ROOT / DATA_ROOT; sample: WORK_DIR/sample/raw)")
    p.add_argument("--split", default=os.environ.get("SPLIT") or None, help="coco: train2017 (default), ...")
    p.add_argument("--name", help="output name under WORK_DIR (default: the dataset kind)")
    p.add_argument("--work-dir", help="default: WORK_DIR or ./work")
    p.add_argument("--part-size", type=int, default=64, help="images per Parquet part (the resume unit)")
    p.add_argument("--batch-size", type=int, help="images per Ray task (default: sized to the job)")
    p.add_argument("--num-cpus", type=int, help="local Ray CPUs (default: all)")
    p.add_argument("--limit", type=int, help="only the first N images by key")
    p.add_argument("--mode", default="fast", choices=["fast", "quality", "single"], help="selective search")
    p.add_argument("--max-side", type=int, default=ProposalParams.max_side,
                   help="selective search on a copy with this longer side (0 = full resolution)")
    p.add_argument("--max-boxes", type=int, default=ProposalParams.max_boxes, help="cap on kept proposals")
    p.add_argument("--stats", default="auto", choices=["auto", "on", "off"],
                   help="distance statistic in the job (auto: on when ResNet-50 weights are found)")
    p.add_argument("--weights", default=os.environ.get("WEIGHTS") or None, help="ResNet-50 weights file")
    p.add_argument("--backbone", default=os.environ.get("BACKBONE") or None,
                   help="network of the statistic (see preprocess.audit.backbones)")
    p.add_argument("--refresh-changed", action="store_true",
                   help="hash every source image and redo the parts holding ones that changed "
                        "since they were processed (what make shards asks for when a source changed)")
    a = p.parse_args(argv)
    try:
        config = JobConfig(dataset=a.dataset, root=_default_root(a.dataset, a), split=a.split, name=a.name,
                           work_dir=a.work_dir, part_size=a.part_size, batch_size=a.batch_size,
                           num_cpus=a.num_cpus, limit=a.limit, refresh_changed=a.refresh_changed,
                           file_list=a.file_list, file_list_column=a.file_list_column, dry_run=a.dry_run,
                           proposals=ProposalParams(mode=a.mode, max_side=a.max_side, max_boxes=a.max_boxes))
        from preprocess.audit.stage import job_stage  # the command line chooses the stages
        stage = job_stage(a.stats, a.weights, a.backbone)
        if stage is None:
            print("[proposals] distance statistic: off (no weights or --stats off; `make stats` adds it later)",
                  flush=True)
        run(config, [] if stage is None else [stage])
    except (JobError, ValueError, OSError) as e:  # disk full, unreadable root...: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # through the module, so Ray workers import the functions it ships
    from preprocess.job import main as module_main
    sys.exit(module_main())

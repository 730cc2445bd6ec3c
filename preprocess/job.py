"""The preprocessing Ray job: images -> proposals, FH segments, MCG-style masks -> Parquet parts.

    python -m preprocess.job --dataset sample|coco|imagenet|folder [--root DIR] [--split S]

Shape (ray.data end to end): read (`from_items` over the image records of unfinished parts)
-> `map_batches(process_batch)` on a task pool (one CPU per task, so nothing starves)
-> the stages handed to `run(config, stages)` (preprocess.stages.Stage; the command line
passes the audit's distance stage when --stats asks for it)
-> write: the driver streams the result blocks and writes each part atomically once every
row of that part has arrived. Parts are fixed chunks of the key-sorted image list, so a
part's content does not depend on how Ray batched or ordered the work, and a rerun skips
parts whose file exists. Local Ray by default (all the machine's cores); RAY_ADDRESS (or
`ray job submit`) runs the same code on a cluster.

Every input image yields exactly one row: failures are rows with status 'failed' and the
reason, including images whose worker died (status 'failed', error 'lost: ...').
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from common.io import (atomic_open, atomic_write_text, exclusive, remove_stale_temporaries,
                       sha256_bytes, sha256_file)
from common.paths import proposals_dir, work_dir
from common.progress import Progress, format_duration
from preprocess.datasets import DatasetError, ImageRecord, gt_in_stored_frame, list_images_counted
from preprocess.decode import DecodeError, decode, max_pixels
from preprocess.mcg import MaskParams, encode_bitfield_png, mcg_masks
from preprocess.proposals import ProposalParams, propose
from preprocess.segments import SegmentParams, encode_label_png, fh_segments
from preprocess.stages import Stage
from schemas.proposals import PROPOSALS

PART_NAME = "part-{:05d}.parquet"
JOB_FILE = "_job.json"
PATH_COLUMN = "_path"  # absolute source path, carried through the stages, dropped before writing


class JobError(RuntimeError):
    """A job-level problem (bad arguments, output made with other parameters)."""


@dataclass
class JobConfig:
    dataset: str                      # sample | coco | imagenet | folder
    root: str                         # dataset root
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

    @property
    def out_name(self) -> str:
        return self.name or self.dataset

    def out_dir(self) -> Path:
        return proposals_dir(self.out_name, self.work_dir)

    def params(self) -> dict:
        """Everything that changes the rows; recorded in every part and in _job.json."""
        return {"dataset": self.dataset, "split": self.split, "part_size": self.part_size,
                "max_pixels": self.max_pixels, "proposals": self.proposals.as_dict(),
                "segments": self.segments.as_dict(), "masks": self.masks.as_dict(),
                "schema_version": PROPOSALS.version}


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
    return table.append_column(PATH_COLUMN, pa.array([i["path"] for i in items], pa.string()))


def _process_stage(ds, config: JobConfig, num_cpus: int, batch_size: int):
    import ray.data
    return ds.map_batches(process_batch, fn_kwargs={"params": config.params()}, batch_size=batch_size,
                          batch_format="pyarrow", num_cpus=1,
                          compute=ray.data.TaskPoolStrategy(size=num_cpus))


def build_pipeline(items: list[dict], config: JobConfig, num_cpus: int, stages: Sequence[Stage] = ()):
    import ray.data
    batch_size = config.batch_size or max(1, min(16, math.ceil(len(items) / (4 * num_cpus))))
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
    ds = _process_stage(ds, config, num_cpus, batch_size)
    for stage in stages:  # in order, on PROPOSALS rows plus PATH_COLUMN (preprocess.stages)
        ds = stage(ds, config, num_cpus)
    return ds


# ---------------------------------------------------------------- driver
def image_list_hash(records: list[ImageRecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.key}\t{r.relpath}\n".encode("utf-8"))
    return h.hexdigest()


def _lost_row(item: dict) -> dict:
    return {"key": item["key"], "source_path": item["relpath"], "status": "failed", "label": item["label"],
            "error": f"lost: no result came back for {item['path']} (its Ray worker died, e.g. out of "
                     "memory or a crash in a native library); rerun after fixing, or remove the file"}


def write_part(path: Path, rows: list[dict], params: dict) -> None:
    rows = sorted(rows, key=lambda r: r["key"])
    table = PROPOSALS.from_rows([{k: v for k, v in r.items() if k != PATH_COLUMN} for r in rows], params)
    with atomic_open(path, "a proposals part") as f:
        pq.write_table(table, f, compression="zstd")


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


def changed_images(out: Path, records: list[ImageRecord], part_size: int) -> dict[int, list[str]]:
    """{part: keys} of the images whose file bytes no longer have the sha256 their row
    recorded (changed, replaced, or readable now and not before); reads every image."""
    changed: dict[int, list[str]] = {}
    for p in range(math.ceil(len(records) / part_size)):
        path = out / PART_NAME.format(p)
        if not path.is_file():
            continue
        mine = {r.key: r for r in records[p * part_size:(p + 1) * part_size]}
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
    records, listing = list_images_counted(config.dataset, config.root, config.split)
    if config.limit:
        records = records[: config.limit]
    if not records:
        raise JobError(f"no images found for dataset {config.dataset!r} under {config.root}; "
                       "check the root folder and the split")
    out = config.out_dir()
    with exclusive(out / ".lock", f"another make proposals is writing {out}; wait for it to "
                   "finish (or stop it), then rerun: finished parts are kept"):
        return _run_locked(config, records, listing, out, stages)


def _run_locked(config: JobConfig, records: list[ImageRecord], listing: dict, out: Path,
                stages: Sequence[Stage]) -> dict:
    if listing:
        print(f"[proposals] listing {config.dataset}: " + "; ".join(
            f"{n} {what}" for what, n in sorted(listing.items())), flush=True)
    removed = remove_stale_temporaries(out)
    if removed:
        print(f"[proposals] removed {removed} unfinished temporary file(s) of a killed run", flush=True)
    params = config.params()
    n_parts = math.ceil(len(records) / config.part_size)
    job = {"params": params, "root": str(config.root), "image_list_sha256": image_list_hash(records),
           "num_images": len(records), "num_parts": n_parts, "complete": False}
    _check_previous(out, job)
    atomic_write_text(out / JOB_FILE, json.dumps(job, indent=2, sort_keys=True), "the job summary (_job.json)")

    refreshed = changed_images(out, records, config.part_size) if config.refresh_changed else {}
    for part, keys in sorted(refreshed.items()):
        print(f"[proposals] part {part}: {len(keys)} image(s) changed since they were processed "
              f"({', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}); redoing the part", flush=True)
        (out / PART_NAME.format(part)).unlink()
    todo = [p for p in range(n_parts) if not (out / PART_NAME.format(p)).is_file()]
    items = [_item(r, p) for p in todo for r in records[p * config.part_size:(p + 1) * config.part_size]]
    print(f"[proposals] {len(records)} images in {n_parts} parts -> {out}; "
          f"{n_parts - len(todo)} parts already done, {len(todo)} to do"
          f"{'' if todo or config.refresh_changed else ' (source images changed since? PROPOSALS_ARGS=--refresh-changed re-checks them)'}",
          flush=True)
    start = time.perf_counter()
    if items:
        for stage in stages:
            print(f"[proposals] stage {stage.name}: {stage.describe or 'on'}", flush=True)
        # Stage params go into the parts only (not _job.json): `make stats` may refresh them.
        stage_params = {s.name: s.params for s in stages if s.params is not None}
        _run_parts(items, config, out, {**params, **stage_params}, stages)
    elapsed = time.perf_counter() - start

    table = read_parts(out, ["status", "filter_rule"])
    by_status = Counter(table.column("status").to_pylist())
    by_rule = Counter(r for r in table.column("filter_rule").to_pylist() if r is not None)
    job.update(complete=True, counts={"status": dict(sorted(by_status.items())),
                                      "filter_rule": dict(sorted(by_rule.items()))},
               listing=dict(sorted(listing.items())),
               refreshed={"parts": len(refreshed), "images": sum(map(len, refreshed.values()))},
               processed_this_run=len(items), elapsed_s=round(elapsed, 3),
               images_per_s=round(len(items) / elapsed, 3) if items and elapsed > 0 else None)
    atomic_write_text(out / JOB_FILE, json.dumps(job, indent=2, sort_keys=True), "the job summary (_job.json)")
    rate = f"{len(items) / elapsed:.2f} img/s" if items and elapsed > 0 else "nothing to do"
    print(f"[proposals] done: {table.num_rows} rows in {n_parts} parts; status {dict(by_status)}; "
          f"filter rule {dict(by_rule)}; this run {len(items)} images in {format_duration(elapsed)} "
          f"({rate})", flush=True)
    return job


def _run_parts(items: list[dict], config: JobConfig, out: Path, params: dict, stages: Sequence[Stage]) -> None:
    import ray
    from ray.data import DataContext
    started, cpus = start_ray(config.num_cpus)
    try:
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False  # our own Progress line instead
        # A task that still fails after Ray's retries (its worker crashed, e.g. in native code
        # on a malformed image) must not sink the job: its images become 'lost' rows below.
        ctx.max_errored_blocks = -1
        expected: dict[int, dict[str, dict]] = {}
        for item in items:
            expected.setdefault(item["part"], {})[item["key"]] = item
        part_of = {item["key"]: item["part"] for item in items}
        arrived: dict[int, list[dict]] = {p: [] for p in expected}
        progress = Progress("proposals", len(items))
        failed = 0
        for batch in build_pipeline(items, config, cpus, stages).iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                part = part_of[row["key"]]
                arrived[part].append(row)
                failed += row["status"] != "ok"
                if len(arrived[part]) == len(expected[part]):
                    write_part(out / PART_NAME.format(part), arrived.pop(part), params)
            progress.update(batch.num_rows)
        for part, rows in sorted(arrived.items()):  # rows that never came back: record, never drop
            seen = {r["key"] for r in rows}
            lost = [_lost_row(item) for key, item in expected[part].items() if key not in seen]
            print(f"[proposals] part {part}: {len(lost)} image(s) lost by Ray workers, recorded as failed",
                  file=sys.stderr, flush=True)
            write_part(out / PART_NAME.format(part), rows + lost, params)
        if failed:
            print(f"[proposals] {failed} image(s) failed this run; their rows say why (status, error)",
                  file=sys.stderr, flush=True)
    finally:
        if started:
            ray.shutdown()


# ---------------------------------------------------------------- command line
def _default_root(dataset: str, args) -> str:
    if args.root:
        return args.root
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
    p.add_argument("--dataset", required=True, choices=["sample", "coco", "imagenet", "folder"])
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


if __name__ == "__main__":
    sys.exit(main())

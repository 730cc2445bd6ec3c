"""Gathering for the audit report: stream a dataset's proposals parts into per-image scalars
and box histograms (`gather`), then the figures of summary.json (`summarise`). Nothing here
knows about HTML.

Distances are kept per image together with the backbone that produced them (the part's
params["stats"]["backbone"]), so the report can compare only figures of one network."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from preprocess.audit.backbones import identity, record_of
from preprocess.audit.stats import dataset_root, read_job
from schemas import table_params, validate
from schemas.proposals import PROPOSALS

COLUMNS = ["key", "source_path", "status", "error", "width", "height", "boxes", "num_boxes",
           "filter_rule", "num_segments", "num_masks", "resnet_distance_mean",
           "resnet_distance_std", "resnet_distance_pairs", "stats_meaningful"]
SIZE_BINS = np.linspace(0, 1, 21)  # sqrt(box area / image area)


@dataclass
class DatasetData:
    name: str
    root: Path | None
    folder: Path | None = None
    parts: int = 0
    keys: list = field(default_factory=list)
    paths: list = field(default_factory=list)
    distance: list = field(default_factory=list)   # per-image mean (NaN when absent)
    meaningful: list = field(default_factory=list)
    backbone: list = field(default_factory=list)   # per image: index into `backbones` (-1 = none)
    backbones: list = field(default_factory=list)  # backbone records, in order of appearance
    num_boxes: list = field(default_factory=list)
    num_segments: list = field(default_factory=list)
    num_masks: list = field(default_factory=list)
    rules: list = field(default_factory=list)      # per image: filter rule
    filter_rules: dict = field(default_factory=dict)
    size_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(SIZE_BINS) - 1))
    box_side_px: list = field(default_factory=list)  # per-part quantile inputs (subsampled)
    failures: list = field(default_factory=list)
    images: int = 0
    stats_params: list = field(default_factory=list)
    proposal_params: dict | None = None  # params["proposals"] of the parts (the job's)


def gather(dataset: str, work=None) -> DatasetData:
    """Stream the parts of one dataset, keeping per-image scalars and box histograms only."""
    folder, job = read_job(dataset, work)
    try:
        root = dataset_root(job, folder / "_job.json")
    except ValueError:
        root = None
    parts = sorted(folder.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{folder} holds no part-*.parquet; run `make proposals "
                                f"DATASET={dataset}` first.")
    data = DatasetData(dataset, root, folder, parts=len(parts))
    for path in parts:
        schema = pq.read_schema(path)
        table = validate(pq.read_table(path, columns=[c for c in COLUMNS if c in schema.names]),
                         PROPOSALS, str(path))
        params = table_params(table.schema)
        if data.proposal_params is None and params.get("proposals"):
            data.proposal_params = params["proposals"]
        sp = params.get("stats")
        backbone = -1
        if sp:
            if sp not in data.stats_params:
                data.stats_params.append(sp)
            record = record_of(sp)
            if record not in data.backbones:
                data.backbones.append(record)
            backbone = data.backbones.index(record)
        _add_part(data, table, backbone)
    return data


def _add_part(data: DatasetData, t: pa.Table, backbone: int) -> None:
    col = {n: t.column(n).to_pylist() for n in COLUMNS if n != "boxes"}
    data.images += t.num_rows
    for i, status in enumerate(col["status"]):
        if status != "ok":
            data.failures.append({"key": col["key"][i], "source_path": col["source_path"][i],
                                  "error": col["error"][i] or "(no error text)"})
            continue
        data.keys.append(col["key"][i])
        data.paths.append(col["source_path"][i])
        d = col["resnet_distance_mean"][i]
        data.distance.append(math.nan if d is None else d)
        data.meaningful.append(col["stats_meaningful"][i])
        data.backbone.append(backbone if d is not None else -1)
        data.num_boxes.append(col["num_boxes"][i] or 0)
        data.num_segments.append(col["num_segments"][i] or 0)
        data.num_masks.append(col["num_masks"][i] or 0)
        rule = col["filter_rule"][i] or "(none)"
        data.rules.append(rule)
        data.filter_rules[rule] = data.filter_rules.get(rule, 0) + 1
    ok = pc.equal(t.column("status"), "ok")
    boxes = pc.filter(t.column("boxes"), ok).combine_chunks()
    if len(boxes) == 0:
        return
    counts = pc.fill_null(pc.list_value_length(boxes), 0).to_numpy()
    flat = boxes.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, 4)
    w = np.repeat(pc.filter(t.column("width"), ok).to_numpy(), counts)
    h = np.repeat(pc.filter(t.column("height"), ok).to_numpy(), counts)
    side = np.sqrt(np.clip(flat[:, 2] - flat[:, 0], 0, None) * np.clip(flat[:, 3] - flat[:, 1], 0, None))
    rel = np.clip(side / np.sqrt(w.astype(np.float64) * h), 0, 1)
    data.size_hist += np.histogram(rel, SIZE_BINS)[0]
    data.box_side_px.append(side[:: max(1, len(side) // 5000)])


# ---------------------------------------------------------------- statistics
def bootstrap_ci(values: np.ndarray, reps: int = 2000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap CI of the mean; resamples in chunks to bound memory."""
    n = len(values)
    if n == 0:
        return None, None
    if n == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // n)
    means = []
    for start in range(0, reps, chunk):
        idx = rng.integers(0, n, size=(min(chunk, reps - start), n))
        means.append(values[idx].mean(axis=1))
    means = np.concatenate(means)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def describe_counts(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return {"n": 0}
    q = np.quantile(v, [0.05, 0.5, 0.95])
    return {"n": int(len(v)), "mean": float(v.mean()), "min": float(v.min()), "p5": float(q[0]),
            "median": float(q[1]), "p95": float(q[2]), "max": float(v.max())}


def distance_figures(data: DatasetData, which: int, reps: int, seed: int) -> dict:
    """Mean, bootstrap CI, ... of the images whose distance came from backbone `which`
    (an index into data.backbones; -1 = the images without a distance)."""
    d = np.asarray(data.distance, dtype=np.float64)
    has = (np.asarray(data.backbone) == which) & ~np.isnan(d) if len(d) else np.zeros(0, bool)
    meaningful_flags = {m for m, h in zip(data.meaningful, has) if h}
    lo, hi = bootstrap_ci(d[has], reps, seed)
    record = data.backbones[which] if which >= 0 else None
    return {
        "n": int(has.sum()), "missing": int(len(d) - has.sum()),
        "mean": float(d[has].mean()) if has.any() else None,
        "ci95": [lo, hi], "median": float(np.median(d[has])) if has.any() else None,
        "std_between_images": float(d[has].std(ddof=1)) if has.sum() > 1 else None,
        "meaningful": bool(has.any()) and meaningful_flags == {True},
        "bootstrap": {"reps": reps, "seed": seed, "method": "percentile"},
        "params": [p for p in data.stats_params if record_of(p) == record],
        "backbone": record, "backbone_id": identity(record) if record else None,
    }


def summarise(data: DatasetData, reps: int, seed: int) -> dict:
    by_backbone = {identity(b): distance_figures(data, i, reps, seed)
                   for i, b in enumerate(data.backbones)}
    # The headline figure: the backbone that covers most images (the only one, normally).
    main = max(by_backbone.values(), key=lambda f: f["n"], default=None)
    if main is None or main["n"] == 0:
        main = distance_figures(data, -2, reps, seed)  # no distances at all: n = 0
    px = np.concatenate(data.box_side_px) if data.box_side_px else np.zeros(0)
    return {
        "images": data.images, "ok": len(data.keys), "failed": len(data.failures),
        "parts": data.parts, "root": str(data.root) if data.root else None,
        "resnet_distance": main,
        "distance_by_backbone": by_backbone,
        "proposals_per_image": describe_counts(data.num_boxes),
        "segments_per_image": describe_counts(data.num_segments),
        "masks_per_image": describe_counts(data.num_masks),
        "filter_rules": dict(sorted(data.filter_rules.items())),
        "box_relative_side_hist": {"bins": SIZE_BINS.round(3).tolist(),
                                   "counts": data.size_hist.astype(int).tolist()},
        "box_side_px": describe_counts(px),
        "failures": data.failures[:1000],
        "failures_truncated": len(data.failures) > 1000,
    }


def json_text(summary: dict) -> str:
    return json.dumps(summary, indent=2, sort_keys=True)

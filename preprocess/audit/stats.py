"""`make stats`: compute or refresh the distance columns of a dataset's existing proposals
parts, one atomic rewrite per part (all other columns unchanged), through the Ray actor pool
of preprocess.audit.stage. Parts whose recorded settings and backbone already match are
skipped.

    python -m preprocess.audit.stats --dataset coco [--backbone SPEC] [--weights FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.io import atomic_open, remove_stale_temporaries
from common.paths import proposals_dir
from common.progress import Progress, format_duration
from preprocess.audit.backbones import Backbone, MissingWeightsError, identity, resolve
from preprocess.audit.distance import STATS_COLUMNS, FeatureDistance, StatsConfig, add_stats
from preprocess.audit.stage import stats_stage
from schemas import table_params, validate
from schemas.proposals import PROPOSALS


# ---------------------------------------------------------------- make stats
def read_job(dataset: str, work=None) -> tuple[Path, dict]:
    folder = proposals_dir(dataset, work)
    job_file = folder / "_job.json"
    if not job_file.is_file():
        raise FileNotFoundError(f"{job_file} not found: there are no proposals for dataset "
                                f"{dataset!r} under WORK_DIR. Run `make proposals "
                                f"DATASET={dataset}` first.")
    return folder, json.loads(job_file.read_text())


def dataset_root(job: dict, job_file: Path) -> Path:
    root = job.get("root") or job.get("dataset_root") or job.get("params", {}).get("root")
    if not root:
        raise ValueError(f"{job_file} names no dataset root ('root'); rerun `make proposals`.")
    return Path(root)


def write_stats_into_part(path: Path, results: dict, stats_params: dict) -> pa.Table:
    """Rewrite one part atomically with new stats columns; all other columns unchanged."""
    table = validate(pq.read_table(path), PROPOSALS, str(path))
    keys = table.column("key").to_pylist()
    missing = set(results) - set(keys)
    if missing:
        raise ValueError(f"{path}: stats for keys not in the part ({sorted(missing)[:3]}...)")
    empty = {n: None for n in STATS_COLUMNS}
    for name in STATS_COLUMNS:
        values = [results.get(k, empty)[name] for k in keys]
        column = pa.array(values, PROPOSALS.schema.field(name).type)
        table = table.set_column(table.column_names.index(name), name, column)
    params = table_params(table.schema)
    params["stats"] = stats_params
    meta = dict(table.schema.metadata or {})
    meta[b"params"] = json.dumps(params, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_open(path) as f:
        pq.write_table(table, f, compression="zstd")
    return table


def part_is_current(path: Path, stats_params: dict) -> bool:
    return table_params(pq.read_schema(path)).get("stats") == stats_params


def run_stats(dataset: str, cfg: StatsConfig, *, weights=None, random_weights=False,
              backbone: str | Backbone | None = None, force=False, use_ray=True, work=None,
              batch_images=8) -> dict:
    """Compute or refresh the stats columns of every part of `dataset` with `backbone` (a
    BACKBONE= spec or a resolved Backbone; default torchvision's supervised ResNet-50);
    returns a summary. The columns hold one backbone's figures: another backbone rewrites
    them, and params["stats"]["backbone"] says whose they are."""
    folder, job = read_job(dataset, work)
    root = dataset_root(job, folder / "_job.json")
    chosen = backbone if isinstance(backbone, Backbone) else resolve(backbone, weights, random_weights)
    name = chosen.name
    stats_params = cfg.params(chosen)
    remove_stale_temporaries(folder)
    parts = sorted(folder.glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{folder} holds no part-*.parquet; run `make proposals "
                                f"DATASET={dataset}` first.")
    todo = [p for p in parts if force or not part_is_current(p, stats_params)]
    narrow = []
    for i, p in enumerate(todo):
        t = pq.read_table(p, columns=["key", "source_path", "status", "width", "height"])
        narrow.append(t.append_column("part", pa.array([i] * t.num_rows, pa.int32())))
    total = sum(t.num_rows for t in narrow)
    print(f"[stats] {dataset}: {len(parts)} parts, {len(parts) - len(todo)} already current, "
          f"{len(todo)} to do ({total} images, {cfg.pairs} pairs each, weights {name})",
          file=sys.stderr, flush=True)
    summary = {"dataset": dataset, "parts": len(parts), "parts_written": 0,
               "parts_skipped": len(parts) - len(todo), "images": total, "with_stats": 0,
               "without_stats": 0, "stats": stats_params}
    if not todo:
        return summary
    progress = Progress(f"stats {dataset}", total)
    remaining = {i: t.num_rows for i, t in enumerate(narrow)}
    collected: dict[int, dict] = {i: {} for i in remaining}
    for batch in _stats_batches(narrow, root, cfg, chosen, use_ray, batch_images):
        for row in batch.to_pylist():
            i = row["part"]
            collected[i][row["key"]] = {n: row[n] for n in STATS_COLUMNS}
            remaining[i] -= 1
            ok = row["resnet_distance_mean"] is not None
            summary["with_stats"] += ok
            summary["without_stats"] += not ok
            if remaining[i] == 0:
                write_stats_into_part(todo[i], collected.pop(i), stats_params)
                summary["parts_written"] += 1
        progress.update(batch.num_rows)
    if remaining and any(remaining.values()):
        raise RuntimeError(f"stats: rows went missing in the pipeline for parts "
                           f"{[todo[i].name for i, n in remaining.items() if n]}")
    summary["seconds"] = round(progress.elapsed, 1)
    return summary


def _stats_batches(narrow, root, cfg, backbone: Backbone, use_ray, batch_images):
    if not use_ray:
        model = FeatureDistance(backbone=backbone)
        for t in narrow:
            for start in range(0, t.num_rows, batch_images):
                yield add_stats(t.slice(start, batch_images), root, model, cfg)
        return
    import ray
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True,
                 include_dashboard=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # our Progress line instead
        ds = ray.data.from_arrow(narrow)
        # Input blocks are already in memory (from_arrow): no read tasks to starve, so the
        # actors may take every CPU.
        ds = stats_stage(ds, root, cfg, backbone, cpu_share=1.0, reserve_cpus=0,
                         batch_images=batch_images)
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
    finally:
        if started_here:
            ray.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m preprocess.audit.stats", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="name under WORK_DIR (sample, coco, ...)")
    ap.add_argument("--weights", default=None, help="weights file: torchvision's ResNet-50 "
                    "(default: $WEIGHTS, else the torch hub cache) or the timm model's")
    ap.add_argument("--backbone", default=os.environ.get("BACKBONE") or None,
                    help="network (default torchvision's supervised ResNet-50): a run folder of "
                    "ours, its exported/backbone_torchvision.pth or checkpoints/last.pt, or "
                    "timm:<name> with --weights <local file>")
    ap.add_argument("--random-weights", action="store_true",
                    help="TESTS ONLY: random ResNet-50; figures are marked not meaningful")
    ap.add_argument("--pairs", type=int, default=4, help="view pairs per image")
    ap.add_argument("--seed", type=int, default=0, help="crop seed (recorded)")
    ap.add_argument("--size", type=int, default=224, help="view side (224 as in MoCo)")
    ap.add_argument("--batch-views", type=int, default=32, help="views per forward pass")
    ap.add_argument("--force", action="store_true", help="recompute parts already current")
    ap.add_argument("--no-ray", action="store_true", help="run in this process, no Ray")
    args = ap.parse_args(argv)
    if args.pairs < 1:
        ap.error("--pairs must be >= 1")
    cfg = StatsConfig(seed=args.seed, pairs=args.pairs, size=args.size,
                      batch_views=args.batch_views)
    try:
        summary = run_stats(args.dataset, cfg, weights=args.weights,
                            random_weights=args.random_weights, backbone=args.backbone,
                            force=args.force, use_ray=not args.no_ray)
    except (MissingWeightsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    took = format_duration(summary.get("seconds", 0))
    print(f"[stats] done: {summary['parts_written']} parts written, {summary['parts_skipped']} "
          f"already current, {summary['with_stats']} images with a distance, "
          f"{summary['without_stats']} without (failed or unreadable), in {took}; backbone "
          f"{identity(summary['stats']['backbone'])}"
          + ("" if summary["stats"]["meaningful"] else "; RANDOM WEIGHTS: not meaningful"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

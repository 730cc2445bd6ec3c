"""`make bench-report`: what the audit report costs, with and without its gallery.

Runs the preprocessing job and the shard writer once on N images (coco128 when
../shared/data/coco128 is there, else the built-in sample at 320-640 px), fills the distance
columns with a random-weight ResNet-50 (the report's cost does not depend on the values),
then builds the report in alternating rounds without (`--no-gallery`) and with the gallery.
Figures: the median seconds of each, their ratio (with / without, the median of per-round
ratios: robust to load drifting on a shared machine), and the gallery's seconds per drawn
image. Writes bench/results/report.json."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from common.io import atomic_write_text
from common.paths import proposals_dir, shards_dir

RESULTS = Path(__file__).resolve().parent / "results" / "report.json"
COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"


def prepare(work: Path, images: int, source: str) -> tuple[str, int]:
    from preprocess.audit import distance
    from preprocess.audit import stats as make_stats
    from preprocess.job import JobConfig, run
    from shards.write import PackParams, write_shards
    if source == "coco128":
        config = JobConfig(dataset="coco", root=str(COCO128), split="train2017", name="bench",
                           work_dir=str(work), limit=images, part_size=32)
    else:
        from preprocess.sample import generate
        root = generate(work / "raw", n_scene=images - images // 4, n_object=images // 4, seed=0)
        config = JobConfig(dataset="sample", root=str(root), name="bench", work_dir=str(work), part_size=32)
    job = run(config)
    write_shards("bench", PackParams(), proposals=proposals_dir("bench", work), out=shards_dir("bench", work))
    make_stats.run_stats("bench", distance.StatsConfig(pairs=1, size=64), random_weights=True,
                         use_ray=False, work=work)
    return "bench", job["num_images"]


def time_report(work: Path, gallery: bool, name: str) -> tuple[float, dict]:
    from preprocess.audit import report
    start = time.perf_counter()
    out = report.build_report(["bench"], name, work=work, gallery=gallery)
    seconds = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    return seconds, summary["images"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--source", choices=["auto", "coco128", "sample"], default="auto")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    source = args.source if args.source != "auto" else (
        "coco128" if (COCO128 / "annotations").is_dir() else "sample")
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, n = prepare(work, args.images, source)
        time_report(work, True, "warmup")  # imports, template compile, page cache
        without, with_, files = [], [], None
        for r in range(args.rounds):
            without.append(time_report(work, False, "plain")[0])
            seconds, files = time_report(work, True, "gallery")
            with_.append(seconds)
            print(f"[bench-report] round {r + 1}/{args.rounds}: {without[-1]:.2f} s without the "
                  f"gallery, {with_[-1]:.2f} s with", flush=True)
        drawn = len(list((work / "report" / "gallery" / "img").glob("ds0/gallery/*.boxes.jpg")))
    ratio = statistics.median(w / p for w, p in zip(with_, without))
    result = {
        "name": "report", "source": source, "images": n, "rounds": args.rounds,
        "seconds_without_gallery": statistics.median(without), "seconds_with_gallery": statistics.median(with_),
        "ratio_with_to_without": ratio, "gallery_images_drawn": drawn,
        "gallery_seconds_per_drawn_image": (statistics.median(with_) - statistics.median(without)) / max(1, drawn),
        "page_images": files, "rounds_s": {"without": without, "with": with_},
        "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
        "cpus": os.cpu_count(), "machine": platform.platform(), "python": platform.python_version(),
    }
    atomic_write_text(args.out, json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"[bench-report] {n} images ({source}): {result['seconds_without_gallery']:.2f} s without the "
          f"gallery, {result['seconds_with_gallery']:.2f} s with ({drawn} images drawn, "
          f"{result['gallery_seconds_per_drawn_image']:.2f} s each): ratio {ratio:.2f}; wrote {args.out}",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

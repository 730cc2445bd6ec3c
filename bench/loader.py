"""`make bench-loader`: loader throughput per CPU core for every recipe, DALI vs reference.

Builds photo-like 640x480 shards with the real shard writer (bench.shards.photo_shards
+ shards.write: 50 boxes, 16-bit FH and MCG-style maps per image), then measures, in one
process and interleaved over rounds so machine load hits all alike:
- `bound`: DALI reader + ROI decode-and-random-crop + resize 224 + mirror/normalise,
  one view per image (pipeline.md 1.10): the decode-plus-crop ceiling;
- each recipe with the DALI backend (1 thread) and with the reference (torchvision, in
  process, torch on 1 thread).
Rates are source images per second of wall time and per CPU-second of the process (all
threads: DALI's worker plus our Python feeder), the latter being "per core". Targets:
SoCo DALI >= 2x the reference and >= 0.3 of the bound, per CPU-second. Peak RSS is
sampled every 10 ms while each configuration runs. The cost of the integrity checks
(crc32 of every member read against index.parquet, strict JPEG decoding) is SoCo DALI as
built against the same loader with its ShardDataset's crc32 check switched off and the
feeder decoding with OpenCV (which cannot see libjpeg warnings, the decoder used before the
checks), interleaved in the same rounds (`soco_checked_vs_unchecked`; target: at most 5% slower). Writes bench/results/loader.json."""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from common.io import atomic_write_text
from common.progress import Progress

RESULTS = Path(__file__).resolve().parent / "results" / "loader.json"
RECIPES = ("soco", "soco_star", "soco_c4", "detcon", "maskco", "mocov2", "detco", "ccmim")
TARGETS = {"soco_vs_reference": 2.0, "soco_vs_bound": 0.3, "soco_checked_vs_unchecked": 0.95}


class PeakRSS:
    """Highest resident set size seen while the block runs (polled every 10 ms)."""

    def __enter__(self):
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.start_rss = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def bound_batches(shards: Path, batch: int):
    """DALI decode-plus-crop alone (an endless batch iterator): the ceiling for one view."""
    from nvidia.dali import fn, pipeline_def, types
    tars = sorted(shards.glob("*.tar"))

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=2)
    def pipe():
        jpeg = fn.readers.webdataset(paths=[str(p) for p in tars],
                                     index_paths=[str(p.with_suffix(".idx")) for p in tars],
                                     ext=["jpg"], name="reader")
        img = fn.decoders.image_random_crop(jpeg, device="cpu", output_type=types.RGB,
                                            random_area=[0.08, 1.0])
        img = fn.resize(img, size=[224, 224])
        return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[124, 116, 104], std=[58, 57, 57],
                                        mirror=fn.random.coin_flip())

    p = pipe()
    p.build()
    return iter(p.run, None)


def opencv_decode(raw, factor: int, where: str):
    """The feeder's decode before the checks: OpenCV's reduced IDCT (the same pixels as
    shards.format.decode_jpeg), which cannot report libjpeg warnings."""
    import cv2
    import numpy as np
    flags = {1: 0, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
             8: cv2.IMREAD_REDUCED_GRAYSCALE_8}[factor] | cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
    return cv2.imdecode(np.frombuffer(raw.jpeg, np.uint8), flags)


def unchecked_decode(it):
    """Run a DALI loader's batches with the feeder decoding through opencv_decode."""
    from train.loader import dali_pipeline
    checked = dali_pipeline.decode_reduced
    dali_pipeline.decode_reduced = opencv_decode
    try:
        yield from it
    finally:
        dali_pipeline.decode_reduced = checked


def measure(make, batch: int, batches: int) -> dict:
    """Time `batches` batches after one warm-up batch; wall and process CPU seconds."""
    with PeakRSS() as mem:
        it = make()
        next(it)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        n = sum(1 for _ in itertools.islice(it, batches)) * batch
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"images": n, "wall_s": wall, "cpu_s": cpu, "per_s": n / wall, "per_cpu_s": n / cpu,
            "peak_rss_mb": mem.peak / 2**20, "rss_growth_mb": (mem.peak - mem.start_rss) / 2**20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="loader throughput per core, DALI vs reference")
    ap.add_argument("--samples", type=int, default=384)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dali-batches", type=int, default=10)
    ap.add_argument("--reference-batches", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from bench.shards import photo_shards
    from train.loader import build_loader

    recipes = a.recipes.split(",")
    with tempfile.TemporaryDirectory(prefix="bench_loader_", dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        shards = photo_shards(tmp, a.samples, 64, per_shard=128, tag="bench-loader")

        def loader_run(recipe, backend, batches, checks=True, **kw):
            def make():
                loader = build_loader(recipe, shards, a.batch, backend=backend, seed=0,
                                      num_workers=0 if backend == "reference" else 1, **kw)
                if checks:
                    return iter(loader)
                loader.source.data.verify_crc = False  # off only for the integrity A/B
                return unchecked_decode(iter(loader))
            return make, batches

        configs = {"bound": (lambda: bound_batches(shards, a.batch), a.dali_batches)}
        for r in recipes:
            configs[f"{r}/dali"] = loader_run(r, "dali", a.dali_batches)
            configs[f"{r}/reference"] = loader_run(r, "reference", a.reference_batches)
        if "soco" in recipes:  # the GPU graph's decode, for comparison with the feeder's
            configs["soco/dali_decoder"] = loader_run("soco", "dali", a.dali_batches, decode="dali")
            configs["soco/dali_unchecked"] = loader_run("soco", "dali", a.dali_batches, checks=False)
        if "detco" in recipes:  # patches cut from the augmented view instead of 18 own views
            configs["detco_view/dali"] = loader_run("detco", "dali", a.dali_batches, patches="view")
        runs = {name: [] for name in configs}
        progress = Progress("bench-loader", a.rounds * len(configs), unit="run")
        for _ in range(a.rounds):
            for name, (make, batches) in configs.items():
                runs[name].append(measure(make, a.batch, batches))
                progress.update()
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    ratios = {}
    for r in recipes:
        ratios[r] = {"dali_vs_reference": med[f"{r}/dali"]["per_cpu_s"] / med[f"{r}/reference"]["per_cpu_s"],
                     "dali_vs_bound": med[f"{r}/dali"]["per_cpu_s"] / med["bound"]["per_cpu_s"],
                     "dali_vs_reference_wall": med[f"{r}/dali"]["per_s"] / med[f"{r}/reference"]["per_s"],
                     "dali_vs_bound_wall": med[f"{r}/dali"]["per_s"] / med["bound"]["per_s"]}
    if "detco_view/dali" in med:
        ratios["detco_view"] = {"dali_vs_bound": med["detco_view/dali"]["per_cpu_s"] / med["bound"]["per_cpu_s"],
                                "dali_vs_bound_wall": med["detco_view/dali"]["per_s"] / med["bound"]["per_s"]}
    targets = {}
    if "soco" in ratios:
        targets = {"soco_vs_reference": {"target": TARGETS["soco_vs_reference"],
                                         "value": ratios["soco"]["dali_vs_reference"]},
                   "soco_vs_bound": {"target": TARGETS["soco_vs_bound"],
                                     "value": ratios["soco"]["dali_vs_bound"]},
                   "soco_checked_vs_unchecked": {
                       "target": TARGETS["soco_checked_vs_unchecked"],
                       "value": med["soco/dali"]["per_cpu_s"] / med["soco/dali_unchecked"]["per_cpu_s"],
                       "wall": med["soco/dali"]["per_s"] / med["soco/dali_unchecked"]["per_s"],
                       "per_round": [c["per_cpu_s"] / u["per_cpu_s"] for c, u in
                                     zip(runs["soco/dali"], runs["soco/dali_unchecked"])]}}
        for t in targets.values():
            t["met"] = t["value"] >= t["target"]
    report = {"bench": "loader", "what": __doc__.split("\n\n")[0],
              "unit": "source images (each makes all of its recipe's views); per_cpu_s = per core",
              "params": vars(a), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                             "load_avg": os.getloadavg()},
              "median": med, "ratios": ratios, "targets": targets, "runs": runs}
    atomic_write_text(a.out, json.dumps(report, indent=1))
    for r, v in ratios.items():
        versus = f"{v['dali_vs_reference']:.1f}x reference, " if "dali_vs_reference" in v else ""
        print(f"[bench-loader] {r}: DALI {med[f'{r}/dali']['per_cpu_s']:.1f} img/cpu-s = "
              f"{versus}{v['dali_vs_bound']:.2f} of decode+crop bound")
    for name, t in targets.items():
        print(f"[bench-loader] target {name}: {t['value']:.2f} (>= {t['target']}) "
              f"{'met' if t['met'] else 'NOT met'}")
    print(f"[bench-loader] wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

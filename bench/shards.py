"""`make bench-shards`: shard write and read throughput, as ratios to plain file I/O.

Builds a synthetic dataset (photo-like 640x480 JPEGs, 16-bit label maps, 50 boxes an
image) as PROPOSALS parts, packs it with shards.write, and reads it back four ways:
webdataset, DALI's webdataset reader with our .idx files (CPU), our ShardDataset
(crc-checked), and random access by key through index.parquet. Every figure is a
ratio to a plain sequential read (or write) of the same tar bytes in the same
process, once with the page cache warm and once after evicting the tars from it
(posix_fadvise DONTNEED), since a training job streams from disk. Target: streaming
reads at least 0.8 of the plain read, checked on cold reads for the readers the
pipeline streams with (DALI's and ours); webdataset is measured for comparison (its
Python tar parser is CPU-bound). Writes bench/results/shards.json.

`--only ray-scaling` (also part of the full run): the Ray writer (shards.parallel) on a
local Ray of 1 and of 2 CPUs, interleaved, best of `--scaling-repeats`, each on a started
Ray whose workers a warm-up pack has started; the 2-over-1 speed-up (target >= 1.7), the
packing cost in core-seconds per sample and the tar bytes per sample, with the load
average around the runs (the machine is shared)."""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq

from common.io import atomic_write_text
from schemas.proposals import PROPOSALS
from shards.reader import ShardDataset
from shards.write import PackParams, write_shards

RESULTS = Path(__file__).resolve().parent / "results" / "shards.json"
TARGET = 0.8
TARGET_SCALING = 1.7


def ray_scaling(tmp: Path, samples: int, distinct: int, repeats: int) -> dict:
    """Ray writer on 1 vs 2 CPUs (interleaved): seconds, speed-up, cost per sample."""
    import ray
    from preprocess.job import start_ray
    from shards.parallel import write_shards_on_ray
    pdir = build_dataset(tmp / "scaling", samples, distinct, seed=1)
    runs: dict[int, list] = {1: [], 2: []}
    load_before = os.getloadavg()
    for rep in range(repeats):
        for cpus in (1, 2):
            start_ray(cpus)
            try:  # warm-up: start the workers and their imports outside the timed pack
                write_shards_on_ray("bench", PackParams(max_samples=250), pdir,
                                    tmp / f"warm{cpus}-{rep}", None, False, None, chunk=8)
                out = tmp / f"ray{cpus}-{rep}"
                start = time.perf_counter()
                manifest = write_shards_on_ray("bench", PackParams(max_samples=250), pdir, out,
                                               None, False, None)
                took = time.perf_counter() - start
            finally:
                ray.shutdown()
            nbytes = sum(x["bytes"] for x in manifest["shards"])
            runs[cpus].append({"seconds": round(took, 2), "samples": manifest["num_samples"],
                               "tar_bytes": nbytes, "loadavg_after": os.getloadavg()})
            print(f"[bench-shards] ray {cpus} CPU(s): {took:.1f}s for {manifest['num_samples']} samples",
                  flush=True)
    best = {c: min(r["seconds"] for r in runs[c]) for c in (1, 2)}
    speedup = best[1] / best[2]
    one = runs[1][0]
    return {"samples": samples, "distinct_sources": distinct, "runs": {str(c): runs[c] for c in (1, 2)},
            "best_seconds": {str(c): best[c] for c in (1, 2)},
            "speedup_2_over_1": round(speedup, 3), "speedup_at_least": TARGET_SCALING,
            "pair_ratios": [round(a["seconds"] / b["seconds"], 3) for a, b in zip(runs[1], runs[2])],
            "met": speedup >= TARGET_SCALING,
            "core_seconds_per_sample": round(best[1] / one["samples"], 5),
            "tar_bytes_per_sample": round(one["tar_bytes"] / one["samples"]),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "what": "shards.parallel.write_shards_on_ray (CHUNK samples a build task) on a local "
                    "Ray of 1 or 2 CPUs, including the driver's load of the parts and the merge "
                    "of index and manifest; Ray start-up and worker start excluded (warm-up pack)"}


def photo_like(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth colour fields plus texture: compresses like a photo (~60-90 KB at q90)."""
    low = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3)).astype(np.uint8)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    img += rng.integers(-10, 11, (h, w, 3), dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def build_dataset(root: Path, n: int, distinct: int, seed: int = 0) -> Path:
    """`n` samples over `distinct` source images; returns the proposals folder."""
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True)
    h, w = 480, 640
    yy, xx = np.mgrid[0:h, 0:w]
    sources = []
    for i in range(distinct):
        ok, jpg = cv2.imencode(".jpg", photo_like(rng, h, w), [cv2.IMWRITE_JPEG_QUALITY, 90])
        path = images / f"img{i:04d}.jpg"
        path.write_bytes(jpg.tobytes())
        fh = ((yy // (16 + i % 16)) * 41 + xx // (20 + i % 8)).astype(np.uint16)
        bits = sum(((xx * (k + 1) // w + yy // (h // 4)) % 2 == 0).astype(np.uint16) << k
                   for k in range(12)).astype(np.uint16)
        corners = np.sort(rng.uniform(0, 1, (50, 2, 2)), axis=1)  # [box, corner, xy]
        boxes = (corners.reshape(50, 4) * [w, h, w, h]).astype(np.float32)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], np.minimum(boxes[:, :2] + 1, [w, h]))
        boxes[:, :2] = np.minimum(boxes[:, :2], boxes[:, 2:] - 1)
        sources.append({"source_path": f"images/{path.name}",
                        "sha256": hashlib.sha256(jpg.tobytes()).hexdigest(),
                        "fh_png": cv2.imencode(".png", fh)[1].tobytes(),
                        "mcg_png": cv2.imencode(".png", bits)[1].tobytes(),
                        "boxes": boxes.tolist(), "num_segments": int(fh.max()) + 1})
    rows = [{"key": f"{k:09d}", "status": "ok", "width": w, "height": h, "num_boxes": 50,
             "filter_rule": "soco", "num_masks": 12, "mask_scores": [0.5] * 12,
             **sources[k % distinct]} for k in range(n)]
    pdir = root / "proposals"
    pdir.mkdir()
    for p in range(0, n, 500):
        pq.write_table(PROPOSALS.from_rows(rows[p:p + 500]), pdir / f"part-{p // 500:05d}.parquet")
    (pdir / "_job.json").write_text(json.dumps({"root": str(root), "complete": True}))
    return pdir


def photo_shards(tmp: Path, samples: int, distinct: int, per_shard: int, tag: str) -> Path:
    """Shards of `samples` photo-like 640x480 samples under `tmp`, for the loader, trainer and
    methods benchmarks (built with the real shard writer); returns the shards folder."""
    print(f"[{tag}] building {samples} photo-like 640x480 samples in {tmp}", flush=True)
    shards = tmp / "shards"
    write_shards("bench", PackParams(max_samples=per_shard),
                 proposals=build_dataset(tmp / "raw", samples, distinct), out=shards)
    return shards

def evict(paths) -> None:
    """Drop the files from the page cache so the next read comes from disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_read(paths) -> int:
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total


def plain_write(paths, out: Path) -> None:
    """The same bytes written shard by shard, fsynced, as the writer does."""
    for i, p in enumerate(paths):
        data = Path(p).read_bytes()
        with open(out / f"copy-{i}.tar", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def read_webdataset(paths) -> int:
    import webdataset as wds
    return sum(1 for _ in wds.WebDataset([str(p) for p in paths], shardshuffle=False,
                                         empty_check=False))


def dali_pipeline(ds: ShardDataset, threads: int):
    """Built outside the timed part: DALI reads data only when run."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=64, num_threads=threads, device_id=None, prefetch_queue_depth=2)
    def pipe():
        return tuple(fn.readers.webdataset(
            paths=[str(p) for p in ds.tar_paths], index_paths=[str(p) for p in ds.idx_paths],
            ext=["jpg", "boxes", "fh.png", "mcg.png", "json"], name="reader",
            dtypes=[types.UINT8, types.FLOAT, types.UINT8, types.UINT8, types.UINT8]))

    p = pipe()
    p.build()
    return p


def read_dali(p) -> int:
    size = p.reader_meta("reader")["epoch_size"]
    seen = 0
    while seen < size:
        p.run()
        seen += 64
    return size


def read_ours(ds: ShardDataset) -> int:
    return sum(1 for _ in ds)


def read_random(ds: ShardDataset, keys: list[str]) -> int:
    for key in keys:
        ds.get(key)
    return len(keys)


def timed(fn, *args) -> tuple[float, int]:
    start = time.perf_counter()
    count = fn(*args)
    return time.perf_counter() - start, count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="shard write/read throughput")
    ap.add_argument("--samples", type=int, default=6000,
                    help="about 150 KB each: 6000 make a 0.9 GB read, long enough to time")
    ap.add_argument("--distinct", type=int, default=64, help="distinct source images")
    ap.add_argument("--repeats", type=int, default=7, help="timed read pairs per reader")
    ap.add_argument("--write-repeats", type=int, default=3)
    ap.add_argument("--dali-threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--scaling-samples", type=int, default=1500)
    ap.add_argument("--scaling-repeats", type=int, default=3)
    ap.add_argument("--only", choices=["ray-scaling"], help="run only this part, updating its entry")
    a = ap.parse_args(argv)
    if a.only:
        with tempfile.TemporaryDirectory(prefix="bench_shards_", dir=os.environ.get("BENCH_TMP")) as tmp:
            entry = ray_scaling(Path(tmp), a.scaling_samples, a.distinct, a.scaling_repeats)
        out = Path(a.out)
        report = json.loads(out.read_text()) if out.is_file() else {}
        report["ray_scaling"] = entry
        atomic_write_text(out, json.dumps(report, indent=1))
        print(json.dumps({k: entry[k] for k in ("best_seconds", "speedup_2_over_1", "met",
                                                "core_seconds_per_sample", "tar_bytes_per_sample")}))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_shards_", dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        print(f"[bench-shards] building {a.samples} synthetic samples in {tmp}", flush=True)
        pdir = build_dataset(tmp / "raw", a.samples, a.distinct)
        out = tmp / "shards"
        copy_dir = tmp / "copy"
        copy_dir.mkdir()
        write_s, plain_write_s = [], []
        for r in range(a.write_repeats):  # each write paired with a plain write of its bytes
            start = time.perf_counter()
            write_shards("bench", PackParams(max_samples=250), proposals=pdir, out=out,
                         overwrite=True)
            write_s.append(time.perf_counter() - start)
            tars = sorted(out.glob("*.tar"))
            start = time.perf_counter()
            plain_write(tars, copy_dir)
            plain_write_s.append(time.perf_counter() - start)
        ds, fast = ShardDataset(out), ShardDataset(out, verify_crc=False)
        tars = ds.tar_paths
        nbytes = sum(p.stat().st_size for p in tars)
        keys = ds.keys[:]
        random.Random(0).shuffle(keys)
        import webdataset  # noqa: F401  (imports outside the timed part)
        readers = {  # name: (untimed setup, timed read returning the sample count)
            "webdataset": (lambda: None, lambda _: read_webdataset(tars)),
            "dali_cpu": (lambda: dali_pipeline(ds, a.dali_threads), read_dali),
            "shard_dataset": (lambda: None, lambda _: read_ours(ds)),
            "shard_dataset_no_crc": (lambda: None, lambda _: read_ours(fast)),
            "random_access_index": (lambda: None, lambda _: read_random(ds, keys)),
        }
        def timed_pass(cache, name, read, state) -> float:
            evict(tars) if cache == "cold" else plain_read(tars)
            took, count = timed(read, state)
            assert count == len(ds), (name, count)
            return took

        results = {}
        for cache in ("warm", "cold"):
            results[cache] = {}
            for name, (setup, read) in readers.items():
                seconds, plain, ratios = [], [], []
                for _ in range(a.repeats):  # each pass paired with a plain read next to it
                    plain.append(timed_pass(cache, "plain read", lambda _: plain_read(tars) and len(ds),
                                            None))
                    state = setup()
                    seconds.append(timed_pass(cache, name, read, state))
                    ratios.append(plain[-1] / seconds[-1])
                    # DALI maps the tars, and the page cache cannot drop mapped pages: free
                    # the pipeline now or the next "cold" pass reads from memory
                    del state
                    gc.collect()
                results[cache][name] = {"median_s": statistics.median(seconds),
                                        "samples_per_s": len(ds) / min(seconds),  # best pass
                                        "ratio_to_plain_read": min(plain) / min(seconds),
                                        "median_pair_ratio": statistics.median(ratios),
                                        "seconds": seconds, "plain_seconds": plain}
            print(f"[bench-shards] {cache} cache: " + ", ".join(
                f"{k} {v['samples_per_s']:.0f}/s ({v['ratio_to_plain_read']:.2f}x)"
                for k, v in results[cache].items()), flush=True)
        scaling = ray_scaling(tmp, a.scaling_samples, a.distinct, a.scaling_repeats)
    write_med, plain_med = statistics.median(write_s), statistics.median(plain_write_s)
    write_ratio = statistics.median(p / w for p, w in zip(plain_write_s, write_s))
    streaming = ("dali_cpu", "shard_dataset")  # the pipeline's streaming readers
    report = {
        "bench": "shards",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "samples": len(ds), "shards": len(tars), "tar_bytes": nbytes,
        "bytes_per_sample": nbytes / len(ds),
        "write": {"median_s": write_med, "MB_per_s": nbytes / 1e6 / write_med,
                  "samples_per_s": len(ds) / write_med,
                  "plain_write_MB_per_s": nbytes / 1e6 / plain_med,
                  "ratio_to_plain_write": write_ratio},
        "read": results,
        "ray_scaling": scaling,
        "target": {"streaming_ratio_min": TARGET, "checked_on": "cold", "readers": streaming,
                   "values": {r: results["cold"][r]["ratio_to_plain_read"] for r in streaming},
                   "met": all(results["cold"][r]["ratio_to_plain_read"] >= TARGET
                              for r in streaming)},
        "notes": "ratio_to_plain_read = best plain-read time / best reader time on the same "
                 "tar bytes in this run (best of `repeats` passes each, as timeit does: this "
                 "VM's virtual disk alternates between fast and slow passes, about 2x apart, "
                 "so single pairs mislead); median_pair_ratio is the median over passes each "
                 "timed right after a plain read. Reads return raw member bytes (no image "
                 "decode); cold = tars evicted from the page cache before each pass. The "
                 "target is checked "
                 "on cold reads (a training job streams from storage) for the readers the "
                 "pipeline streams with; webdataset is measured for comparison: its pure-"
                 "Python tar parsing costs about 40 us a member, so it is CPU-bound far "
                 "below storage speed on this machine",
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps(report, indent=1))
    t = report["target"]
    print(f"[bench-shards] write {report['write']['MB_per_s']:.0f} MB/s "
          f"({report['write']['ratio_to_plain_write']:.2f}x plain write); target: cold streaming "
          + ", ".join(f"{r} {v:.2f}" for r, v in t["values"].items())
          + f" (>= {TARGET}) {'met' if t['met'] else 'NOT met'}; wrote {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

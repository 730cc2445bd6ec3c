"""ResNet distance (MaskCo, Zhao et al. 2021, sec. 4.2): how far apart two random crops of
one image land in supervised ResNet-50 feature space. A per-image measure of the
semantic-consistency assumption behind image-level contrastive learning.

The statistic, exactly as implemented:
- views: P pairs of crops per image drawn like MoCo's RandomResizedCrop(224, scale 0.2-1,
  ratio 3/4-4/3), each resized bilinearly to 224x224 and ImageNet-normalised. Only the
  crop (the paper says "exactly the same random crop operation as in MoCo"): no flip, no
  colour jitter. Crops come from a NumPy RNG seeded by (seed, key), so a crop pair can be
  regenerated later (the report does) and does not depend on batching or ordering;
- features: torchvision resnet50, IMAGENET1K_V1 weights, eval mode, conv5 (layer4) map of
  2048x7x7, averaged over the 7x7 positions, then unit-normalised over the 2048 channels;
- d = ||y1 - y2||^2 = 2 - 2 cos(y1, y2), in [0, 4] (in [0, 2] in practice, the pooled
  post-ReLU features being non-negative).

Why global pooling: the paper reports dataset means of 0.1546 (ImageNet) and 0.1814 (COCO),
i.e. cos ~ 0.92. Two crops cover different parts of the image, so their 7x7 maps are not
spatially aligned; comparing the maps position by position (per-position unit vectors, or
the flattened 100352-d map) compares unrelated content at most positions and gives
cosines far below 0.9 even for one object. Only the pooled descriptor, which ignores where
things are, can be that close. methods.md section 3 reaches the same reading.

Per image we store the mean over the P pairs, their sample standard deviation (null when
P = 1) and P. `make stats` (`python -m preprocess.stats --dataset X`) computes or refreshes
these columns in existing proposals parts, one atomic rewrite per part, through a Ray actor
pool (`stats_stage`) that the preprocessing job also inserts before its writer.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.io import atomic_open, remove_stale_temporaries, sha256_file
from common.paths import proposals_dir
from common.progress import Progress, format_duration
from schemas import table_params, validate
from schemas.proposals import PROPOSALS

WEIGHTS_NAME = "resnet50-0676ba61.pth"
WEIGHTS_URL = f"https://download.pytorch.org/models/{WEIGHTS_NAME}"
WEIGHTS_SHA256_PREFIX = "0676ba61"  # torchvision names its files by this prefix of the sha256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# MaskCo Table 1 (dataset means of the ResNet distance).
PAPER_TABLE1 = {"ImageNet": 0.1546, "ImageNet-10%": 0.1547, "COCO": 0.1814,
                "Conceptual Captions": 0.1782}
STATS_COLUMNS = ("resnet_distance_mean", "resnet_distance_std", "resnet_distance_pairs",
                 "stats_meaningful")
METHOD = "resnet50 layer4, global average pool, unit norm over channels, d = ||y1 - y2||^2"


class MissingWeightsError(FileNotFoundError):
    pass


@dataclasses.dataclass(frozen=True)
class StatsConfig:
    """Everything that determines the numbers; recorded in each part's params["stats"]."""
    seed: int = 0
    pairs: int = 4
    size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    batch_views: int = 32

    def params(self, weights: str, weights_sha256: str | None, meaningful: bool) -> dict:
        return {"method": METHOD, "seed": self.seed, "pairs": self.pairs, "size": self.size,
                "scale": list(self.scale), "ratio": list(self.ratio), "weights": weights,
                "weights_sha256": weights_sha256, "meaningful": meaningful}

    @classmethod
    def from_params(cls, p: dict) -> "StatsConfig":
        return cls(seed=int(p["seed"]), pairs=int(p["pairs"]), size=int(p["size"]),
                   scale=tuple(p["scale"]), ratio=tuple(p["ratio"]))


# ---------------------------------------------------------------- weights
def default_weights_path() -> Path:
    import torch
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def find_weights(explicit: str | os.PathLike | None = None) -> Path:
    """The weights file: `explicit`, else $WEIGHTS, else the torch hub cache. Raises
    MissingWeightsError saying what to download and where to put it."""
    chosen = explicit or os.environ.get("WEIGHTS")
    path = Path(chosen) if chosen else default_weights_path()
    if path.is_file():
        return path
    where = (f"WEIGHTS={chosen} does not exist" if chosen
             else f"{path} does not exist (torch hub cache; TORCH_HOME moves it)")
    raise MissingWeightsError(
        f"ResNet-50 weights not found: {where}. The ResNet distance needs torchvision's "
        f"supervised ImageNet ResNet-50 (IMAGENET1K_V1), file {WEIGHTS_NAME}. On a machine "
        f"with internet: `curl -L -o {WEIGHTS_NAME} {WEIGHTS_URL}`, then copy it to "
        f"{default_weights_path()} or pass WEIGHTS=/path/to/{WEIGHTS_NAME}. "
        "(--random-weights runs the code path for tests only; its numbers mean nothing.)")


def weights_available(explicit=None) -> bool:
    try:
        find_weights(explicit)
        return True
    except MissingWeightsError:
        return False


def describe_weights(path: Path | None) -> tuple[str, str | None]:
    """(name, sha256) for the params; warns when the file is not the official one."""
    if path is None:
        return "random", None
    digest = sha256_file(path)
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        print(f"warning: {path} is not torchvision's {WEIGHTS_NAME} (sha256 {digest[:12]}...); "
              "distances will not be comparable to the paper's Table 1", file=sys.stderr)
    return path.name, digest


# ---------------------------------------------------------------- crops
def image_rng(key: str, seed: int) -> np.random.Generator:
    """One RNG stream per (seed, key): crops do not depend on order or batching."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (10 tries, then a centre crop), as a
    half-open x1, y1, x2, y2 box."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            return x, y, x + w, y + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


def crop_pairs(key: str, width: int, height: int, cfg: StatsConfig) -> np.ndarray:
    """int64 [P, 2, 4] crop boxes (x1, y1, x2, y2) of the P view pairs of one image."""
    rng = image_rng(key, cfg.seed)
    boxes = [random_resized_crop_box(rng, width, height, cfg.scale, cfg.ratio)
             for _ in range(2 * cfg.pairs)]
    return np.asarray(boxes, dtype=np.int64).reshape(cfg.pairs, 2, 4)


def render_views(rgb: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """uint8 [len(boxes), size, size, 3]: each box cropped and resized bilinearly (PIL)."""
    from PIL import Image
    img = Image.fromarray(rgb)
    return np.stack([np.asarray(img.resize((size, size), Image.BILINEAR, box=tuple(map(int, b))))
                     for b in boxes.reshape(-1, 4)])


# ---------------------------------------------------------------- model
class ResNetDistance:
    """ResNet-50 up to conv5, pooled and unit-normalised; loaded once, run in batches."""

    def __init__(self, weights: str | os.PathLike | None = None, random_weights: bool = False,
                 device: str | None = None, threads: int | None = None, init_seed: int = 0):
        import torch
        import torchvision
        if threads:
            torch.set_num_threads(int(threads))
        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.meaningful = not random_weights
        if random_weights:
            with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
                torch.manual_seed(init_seed)
                net = torchvision.models.resnet50(weights=None)
        else:
            path = find_weights(weights)
            net = torchvision.models.resnet50(weights=None)
            try:
                net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as e:  # truncated download, other architecture
                raise MissingWeightsError(
                    f"{path}: not a loadable torchvision ResNet-50 state dict ({e}). "
                    f"Download it again from {WEIGHTS_URL}.") from e
        self.net = net.eval()
        self.trunk = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                         net.layer1, net.layer2, net.layer3, net.layer4)
        self.trunk.to(self.device).eval()
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255

    def embed(self, views: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, 2048] unit vectors (pooled conv5)."""
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(views)).to(self.device)
            x = (x.permute(0, 3, 1, 2).float() - self.mean) / self.std
            x = x.contiguous(memory_format=torch.channels_last)  # NHWC: faster convolutions
            y = self.trunk(x).mean(dim=(2, 3))
            y = torch.nn.functional.normalize(y, dim=1)
            return y.float().cpu().numpy()

    def image_distances(self, images: Iterable[tuple[str, object]], cfg: StatsConfig,
                        prep_threads: int = 1) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (key, float32 [P] pair distances) per image, in input order.

        `images` gives (key, rgb array) or (key, function returning the array or None to
        skip). Loading and crops run on `prep_threads` helper threads while the model runs
        (1 on CPU, where the model needs the cores; more for a GPU); views of several images
        share one forward batch of about cfg.batch_views."""
        def prepare(item):
            key, source = item
            rgb = source() if callable(source) else source
            if rgb is None:
                return key, None
            boxes = crop_pairs(key, rgb.shape[1], rgb.shape[0], cfg)
            return key, render_views(rgb, boxes, cfg.size)

        pending_keys, pending_views = [], []
        with concurrent.futures.ThreadPoolExecutor(prep_threads) as pool:
            for key, views in _bounded_map(pool, prepare, images, 2 * prep_threads):
                if views is None:
                    continue
                pending_keys.append(key)
                pending_views.append(views)
                if sum(len(v) for v in pending_views) >= cfg.batch_views:
                    yield from self._flush(pending_keys, pending_views, cfg.pairs)
                    pending_keys, pending_views = [], []
            yield from self._flush(pending_keys, pending_views, cfg.pairs)

    def _flush(self, keys, views, pairs):
        if not keys:
            return
        z = self.embed(np.concatenate(views)).reshape(len(keys), pairs, 2, -1)
        d = pair_distance(z[:, :, 0], z[:, :, 1])
        yield from zip(keys, d)


def _bounded_map(pool, fn, items, ahead: int):
    """pool.map that keeps at most `ahead` results in flight (bounded memory)."""
    futures = []
    for item in items:
        futures.append(pool.submit(fn, item))
        if len(futures) > ahead:
            yield futures.pop(0).result()
    for f in futures:
        yield f.result()


def pair_distance(y1: np.ndarray, y2: np.ndarray) -> np.ndarray:
    """||y1 - y2||^2 over the last axis, clipped to [0, 4] against float rounding."""
    return np.clip(np.square(y1 - y2).sum(-1), 0.0, 4.0).astype(np.float32)


def summarise(d: np.ndarray) -> tuple[float, float | None, int]:
    """Per-image (mean, sample std or None for one pair, pairs)."""
    return (float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else None, int(len(d)))


# ---------------------------------------------------------------- per-batch stage
def add_stats(table: pa.Table, root: str | os.PathLike, model: ResNetDistance,
              cfg: StatsConfig, prep_threads: int = 1) -> pa.Table:
    """Fill the four stats columns of a table of proposals rows (needs key, source_path,
    status, width, height). Failed rows, and rows whose image cannot be read again or
    changed size since the proposals were made, get nulls and a message on stderr."""
    from preprocess.decode import load_rgb
    root = Path(root)
    rows = table.select(["key", "source_path", "status", "width", "height"]).to_pylist()

    def load(r):  # on a helper thread
        path = root / r["source_path"]
        try:
            rgb = load_rgb(path)
        except Exception as e:
            print(f"stats: {path}: cannot read ({e}); its distance stays null. Restore the "
                  "file or rerun `make proposals`.", file=sys.stderr, flush=True)
            return None
        if (rgb.shape[1], rgb.shape[0]) != (r["width"], r["height"]):
            print(f"stats: {path}: is {rgb.shape[1]}x{rgb.shape[0]} now, "
                  f"{r['width']}x{r['height']} when its proposals were made; its distance "
                  "stays null. Rerun `make proposals` for this dataset.", file=sys.stderr,
                  flush=True)
            return None
        return rgb

    images = ((r["key"], functools.partial(load, r)) for r in rows if r["status"] == "ok")
    found = {key: summarise(d) for key, d in model.image_distances(images, cfg, prep_threads)}
    stats = [found.get(r["key"], (None, None, None)) for r in rows]
    values = {
        "resnet_distance_mean": pa.array([s[0] for s in stats], pa.float32()),
        "resnet_distance_std": pa.array([s[1] for s in stats], pa.float32()),
        "resnet_distance_pairs": pa.array([s[2] for s in stats], pa.int32()),
        "stats_meaningful": pa.array([model.meaningful if s[0] is not None else None
                                      for s in stats], pa.bool_()),
    }
    for name, array in values.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, array)
        else:
            table = table.append_column(name, array)
    return table


class StatsActor:
    """Ray Data actor: loads the model once, then fills the stats columns batch by batch."""

    def __init__(self, root: str, cfg: dict, weights: str | None, random_weights: bool,
                 threads: int | None = None, prep_threads: int = 1):
        self.root, self.cfg, self.prep_threads = root, StatsConfig(**cfg), prep_threads
        self.model = ResNetDistance(weights, random_weights, threads=threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return add_stats(batch, self.root, self.model, self.cfg, self.prep_threads)


def stats_stage(ds, root: str | os.PathLike, cfg: StatsConfig, weights: str | None,
                random_weights: bool = False, *, cpu_share: float = 0.5, reserve_cpus: int = 1,
                batch_images: int = 8, actors: int | None = None):
    """Append the actor-pool stage to a ray.data.Dataset of proposals rows.

    With GPUs in the cluster: one actor per GPU, with up to 4 CPUs (half the CPUs per GPU)
    decoding and cropping so the GPU is not left waiting. Without: actors get `cpu_share`
    of the cluster's CPUs in total (at most 8 threads each), never all of them: an actor
    pool that takes every CPU starves the upstream read/map tasks and the job hangs
    silently (pipeline.md section 3)."""
    import ray
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus:
        prep = max(1, min(4, cpus // gpus // 2))
        per_actor = {"num_gpus": 1, "num_cpus": prep}
        threads, size = None, actors or gpus
    else:
        prep = 1
        budget = max(1, min(int(cpus * cpu_share), cpus - reserve_cpus))
        threads = min(8, budget)
        size = actors or max(1, budget // threads)
        per_actor = {"num_cpus": threads}
    return ds.map_batches(
        StatsActor, batch_size=batch_images, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=size),
        fn_constructor_kwargs={"root": str(root), "cfg": dataclasses.asdict(cfg),
                               "weights": None if weights is None else str(weights),
                               "random_weights": random_weights, "threads": threads,
                               "prep_threads": prep},
        **per_actor)


# ---------------------------------------------------------------- inside preprocess.job
def _resolve(mode: str, weights: str | None) -> str | None:
    """JSON of the stats params for `--stats mode`, or None when the stage is off."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--stats must be auto, on or off, not {mode!r}")
    if mode == "off" or (mode == "auto" and not weights_available(weights)):
        return None
    try:
        path = find_weights(weights)
    except MissingWeightsError as e:  # --stats on: a usage error of the job, said plainly
        raise ValueError(f"--stats on: {e}") from e
    stat = path.stat()
    name, digest = _describe_cached(str(path), stat.st_size, stat.st_mtime_ns)
    return json.dumps(StatsConfig().params(name, digest, True), sort_keys=True)


@functools.lru_cache(maxsize=8)
def _describe_cached(path: str, size: int, mtime_ns: int) -> tuple[str, str | None]:
    """Hash the 100 MB weights once per process (the driver asks twice per job)."""
    return describe_weights(Path(path))


def job_stats_params(config) -> dict | None:
    """For preprocess.job: the params["stats"] its parts record, or None when the ResNet
    distance is off (--stats off, or auto without weights: `make stats` can add it later)."""
    resolved = _resolve(getattr(config, "stats", "auto"), getattr(config, "weights", None))
    return None if resolved is None else json.loads(resolved)


def job_stage(ds, config, num_cpus):
    """preprocess.job STAGES entry: the actor pool when job_stats_params(config) is on."""
    params = job_stats_params(config)
    if params is None:
        return ds
    return stats_stage(ds, config.root, StatsConfig.from_params(params),
                       getattr(config, "weights", None), cpu_share=0.5)


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
              force=False, use_ray=True, work=None, batch_images=8) -> dict:
    """Compute or refresh the stats columns of every part of `dataset`; returns a summary."""
    folder, job = read_job(dataset, work)
    root = dataset_root(job, folder / "_job.json")
    weights_path = None if random_weights else find_weights(weights)
    name, digest = describe_weights(weights_path)
    stats_params = cfg.params(name, digest, not random_weights)
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
    for batch in _stats_batches(narrow, root, cfg, weights_path, random_weights, use_ray,
                                batch_images):
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


def _stats_batches(narrow, root, cfg, weights_path, random_weights, use_ray, batch_images):
    if not use_ray:
        model = ResNetDistance(weights_path, random_weights)
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
        ds = stats_stage(ds, root, cfg, weights_path, random_weights, cpu_share=1.0, reserve_cpus=0,
                         batch_images=batch_images)
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
    finally:
        if started_here:
            ray.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m preprocess.stats", description=__doc__.split(
        "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="name under WORK_DIR (sample, coco, ...)")
    ap.add_argument("--weights", default=None, help="ResNet-50 weights file (default: "
                    "$WEIGHTS, else the torch hub cache)")
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
                            random_weights=args.random_weights, force=args.force,
                            use_ray=not args.no_ray)
    except (MissingWeightsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    took = format_duration(summary.get("seconds", 0))
    print(f"[stats] done: {summary['parts_written']} parts written, {summary['parts_skipped']} "
          f"already current, {summary['with_stats']} images with a distance, "
          f"{summary['without_stats']} without (failed or unreadable), in {took}"
          + ("" if summary["stats"]["meaningful"] else "; RANDOM WEIGHTS: not meaningful"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

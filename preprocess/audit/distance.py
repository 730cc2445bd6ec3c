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
P = 1) and P. The same statistic runs through any backbone of `preprocess.audit.backbones`
(our exports and checkpoints, timm models): only the network changes, and the parts record
which one. `make stats` (preprocess.audit.stats) fills the columns of existing parts; the
Ray actor pool is in preprocess.audit.stage.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from preprocess.audit.backbones import Backbone, build, random_backbone, resolve

# MaskCo Table 1 (dataset means of the ResNet distance).
PAPER_TABLE1 = {"ImageNet": 0.1546, "ImageNet-10%": 0.1547, "COCO": 0.1814,
                "Conceptual Captions": 0.1782}
STATS_COLUMNS = ("resnet_distance_mean", "resnet_distance_std", "resnet_distance_pairs",
                 "stats_meaningful")
METHOD = "resnet50 layer4, global average pool, unit norm over channels, d = ||y1 - y2||^2"
METHOD_ANY = "backbone's pooled features, unit norm over channels, d = ||y1 - y2||^2"


@dataclasses.dataclass(frozen=True)
class StatsConfig:
    """Everything that determines the numbers; recorded in each part's params["stats"]."""
    seed: int = 0
    pairs: int = 4
    size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    batch_views: int = 32

    def params(self, backbone: Backbone) -> dict:
        """params["stats"] of the parts: the settings and the backbone (name + sha256).
        `weights`/`weights_sha256` keep their meaning for readers of older parts."""
        return {"method": METHOD if backbone.kind in ("torchvision", "random") else METHOD_ANY,
                "seed": self.seed, "pairs": self.pairs, "size": self.size,
                "scale": list(self.scale), "ratio": list(self.ratio),
                "weights": "random" if backbone.kind == "random" else Path(backbone.path).name,
                "weights_sha256": backbone.sha256, "meaningful": backbone.meaningful,
                "backbone": backbone.record()}

    @classmethod
    def from_params(cls, p: dict) -> "StatsConfig":
        return cls(seed=int(p["seed"]), pairs=int(p["pairs"]), size=int(p["size"]),
                   scale=tuple(p["scale"]), ratio=tuple(p["ratio"]))


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
class FeatureDistance:
    """A backbone's pooled, unit-normalised features of the views; built once, run in
    batches. `backbone` is a preprocess.audit.backbones.Backbone (default: torchvision's
    supervised ResNet-50 from `weights`/$WEIGHTS/the hub cache; `random_weights`: tests)."""

    def __init__(self, weights: str | os.PathLike | None = None, random_weights: bool = False,
                 device: str | None = None, threads: int | None = None, init_seed: int = 0,
                 backbone: Backbone | None = None):
        import torch
        if threads:
            torch.set_num_threads(int(threads))
        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if backbone is None:
            backbone = random_backbone(init_seed) if random_weights else resolve(None, weights)
        self.backbone = backbone
        self.meaningful = backbone.meaningful
        network = build(backbone)
        self.net = network.module.eval().to(self.device)
        self.pooled = network.pooled
        self.mean = torch.tensor(network.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(network.std, device=self.device).view(1, 3, 1, 1) * 255

    def embed(self, views: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, D] unit vectors (pooled last features)."""
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(views)).to(self.device)
            x = (x.permute(0, 3, 1, 2).float() - self.mean) / self.std
            x = x.contiguous(memory_format=torch.channels_last)  # NHWC: faster convolutions
            y = self.pooled(x)
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
def add_stats(table: pa.Table, root: str | os.PathLike, model: FeatureDistance,
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

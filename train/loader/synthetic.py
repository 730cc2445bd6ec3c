"""Tiny shards of synthetic images with objects of known colours, for tests and benches.

Each image is a grey background with non-overlapping axis-aligned rectangles, each a
distinct saturated colour, so after any crop, resize and flip (colour augmentation off)
every pixel can be classified back to its object and every box checked against the
pixels it should frame. The shards are written by the real writer (shards.write) from a
proposals part made here: KEY.jpg (quality 95, 4:4:4, kept as is), KEY.boxes (the
rectangles), KEY.fh.png (8-bit object ids, 0 = background), KEY.mcg.png (16-bit
bitfield: bit j-1 = object j, bit 15 = the whole image, ranked last), KEY.gt.png (16-bit
object ids), KEY.gt.json, KEY.json, with index.parquet, manifest.json and .idx files."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

PALETTE = np.array([(128, 128, 128), (220, 30, 30), (30, 200, 30), (30, 30, 220),
                    (220, 220, 30), (220, 30, 220), (30, 220, 220)], np.uint8)
SIZES = ((160, 120), (120, 160), (200, 100), (144, 144))


def draw_image(rng: np.random.Generator, width: int, height: int, n_objects: int):
    """(rgb, labels, rects): up to n_objects non-overlapping rectangles of >= 12 px."""
    labels = np.zeros((height, width), np.uint8)
    rects = []
    for _ in range(200):
        if len(rects) == n_objects:
            break
        w = int(rng.integers(12, max(13, width // 2)))
        h = int(rng.integers(12, max(13, height // 2)))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        if labels[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2].any():
            continue
        labels[y:y + h, x:x + w] = len(rects) + 1
        rects.append((x, y, x + w, y + h))
    return PALETTE[labels], labels, np.array(rects, np.float32).reshape(-1, 4)


def png(array: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", array)
    assert ok
    return data.tobytes()


def jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def proposals_row(key: str, relpath: str, data: bytes, labels, rects) -> dict:
    """A PROPOSALS row for one drawn image: its rectangles as boxes, object ids as the FH
    map (8-bit) and GT (16-bit), the bitfield with bit j-1 = object j, bit 15 = whole image."""
    bits = np.full(labels.shape, 1 << 15, np.uint16)
    obj = labels > 0
    bits[obj] |= (1 << (labels[obj].astype(np.uint16) - 1)).astype(np.uint16)
    h, w = labels.shape
    return {"key": key, "source_path": relpath, "status": "ok",
            "sha256": hashlib.sha256(data).hexdigest(), "width": w, "height": h,
            "boxes": rects.tolist(), "num_boxes": len(rects), "filter_rule": "synthetic",
            "fh_png": png(labels), "num_segments": int(labels.max()) + 1, "mcg_png": png(bits),
            "num_masks": 16, "mask_scores": [1.0] * 16,
            "gt_json": json.dumps({"width": w, "height": h, "annotations": []}),
            "gt_png": png(labels.astype(np.uint16))}


def pack(out_dir, images: list[tuple[str, bytes, np.ndarray, np.ndarray]], per_shard: int = 8,
         seed: int = 0, gt: bool = True) -> Path:
    """Shards of (key, JPEG bytes, object ids, rects) made by the real writer
    (shards.write): the source JPEGs and a proposals part go next to `out_dir`.
    gt=False packs no ground truth (no KEY.gt.png / KEY.gt.json)."""
    from schemas.proposals import PROPOSALS
    from shards.write import PackParams, write_shards
    out = Path(out_dir)
    raw, pdir = out.parent / f"{out.name}-raw", out.parent / f"{out.name}-proposals"
    raw.mkdir(parents=True, exist_ok=True)
    pdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for key, data, labels, rects in images:
        (raw / f"{key}.jpg").write_bytes(data)
        row = proposals_row(key, f"{key}.jpg", data, labels, rects)
        rows.append(row if gt else row | {"gt_json": None, "gt_png": None})
    pq.write_table(PROPOSALS.from_rows(rows, params={"synthetic": True}), pdir / "part-00000.parquet")
    (pdir / "_job.json").write_text(json.dumps({"root": str(raw), "complete": True}))
    write_shards("syn", PackParams(max_samples=per_shard, seed=seed), proposals=pdir, out=out,
                 root=raw, workers=1)
    return out


def write_shards(out_dir, n_images: int, per_shard: int = 8, seed: int = 0,
                 n_objects: int = 4, sizes=SIZES) -> Path:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n_images):
        w, h = sizes[i % len(sizes)]
        rgb, labels, rects = draw_image(rng, w, h, n_objects)
        images.append((f"syn{i:05d}", jpeg(rgb), labels, rects))
    return pack(out_dir, images, per_shard, seed)

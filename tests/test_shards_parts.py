"""Hand-built proposals parts over the built-in sample (no tests here; used by
tests/test_shards.py and by the `sample_shards` fixture until `sample_parts` exists).

Label maps hold values we choose, so round trips compare against known arrays."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq

from preprocess.datasets import list_images
from preprocess.decode import load_rgb
from schemas.proposals import PROPOSALS


def png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def expected_arrays(i: int, w: int, h: int) -> dict:
    """Label maps for image i: image 0 has > 255 segments (a 16-bit PNG), others 8-bit."""
    yy, xx = np.mgrid[0:h, 0:w]
    fh = (yy * w + xx) % 1000 if i == 0 else (yy // 16) * ((w + 15) // 16) + xx // 16
    masks = np.stack([xx < w // 2, yy < h // 3, (xx > w // 4) & (yy > h // 4)])
    bits = sum(m.astype(np.uint16) << k for k, m in enumerate(masks))
    gt_labels = np.zeros((h, w), np.uint16)
    gt_labels[h // 4:h // 2, w // 5:w // 2] = 1
    gt_labels[h // 2:, w // 2:] = 2
    boxes = np.array([[0, 0, w, h], [w / 4, h / 4, w * 0.75, h * 0.5 + 0.25]], np.float32)
    return {"fh": fh.astype(np.uint16 if i == 0 else np.uint8), "mcg_bits": bits.astype(np.uint16),
            "masks": masks, "gt_labels": gt_labels, "boxes": boxes}


def build_parts(raw_root: Path, pdir: Path, keys_override: dict | None = None,
                kind: str = "sample", split: str | None = None, only: set | None = None) -> dict:
    """Two PROPOSALS parts over a dataset's images (the 4th row failed); returns
    expectations. `only` restricts to those keys."""
    records = [r for r in list_images(kind, raw_root, split) if only is None or r.key in only]
    rows, expected = [], {}
    for i, rec in enumerate(records):
        key = (keys_override or {}).get(rec.key, rec.key)
        if i == 3:
            rows.append({"key": key, "source_path": rec.relpath, "status": "failed",
                         "error": "decode: made-up failure for the test"})
            continue
        rgb = load_rgb(rec.path)
        h, w = rgb.shape[:2]
        arrays = expected_arrays(i, w, h)
        gt = {"annotations": rec.gt} if rec.gt else None
        rows.append({
            "key": key, "source_path": rec.relpath, "status": "ok",
            "sha256": hashlib.sha256(Path(rec.path).read_bytes()).hexdigest(),
            "width": w, "height": h, "boxes": arrays["boxes"].tolist(), "num_boxes": 2,
            "filter_rule": "soco", "fh_png": png(arrays["fh"]), "num_segments": int(arrays["fh"].max()) + 1,
            "mcg_png": png(arrays["mcg_bits"]), "num_masks": 3, "mask_scores": [0.9, 0.5, 0.25],
            "gt_json": json.dumps(gt) if gt else None,
            "gt_png": png(arrays["gt_labels"]) if gt else None,
            "resnet_distance_mean": 0.5 + i, "stats_meaningful": False,
        })
        expected[key] = arrays | {"rgb": rgb, "path": rec.path, "gt": gt, "label": rec.label}
    pdir.mkdir(parents=True, exist_ok=True)
    half = len(rows) // 2
    for n, chunk in enumerate((rows[:half], rows[half:])):
        pq.write_table(PROPOSALS.from_rows(chunk, params={"test": True}),
                       pdir / f"part-{n:05d}.parquet")
    (pdir / "_job.json").write_text(json.dumps({"root": str(raw_root), "dataset": kind,
                                                "complete": True}))
    return {"expected": expected, "failed": rows[3]["key"], "n_rows": len(rows)}

"""Tiny shards of synthetic images with objects of known colours, for tests and benches.

Each image is a grey background with non-overlapping axis-aligned rectangles, each a
distinct saturated colour, so after any crop, resize and flip (colour augmentation off)
every pixel can be classified back to its object and every box checked against the
pixels it should frame. Members follow the shard contract (docs/interfaces.md):
KEY.jpg (quality 95, 4:4:4), KEY.boxes (the rectangles, float32 LE), KEY.fh.png
(8-bit object ids, 0 = background), KEY.mcg.png (16-bit bitfield: bit j-1 = object j,
bit 15 = the whole image, ranked last), KEY.gt.png (16-bit object ids), KEY.json;
plus a DALI v1.2 index per tar. Real data shards come from `shards/` (make shards)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
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


def sample_members(key: str, rgb, labels, rects) -> list[tuple[str, bytes]]:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, subsampling=0)
    bits = np.full(labels.shape, 1 << 15, np.uint16)
    obj = labels > 0
    bits[obj] |= (1 << (labels[obj].astype(np.uint16) - 1)).astype(np.uint16)
    h, w = labels.shape
    meta = {"key": key, "width": w, "height": h, "source_path": f"synthetic/{key}",
            "num_boxes": len(rects), "num_segments": int(labels.max()) + 1, "num_masks": len(rects) + 1,
            "label": None}
    return [("jpg", buf.getvalue()), ("boxes", rects.astype("<f4").tobytes()),
            ("fh.png", png(labels)), ("mcg.png", png(bits)), ("gt.png", png(labels.astype(np.uint16))),
            ("json", json.dumps(meta).encode())]


def write_tar(path: Path, samples: list[tuple[str, list]]) -> None:
    """A GNU tar plus its DALI v1.2 index (`path` with suffix .idx)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
    lines, key = [], None
    with tarfile.open(path) as tar:  # offsets as tarfile laid them out
        for m in tar.getmembers():
            k, _, ext = m.name.partition(".")
            if k != key:
                lines.append("")
                key = k
            lines[-1] += f"{' ' if lines[-1] else ''}{ext} {m.offset_data} {m.size} {m.name}"
    path.with_suffix(".idx").write_text(f"v1.2 {len(lines)}\n" + "".join(l + "\n" for l in lines))


def write_shards(out_dir, n_images: int, per_shard: int = 8, seed: int = 0,
                 n_objects: int = 4, sizes=SIZES) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n_images):
        w, h = sizes[i % len(sizes)]
        samples.append((f"syn{i:05d}", sample_members(f"syn{i:05d}", *draw_image(rng, w, h, n_objects))))
    for s in range(0, n_images, per_shard):
        write_tar(out / f"syn-{s // per_shard:06d}.tar", samples[s:s + per_shard])
    return out

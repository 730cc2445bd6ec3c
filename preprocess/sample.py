"""The built-in `sample` dataset: synthetic scene and object-centric images with exact ground truth.

Why synthetic: tests and the demo need images with known boxes and masks on every machine,
without downloading anything. Scene images hold several textured shapes of varied scale over
a textured background, painted in order so later shapes occlude earlier ones; the
object-centric subset holds one dominant shape. Ground truth is the *visible* part of each
shape, written as COCO instances JSON with exact uncompressed-RLE masks, so the COCO reader
serves both. Every image draws from its own RNG stream (seed, index), so output is
byte-identical for the same seed and image i does not depend on how many images are made.

    python -m preprocess.sample --out DIR [--scene 48] [--object 16] [--seed 0]
"""
from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common.io import atomic_write_bytes, atomic_write_text
from common.progress import Progress

CATEGORIES = [
    {"id": 1, "name": "ellipse", "supercategory": "shape"},
    {"id": 2, "name": "rectangle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "star", "supercategory": "shape"},
]
ANNOTATION_FILE = "annotations/instances_sample.json"
JPEG_QUALITY = 92
MIN_VISIBLE_PIXELS = 64  # shapes occluded below this are dropped from the ground truth


# ---------------------------------------------------------------- masks <-> COCO RLE
def rle_encode(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths over the column-major flattening, zeros first."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


# ---------------------------------------------------------------- drawing
def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 3) -> np.ndarray:
    """Low-frequency random colour field: a coarse random grid upsampled bicubically."""
    grid = rng.uniform(0, 255, size=(cells, cells, channels)).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32)


def _pattern(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A periodic pattern in [0, 1]: stripes at an angle, a checkerboard, dots, or flat."""
    kind = rng.integers(0, 4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = float(rng.uniform(6, 24))
    if kind == 0:
        angle = rng.uniform(0, math.pi)
        return (np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period) > 0).astype(np.float32)
    if kind == 1:
        return ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
    if kind == 2:
        return ((((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2)
                < (period / 4) ** 2).astype(np.float32)
    return np.zeros((h, w), np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = _smooth_field(rng, h, w, cells=int(rng.integers(3, 7)))
    base = 0.6 * base + 0.4 * rng.uniform(40, 215)  # muted, so shapes stand out a little
    texture = _pattern(rng, h, w)[..., None] * rng.uniform(-35, 35, size=3)
    return base + texture


def _shape_polygon(rng: np.random.Generator, kind: int, cx: float, cy: float, size: float) -> list[tuple[float, float]]:
    """Vertices of a shape of about `size` pixels across, rotated at random."""
    angle = rng.uniform(0, 2 * math.pi)
    aspect = rng.uniform(0.6, 1.6)
    rx, ry = size / 2 * math.sqrt(aspect), size / 2 / math.sqrt(aspect)
    if kind == 1:      # ellipse
        ts = np.linspace(0, 2 * math.pi, 72, endpoint=False)
        pts = [(rx * math.cos(t), ry * math.sin(t)) for t in ts]
    elif kind == 2:    # rectangle
        pts = [(-rx, -ry), (rx, -ry), (rx, ry), (-rx, ry)]
    elif kind == 3:    # triangle
        pts = [(rx * math.cos(t), ry * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:              # five-pointed star
        pts = [((rx if i % 2 == 0 else 0.45 * rx) * math.cos(i * math.pi / 5),
                (ry if i % 2 == 0 else 0.45 * ry) * math.sin(i * math.pi / 5)) for i in range(10)]
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def _shape_mask(h: int, w: int, polygon) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=1)
    return np.asarray(canvas, dtype=bool)


def _shape_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    colour_a = rng.uniform(0, 255, size=3)
    colour_b = np.clip(colour_a + rng.uniform(-120, 120, size=3), 0, 255)
    mix = _pattern(rng, h, w)[..., None]
    return colour_a * (1 - mix) + colour_b * mix


def render_image(seed: int, index: int, object_centric: bool, min_side: int, max_side: int):
    """One image and its shapes' visible masks: (uint8 HxWx3, [(category_id, mask)])."""
    rng = np.random.default_rng([seed, index])
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    image = _background(rng, h, w)
    scale = math.sqrt(w * h)
    if object_centric:
        plans = [(int(rng.integers(1, 5)), rng.uniform(0.4, 0.6) * w, rng.uniform(0.4, 0.6) * h,
                  rng.uniform(0.5, 0.8) * scale)]
    else:
        plans = [(int(rng.integers(1, 5)), rng.uniform(0, w), rng.uniform(0, h),
                  math.exp(rng.uniform(math.log(0.12), math.log(0.6))) * scale)
                 for _ in range(int(rng.integers(3, 8)))]
    masks = []
    for kind, cx, cy, size in plans:
        mask = _shape_mask(h, w, _shape_polygon(rng, kind, cx, cy, size))
        ys, xs = np.nonzero(mask)
        if ys.size:  # texture only the shape's bounding box: cheaper than the full image
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            tex = _shape_texture(rng, int(y1 - y0), int(x1 - x0))
            image[y0:y1, x0:x1][mask[y0:y1, x0:x1]] = tex[mask[y0:y1, x0:x1]]
        masks.append((kind, mask))
    image += rng.normal(0, 4, size=image.shape)
    visible, covered = [], np.zeros((h, w), bool)
    for kind, mask in reversed(masks):   # later shapes sit on top
        vis = mask & ~covered
        covered |= mask
        if vis.sum() >= MIN_VISIBLE_PIXELS:
            visible.append((kind, vis))
    visible.reverse()
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), visible


def _annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray) -> dict:
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
            "area": int(mask.sum()),
            "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
            "segmentation": rle_encode(mask)}


def generate(out_dir, n_scene: int = 48, n_object: int = 16, seed: int = 0,
             min_side: int = 320, max_side: int = 640) -> Path:
    """Write out_dir/images/*.jpg and out_dir/annotations/instances_sample.json; return out_dir.

    Images 1..n_scene are scenes, the next n_object are object-centric. Boxes are COCO
    xywh of the visible mask's pixel extent (half-open: x + w is one past the last pixel)."""
    if n_scene < 0 or n_object < 0 or n_scene + n_object == 0:
        raise ValueError(f"sample: need at least one image, got --scene {n_scene} --object {n_object}")
    if not 16 <= min_side <= max_side:
        raise ValueError(f"sample: need 16 <= min_side <= max_side, got {min_side}, {max_side}")
    out_dir = Path(out_dir)
    images, annotations = [], []
    progress = Progress("sample", n_scene + n_object)
    for index in range(n_scene + n_object):
        image_id = index + 1
        object_centric = index >= n_scene
        rgb, shapes = render_image(seed, index, object_centric, min_side, max_side)
        name = f"{image_id:012d}.jpg"
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=JPEG_QUALITY)
        atomic_write_bytes(out_dir / "images" / name, buf.getvalue())
        images.append({"id": image_id, "file_name": name, "height": rgb.shape[0], "width": rgb.shape[1],
                       "subset": "object" if object_centric else "scene"})
        for kind, mask in shapes:
            annotations.append(_annotation(len(annotations) + 1, image_id, kind, mask))
        progress.update()
    doc = {"info": {"description": "regionssl built-in synthetic sample", "seed": seed,
                    "scene": n_scene, "object": n_object, "min_side": min_side, "max_side": max_side},
           "images": images, "annotations": annotations, "categories": CATEGORIES}
    atomic_write_text(out_dir / ANNOTATION_FILE, json.dumps(doc, sort_keys=True, separators=(",", ":")))
    print(f"[sample] wrote {len(images)} images ({n_scene} scene, {n_object} object-centric), "
          f"{len(annotations)} annotations to {out_dir}", flush=True)
    return out_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="dataset root to write (images/, annotations/)")
    p.add_argument("--scene", type=int, default=48, help="number of scene images")
    p.add_argument("--object", type=int, default=16, help="number of object-centric images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-side", type=int, default=320)
    p.add_argument("--max-side", type=int, default=640)
    a = p.parse_args(argv)
    generate(a.out, a.scene, a.object, a.seed, a.min_side, a.max_side)


if __name__ == "__main__":
    main()

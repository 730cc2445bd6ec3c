"""Crop, flip and box arithmetic shared by every recipe, plus the samplers that need it.

Coordinates: boxes are x1y1x2y2 in continuous pixel units, half-open (pixel i spans
[i, i+1)), origin top-left, as stored in the shards. A `View` is a crop of the source
image (x0, y0, w, h) resized to (out_w, out_h) and optionally mirrored; mapping a box
into a view is then an affine map plus a clip, exact for every recipe. Random draws
take a numpy Generator so a sample's augmentation is a pure function of its seed."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shards.format import bitfield_labels

RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class View:
    x0: float
    y0: float
    w: float
    h: float
    out_w: int
    out_h: int
    flip: bool

    @property
    def rect(self) -> np.ndarray:
        """The crop as a box in source pixels."""
        return np.array([self.x0, self.y0, self.x0 + self.w, self.y0 + self.h], np.float32)

    @property
    def scale(self) -> tuple[float, float]:
        return self.out_w / self.w, self.out_h / self.h


def rrc(rng: np.random.Generator, width: int, height: int, scale, ratio=RATIO):
    """RandomResizedCrop's window (x0, y0, w, h): torchvision's algorithm, 10 tries, then
    the largest centred crop whose aspect ratio lies within `ratio`."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def to_view(boxes: np.ndarray, view: View) -> np.ndarray:
    """Source-pixel boxes -> view-pixel boxes, clipped to the view, mirrored with it."""
    sx, sy = view.scale
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    out = np.empty_like(b)
    out[:, [0, 2]] = np.clip((b[:, [0, 2]] - view.x0) * sx, 0, view.out_w)
    out[:, [1, 3]] = np.clip((b[:, [1, 3]] - view.y0) * sy, 0, view.out_h)
    if view.flip:
        out[:, [0, 2]] = view.out_w - out[:, [2, 0]]
    return out


def to_source(boxes: np.ndarray, view: View) -> np.ndarray:
    """View-pixel boxes -> source pixels (inverse of `to_view` without the clip)."""
    sx, sy = view.scale
    b = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    if view.flip:
        b[:, [0, 2]] = view.out_w - b[:, [2, 0]]
    b[:, [0, 2]] = b[:, [0, 2]] / sx + view.x0
    b[:, [1, 3]] = b[:, [1, 3]] / sy + view.y0
    return b


def intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection rectangle of two boxes (may be empty: x2 <= x1)."""
    return np.concatenate([np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])])


def area(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def overlapping(boxes: np.ndarray, rect: np.ndarray) -> np.ndarray:
    """Boxes with a non-empty (strict) overlap with `rect`."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    return ((b[:, 0] < rect[2]) & (b[:, 2] > rect[0]) & (b[:, 1] < rect[3]) & (b[:, 3] > rect[1]))


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box against many."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    inter = area(np.concatenate([np.maximum(box[:2], boxes[:, :2]),
                                 np.minimum(box[2:], boxes[:, 2:])], axis=1))
    return inter / np.maximum(area(box[None])[0] + area(boxes) - inter, 1e-9)


def jitter(rng: np.random.Generator, boxes: np.ndarray, prob: float, ratio: float) -> np.ndarray:
    """SoCo's V1 box jitter: each box with probability `prob` gets
    x1 += u1*w, y1 += u2*h, w *= 1+u3, h *= 1+u4 with u ~ U(-ratio, ratio)."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    u = rng.uniform(-ratio, ratio, size=(len(b), 4)).astype(np.float32)
    hit = rng.random(len(b)) < prob
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    x1, y1 = b[:, 0] + u[:, 0] * w, b[:, 1] + u[:, 1] * h
    out = np.stack([x1, y1, x1 + w * (1 + u[:, 2]), y1 + h * (1 + u[:, 3])], axis=1)
    b[hit] = out[hit]
    return b


def choose_shared(rng: np.random.Generator, candidates: np.ndarray, k: int) -> np.ndarray:
    """SoCo's selection: k of the candidates without replacement (all if fewer), then
    padded to k by resampling the chosen ones with replacement."""
    chosen = rng.choice(candidates, size=min(k, len(candidates)), replace=False)
    if len(chosen) < k:
        chosen = np.concatenate([chosen, rng.choice(chosen, size=k - len(chosen), replace=True)])
    return chosen.astype(np.int64)


def random_boxes(rng: np.random.Generator, n: int, region: np.ndarray, side: tuple) -> np.ndarray:
    """n boxes with sides ~ U(side) (shrunk to fit) placed uniformly inside `region`."""
    rw, rh = float(region[2] - region[0]), float(region[3] - region[1])
    w = np.minimum(rng.uniform(side[0], side[1], n), rw)
    h = np.minimum(rng.uniform(side[0], side[1], n), rh)
    x1 = region[0] + rng.random(n) * (rw - w)
    y1 = region[1] + rng.random(n) * (rh - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


def maskco_boxes(rng: np.random.Generator, overlap: np.ndarray, view_size: int, n: int,
                 side: tuple, max_iou: float, rounds: int = 8) -> np.ndarray:
    """MaskCo's key-view boxes: box 0 inside `overlap` (the part of the key view the query
    view also sees, so its projection is whole), boxes 1..n-1 anywhere in the view with
    IoU < max_iou to box 0. If that is impossible after `rounds` batches of candidates
    (tiny views), the lowest-IoU candidates fill the rest."""
    box0 = random_boxes(rng, 1, overlap, side)[0]
    full = np.array([0, 0, view_size, view_size], np.float32)
    kept, spare = [], []
    for _ in range(rounds):
        cand = random_boxes(rng, 4 * n, full, side)
        ok = iou(box0, cand) < max_iou
        kept += list(cand[ok])
        spare += list(cand[~ok])
        if len(kept) >= n - 1:
            break
    if len(kept) < n - 1:
        spare = np.array(spare)
        kept += list(spare[np.argsort(iou(box0, spare))][: n - 1 - len(kept)])
    return np.concatenate([box0[None], np.array(kept[: n - 1], np.float32)])


def mcg_labels(bitfield: np.ndarray) -> np.ndarray:
    """MCG-style bitfield -> DetCon's label map (shards.format.bitfield_labels: the
    best-ranked mask covering a pixel, as id i+1; 0 = no mask)."""
    return bitfield_labels(bitfield)


def grid_labels(height: int, width: int, rows: int, cols: int) -> np.ndarray:
    """DetCon's spatial-grid heuristic: a rows x cols grid over the source image, ids 1.."""
    r = np.minimum(np.arange(height) * rows // height, rows - 1)
    c = np.minimum(np.arange(width) * cols // width, cols - 1)
    return (r[:, None] * cols + c[None, :] + 1).astype(np.uint16)

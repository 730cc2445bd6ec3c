"""Selective-search proposals (OpenCV ximgproc) with SoCo's filter and fallbacks.

Why OpenCV and a downscaled copy: SoCo ran a pure-Python selective search at full resolution
(days of CPU on ImageNet). OpenCV's C++ version on a copy whose longer side is at most
`max_side` is many times faster; boxes are mapped back to original pixels, so the filter
and everything downstream see original coordinates. The default `max_side` was chosen with
`make bench-preprocess` (see README, "Preprocessing").

Boxes are float32 x1,y1,x2,y2, half-open, in pixels of the (EXIF-oriented) original.
SoCo's filter (`ratio3size0308`): w >= 32 and h >= 32; 1/3 <= w/h <= 3;
0.3 <= sqrt(wh / WH) <= 0.8. Box order: OpenCV's order is partly random and cannot be
seeded, so boxes come in a fixed pseudo-random order (deterministic_order). Fallbacks when nothing passes, in order: ratio only (with the
32 px minimum), size only (the 32 px minimum), whole image. Comparisons are exact at the
edges: ratios and scales are compared as products with rational parameters, no division.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction

import cv2
import numpy as np

RULES = ("soco", "ratio_only", "size_only", "whole_image")
MODES = ("fast", "quality", "single")
MIN_SIDE_FOR_SEARCH = 8  # below this selective search has nothing to group: whole image only


@dataclass(frozen=True)
class ProposalParams:
    mode: str = "fast"            # OpenCV strategy: fast (default), quality, single
    max_side: int = 200           # longer side of the copy searched (bench-preprocess); 0 = full
    max_boxes: int = 200          # cap after filtering, generator order kept
    min_box: float = 32.0         # w and h >= this, original pixels
    max_ratio: float = 3.0        # 1/max_ratio <= w/h <= max_ratio
    min_scale: float = 0.3        # sqrt(wh/WH) bounds
    max_scale: float = 0.8

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"proposal mode {self.mode!r} unknown; use one of {MODES}")
        if self.max_boxes < 1 or self.max_side < 0:
            raise ValueError("max_boxes must be >= 1 and max_side >= 0 (0 = full resolution)")

    def as_dict(self) -> dict:
        return asdict(self)


def downscale_factor(width: int, height: int, max_side: int) -> float:
    """Factor in (0, 1] that brings the longer side to max_side (1 = no resize)."""
    longest = max(width, height)
    return 1.0 if max_side <= 0 or longest <= max_side else max_side / longest


def resized_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    s = downscale_factor(width, height, max_side)
    return max(1, round(width * s)), max(1, round(height * s))


def map_boxes(boxes: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Scale half-open x1,y1,x2,y2 boxes between two sizes of one image (per-axis factors,
    so pixel edges map to pixel edges exactly even after rounding of the resized size)."""
    fx = to_size[0] / from_size[0]
    fy = to_size[1] / from_size[1]
    out = np.asarray(boxes, dtype=np.float64) * np.array([fx, fy, fx, fy])
    out[:, 0::2] = np.clip(out[:, 0::2], 0, to_size[0])
    out[:, 1::2] = np.clip(out[:, 1::2], 0, to_size[1])
    return out.astype(np.float32)


def selective_search(rgb: np.ndarray, mode: str = "fast", max_side: int = ProposalParams.max_side) -> np.ndarray:
    """Raw proposals in generator order, float32 x1,y1,x2,y2 in the original's pixels."""
    height, width = rgb.shape[:2]
    if min(width, height) < MIN_SIDE_FOR_SEARCH:
        return np.zeros((0, 4), np.float32)
    small_size = resized_size(width, height, max_side)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    if small_size != (width, height):
        bgr = cv2.resize(bgr, small_size, interpolation=cv2.INTER_AREA)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(bgr)
    {"fast": search.switchToSelectiveSearchFast,
     "quality": search.switchToSelectiveSearchQuality,
     "single": search.switchToSingleStrategy}[mode]()
    rects = deterministic_order(np.asarray(search.process(), dtype=np.int64).reshape(-1, 4))
    rects = rects.astype(np.float64)  # x, y, w, h; w and h are extents (half-open)
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    return map_boxes(boxes, small_size, (width, height))


def deterministic_order(rects: np.ndarray) -> np.ndarray:
    """Reorder OpenCV's output by a hash of each rect (ties by the rect itself).

    OpenCV ranks regions by hierarchy level times a random number from an RNG we cannot
    seed, so its order changes from run to run (the set of rects does not). A hash order
    keeps that order's purpose (the cap takes an unbiased subset, not the largest or the
    leftmost boxes) and makes reruns give identical rows."""
    if len(rects) == 0:
        return rects
    r = rects.astype(np.uint64)
    mixed = (r[:, 0] * np.uint64(0x9E3779B1) ^ r[:, 1] * np.uint64(0x85EBCA77)
             ^ r[:, 2] * np.uint64(0xC2B2AE3D) ^ r[:, 3] * np.uint64(0x27D4EB2F)) * np.uint64(0x165667B1)
    key = (mixed >> np.uint64(13)) & np.uint64(0xFFFFFFFF)
    return rects[np.lexsort((rects[:, 3], rects[:, 2], rects[:, 1], rects[:, 0], key))]


def _frac(x: float) -> Fraction:
    return Fraction(str(x))


def rule_masks(boxes: np.ndarray, width: int, height: int, p: ProposalParams) -> dict[str, np.ndarray]:
    """Boolean keep-masks of each filter rule over `boxes` (exact at the edges)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    size_ok = (w >= p.min_box) & (h >= p.min_box)
    r = _frac(p.max_ratio)  # 1/r <= w/h <= r  <=>  r*w >= h and w <= r*h (h > 0 from size_ok)
    ratio_ok = (w * r.numerator >= h * r.denominator) & (w * r.denominator <= h * r.numerator)
    lo, hi = _frac(p.min_scale) ** 2, _frac(p.max_scale) ** 2  # on wh / WH, squared bounds
    area, image_area = w * h, float(width * height)
    scale_ok = ((area * lo.denominator >= image_area * lo.numerator)
                & (area * hi.denominator <= image_area * hi.numerator))
    return {"soco": size_ok & ratio_ok & scale_ok, "ratio_only": size_ok & ratio_ok, "size_only": size_ok}


def unique_in_order(boxes: np.ndarray) -> np.ndarray:
    """Drop exact duplicates, keeping each box's first position."""
    if len(boxes) == 0:
        return boxes
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)]


def filter_boxes(boxes: np.ndarray, width: int, height: int, p: ProposalParams) -> tuple[np.ndarray, str]:
    """SoCo's filter then its fallbacks; returns (boxes, rule that produced them)."""
    boxes = unique_in_order(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    masks = rule_masks(boxes, width, height, p)
    for rule in RULES[:-1]:
        kept = boxes[masks[rule]]
        if len(kept):
            return kept[: p.max_boxes], rule
    return np.array([[0, 0, width, height]], dtype=np.float32), "whole_image"


def propose(rgb: np.ndarray, p: ProposalParams = ProposalParams()) -> tuple[np.ndarray, str, int]:
    """Filtered proposals for one image: (boxes float32 [N>=1, 4], rule, raw proposal count)."""
    raw = selective_search(rgb, p.mode, p.max_side)
    boxes, rule = filter_boxes(raw, rgb.shape[1], rgb.shape[0], p)
    return boxes, rule, len(raw)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of half-open x1,y1,x2,y2 boxes, shape [len(a), len(b)]."""
    a = np.asarray(a, np.float64).reshape(-1, 1, 4)
    b = np.asarray(b, np.float64).reshape(1, -1, 4)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-12)


def recall(proposals: np.ndarray, gt_boxes: np.ndarray, iou: float = 0.5) -> tuple[int, int]:
    """(ground-truth boxes matched by some proposal at IoU >= iou, ground-truth boxes)."""
    if len(gt_boxes) == 0:
        return 0, 0
    if len(proposals) == 0:
        return 0, len(gt_boxes)
    return int((box_iou(gt_boxes, proposals).max(axis=1) >= iou).sum()), len(gt_boxes)

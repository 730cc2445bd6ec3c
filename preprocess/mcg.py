"""MCG-style masks: our own multiscale combinatorial grouping, DetCon's second mask source.

This is NOT MCG. Real MCG (Arbelaez et al.) is MATLAB code with trained structured-edge
models and a learned ranker, none of which we can ship. What we do, in the same spirit:

1. Segment a small copy (longer side `work_side`) with Felzenszwalb-Huttenlocher at several
   scales (`scales`, FH k on 0-255 pixels at the working size).
2. At each scale, build a hierarchy by greedily merging the adjacent pair of regions with
   the lowest cost  = Lab colour distance of their means + `size_weight` * 100 * (their
   joint area / image area)  (small, similar regions merge first). Every base region and
   every merge is a candidate; the whole image is not.
3. Rank candidates by  score = contrast * fill * size_prior  where
   contrast   = d / (d + 20), d = Lab distance between the mean inside the mask and the mean
                of a ring `ring` pixels wide just outside it (object-like masks stand out);
   fill       = mask area / its bounding-box area (compact masks over ragged ones);
   size_prior = min(1, sqrt(area/WH) / 0.1), and 0 above sqrt(area/WH) = 0.95 (no
                near-whole-image masks).
4. Walk the ranking and drop a candidate whose mask IoU with an already kept one exceeds
   `max_iou` (near-duplicates); keep at most `max_masks` (<= 16). Kept masks may overlap
   (a merge and its parts can both survive).

Masks are upsampled to the original size with nearest neighbour and stored as one 16-bit
PNG bitfield: bit i of a pixel is set when mask i (rank i, best first) covers it (decoded by
shards.format.decode_bitfield_png, the one reader of the format).
"""
from __future__ import annotations

import heapq
import io
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from PIL import Image

from preprocess.proposals import resized_size
from preprocess.segments import felzenszwalb, relabel_in_order

MAX_BITS = 16


@dataclass(frozen=True)
class MaskParams:
    work_side: int = 160
    scales: tuple[float, ...] = (100.0, 300.0, 800.0)
    sigma: float = 0.8
    min_size_fraction: float = 0.002  # FH min_size as a fraction of the working image's area
    size_weight: float = 1.0
    ring: int = 3
    max_iou: float = 0.7
    max_masks: int = 16

    def __post_init__(self):
        if not 1 <= self.max_masks <= MAX_BITS:
            raise ValueError(f"max_masks must be 1..{MAX_BITS} (one bit of a 16-bit PNG each)")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MaskParams":
        """Inverse of as_dict after a JSON round trip (lists back to tuples)."""
        return cls(**{**d, "scales": tuple(d["scales"])})


def _adjacent_pairs(labels: np.ndarray) -> np.ndarray:
    h_pairs = np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], 1)
    v_pairs = np.stack([labels[:-1, :].ravel(), labels[1:, :].ravel()], 1)
    pairs = np.concatenate([h_pairs, v_pairs])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return np.unique(np.sort(pairs, axis=1), axis=0)


def hierarchy(labels: np.ndarray, lab: np.ndarray, size_weight: float) -> list[tuple[int, ...]]:
    """Candidate regions (tuples of base ids) of one segmentation: bases + greedy merges."""
    n = int(labels.max()) + 1
    counts = np.bincount(labels.ravel(), minlength=n).astype(np.float64)
    sums = np.stack([np.bincount(labels.ravel(), weights=lab[..., c].ravel(), minlength=n) for c in range(3)], 1)
    total = float(labels.size)
    members = {i: (i,) for i in range(n)}
    size = {i: counts[i] for i in range(n)}
    colour = {i: sums[i] for i in range(n)}
    neighbours: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b in _adjacent_pairs(labels):
        neighbours[int(a)].add(int(b))
        neighbours[int(b)].add(int(a))

    def cost(a: int, b: int) -> float:
        d = float(np.linalg.norm(colour[a] / size[a] - colour[b] / size[b]))
        return d + size_weight * 100.0 * (size[a] + size[b]) / total

    heap = [(cost(a, b), a, b) for a in neighbours for b in neighbours[a] if a < b]
    heapq.heapify(heap)
    candidates = [members[i] for i in range(n)]
    next_id = n
    while heap:
        _, a, b = heapq.heappop(heap)
        if a not in members or b not in members:
            continue  # stale entry: one side was merged already
        new = next_id
        next_id += 1
        members[new] = tuple(sorted(members.pop(a) + members.pop(b)))
        size[new], colour[new] = size.pop(a) + size.pop(b), colour.pop(a) + colour.pop(b)
        neighbours[new] = (neighbours.pop(a) | neighbours.pop(b)) - {a, b}
        for c in neighbours[new]:
            neighbours[c] -= {a, b}
            neighbours[c].add(new)
            heapq.heappush(heap, (cost(new, c), min(new, c), max(new, c)))
        if len(members) > 1:  # the last merge is the whole image: not a candidate
            candidates.append(members[new])
    return candidates


def score_mask(mask: np.ndarray, lab: np.ndarray, ring: int) -> float:
    """The documented ranking score: contrast * fill * size_prior."""
    area = int(mask.sum())
    if area == 0:
        return 0.0
    r = np.sqrt(area / mask.size)
    if r > 0.95:
        return 0.0
    size_prior = min(1.0, r / 0.1)
    ys, xs = np.nonzero(mask)
    fill = area / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((2 * ring + 1, 2 * ring + 1), np.uint8)).astype(bool)
    outside = grown & ~mask
    if not outside.any():
        return 0.0
    d = float(np.linalg.norm(lab[mask].mean(0) - lab[outside].mean(0)))
    return d / (d + 20.0) * fill * size_prior


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def mcg_masks(rgb: np.ndarray, p: MaskParams = MaskParams()) -> tuple[np.ndarray, np.ndarray]:
    """(masks bool [K, H, W] at the original size, best first; scores float32 [K]), K <= 16."""
    height, width = rgb.shape[:2]
    small_size = resized_size(width, height, p.work_side)
    small = rgb if small_size == (width, height) else cv2.resize(rgb, small_size, interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
    min_size = max(1, round(p.min_size_fraction * small_size[0] * small_size[1]))
    seen: set[bytes] = set()
    scored: list[tuple[float, int, np.ndarray]] = []
    for scale in p.scales:
        labels = relabel_in_order(felzenszwalb(small, scale, p.sigma, min_size)).astype(np.int64)
        for group in hierarchy(labels, lab, p.size_weight):
            mask = np.isin(labels, group)
            fingerprint = np.packbits(mask).tobytes()
            if fingerprint in seen:
                continue  # the same region found at another scale
            seen.add(fingerprint)
            s = score_mask(mask, lab, p.ring)
            if s > 0:
                scored.append((s, len(scored), mask))
    scored.sort(key=lambda t: (-t[0], t[1]))  # stable tie-break: discovery order
    kept: list[tuple[float, np.ndarray]] = []
    for s, _, mask in scored:
        if all(mask_iou(mask, other) <= p.max_iou for _, other in kept):
            kept.append((s, mask))
            if len(kept) == p.max_masks:
                break
    if not kept:
        return np.zeros((0, height, width), bool), np.zeros(0, np.float32)
    masks = np.stack([m for _, m in kept])
    if small_size != (width, height):
        masks = np.stack([cv2.resize(m.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
                          for m in masks]).astype(bool)
    return masks, np.array([s for s, _ in kept], np.float32)


def encode_bitfield_png(masks: np.ndarray) -> bytes:
    """16-bit PNG, bit i set where mask i covers the pixel (masks bool [K<=16, H, W])."""
    k = len(masks)
    if k > MAX_BITS:
        raise ValueError(f"{k} masks do not fit a 16-bit bitfield")
    field = np.zeros(masks.shape[1:], np.uint16)
    for i in range(k):
        field |= masks[i].astype(np.uint16) << np.uint16(i)
    buf = io.BytesIO()
    Image.fromarray(field).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()

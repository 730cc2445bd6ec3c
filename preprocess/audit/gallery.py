"""The report's gallery: what the pipeline made, drawn on the images.

Per dataset, a deterministic sample (keys ranked by sha256(seed:key)) and the worst cases
(fewest proposals, most and fewest FH segments, images whose filter rule fell back from
SoCo's), each drawn four ways as small JPEG thumbnails written beside the page:

- proposals: the kept boxes (cyan) over the boxes SoCo's filter removed (faint white). The
  parts keep only the kept boxes, so the removed ones are recomputed: selective search is
  deterministic here (preprocess.proposals.deterministic_order), so rerunning it on the
  source image with the job's recorded params["proposals"] and applying the filter rule the
  row records gives the rejects; the recomputed kept boxes must equal the stored ones, else
  the caption says so and no rejects are drawn (the source changed, or it is unreadable);
- FH segments: segment boundaries (yellow);
- MCG-style masks: each pixel tinted by the best-ranked mask covering it (the loader's
  reading of the bitfield), one colour per mask;
- ground truth, when present: instance masks tinted and boxes outlined.

The pixels, boxes and maps come from the shards when they exist (read with
shards.reader.ShardDataset: exactly what training reads), else from the parts."""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
           (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
           (170, 255, 195)]
KEPT = (0, 229, 255)
REMOVED = (255, 255, 255, 80)     # RGBA: faint
FH_EDGE = (255, 234, 0)
MASK_ALPHA = 0.5
PANELS = ("boxes", "segments", "masks", "gt")
PANEL_TITLES = {"boxes": "proposals (cyan kept, faint removed)", "segments": "FH segments",
                "masks": "MCG-style masks", "gt": "ground truth"}
CATEGORIES = ("random sample", "fewest proposals", "most segments", "fewest segments", "filter fell back")


@dataclass
class Item:
    """One image as training reads it: pixels, kept boxes, label maps, GT."""
    key: str
    rgb: np.ndarray
    boxes: np.ndarray            # (N, 4) float32
    fh: np.ndarray               # (H, W) segment ids
    mcg: np.ndarray              # (K, H, W) bool
    gt_labels: np.ndarray | None
    gt: dict | None
    rule: str
    source_path: str
    removed: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    notes: list = field(default_factory=list)
    rgb_is_source: bool = False  # rgb is load_rgb(source) itself (parts), not the shard's JPEG


def hash_rank(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def select(keys: list[str], num_boxes, num_segments, rules, n_sample: int = 8,
           n_worst: int = 3, seed: int = 0) -> dict[str, list[int]]:
    """Indices into `keys` per category. Ties go to the key order; the fallback category
    lists images whose rule is not 'soco', fewest proposals first."""
    order = np.arange(len(keys))
    nb, ns = np.asarray(num_boxes), np.asarray(num_segments)
    fell = [i for i in order if rules[i] != "soco"]
    fell.sort(key=lambda i: (nb[i], keys[i]))
    return {
        "random sample": sorted(order, key=lambda i: hash_rank(keys[i], seed))[:n_sample],
        "fewest proposals": list(order[np.argsort(nb, kind="stable")][:n_worst]),
        "most segments": list(order[np.argsort(-ns, kind="stable")][:n_worst]),
        "fewest segments": list(order[np.argsort(ns, kind="stable")][:n_worst]),
        "filter fell back": fell[:n_worst],
    }


# ---------------------------------------------------------------- reading
def items_from_shards(shards_dir: Path, keys: list[str]) -> dict[str, Item]:
    from shards.reader import ShardDataset
    ds = ShardDataset(shards_dir)
    out = {}
    for key in keys:
        s = ds.get(key)
        out[key] = Item(key, s.image, s.boxes, s.fh, s.mcg, s.gt_labels, s.gt,
                        s.meta.get("filter_rule") or "(none)", s.meta.get("source_path", ""))
    return out


def items_from_parts(folder: Path, keys: list[str], root: Path | None) -> dict[str, Item]:
    from preprocess.decode import load_rgb
    from shards.format import decode_bitfield_png, decode_label_png
    wanted = set(keys)
    out = {}
    columns = ["key", "source_path", "status", "boxes", "filter_rule", "fh_png", "mcg_png",
               "num_masks", "gt_json", "gt_png"]
    for part in sorted(folder.glob("part-*.parquet")):
        if wanted.isdisjoint(pq.read_table(part, columns=["key"]).column("key").to_pylist()):
            continue  # read the label-map columns only of parts holding a chosen image
        for r in pq.read_table(part, columns=columns).to_pylist():
            if r["key"] not in wanted or r["status"] != "ok":
                continue
            rgb = load_rgb(root / r["source_path"]) if root else None
            gt = json.loads(r["gt_json"]) if r["gt_json"] else None
            out[r["key"]] = Item(
                r["key"], rgb, np.asarray(r["boxes"], np.float32).reshape(-1, 4),
                decode_label_png(r["fh_png"]), decode_bitfield_png(r["mcg_png"], r["num_masks"]),
                None if r["gt_png"] is None else decode_label_png(r["gt_png"]), gt,
                r["filter_rule"] or "(none)", r["source_path"], rgb_is_source=rgb is not None)
    return out


def add_removed(item: Item, root: Path | None, proposal_params: dict | None) -> None:
    """Recompute the boxes SoCo's filter removed (see the module doc) into item.removed."""
    from preprocess.decode import load_rgb
    from preprocess.proposals import ProposalParams, rule_masks, selective_search, unique_in_order
    if proposal_params is None:
        item.notes.append("removed boxes not shown: the parts record no proposal parameters")
        return
    if root is None:
        item.notes.append("removed boxes not shown: no dataset root in _job.json")
        return
    try:  # the source's own pixels: reuse them when the item was read from it already
        rgb = item.rgb if item.rgb_is_source else load_rgb(root / item.source_path)
    except Exception as e:  # best effort: say what is missing
        item.notes.append(f"removed boxes not shown: cannot read {root / item.source_path} ({e})")
        return
    p = ProposalParams(**proposal_params)
    raw = unique_in_order(selective_search(rgb, p.mode, p.max_side))
    h, w = rgb.shape[:2]
    if item.rule == "whole_image":
        passed, rejected = np.zeros((0, 4), np.float32), raw
    else:
        keep = rule_masks(raw, w, h, p)[item.rule]
        passed, rejected = raw[keep], raw[~keep]
    again = passed[: p.max_boxes]
    if item.rule != "whole_image" and (again.shape != item.boxes.shape
                                       or not np.allclose(again, item.boxes)):
        item.notes.append("removed boxes not shown: recomputing the proposals does not give the "
                          "stored ones (the source image changed since `make proposals`?)")
        return
    item.removed = rejected
    if len(passed) > p.max_boxes:
        item.notes.append(f"{len(passed) - p.max_boxes} boxes passed the filter but were cut by "
                          f"max_boxes={p.max_boxes} (not drawn)")


# ---------------------------------------------------------------- drawing
def thumb_size(width: int, height: int, side: int) -> tuple[int, int]:
    s = side / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to (w, h), sampling pixel centres."""
    h, w = labels.shape[-2:]
    tw, th = size
    ys = np.minimum(((np.arange(th) + 0.5) * h / th).astype(int), h - 1)
    xs = np.minimum(((np.arange(tw) + 0.5) * w / tw).astype(int), w - 1)
    return labels[..., ys[:, None], xs[None, :]]


def tint(base: np.ndarray, ids: np.ndarray, alpha: float) -> np.ndarray:
    """Blend PALETTE[(id - 1) % 16] over `base` where id > 0."""
    colours = np.asarray(PALETTE, np.float32)
    out = base.astype(np.float32)
    on = ids > 0
    out[on] = (1 - alpha) * out[on] + alpha * colours[(ids[on].astype(np.int64) - 1) % len(PALETTE)]
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def best_mask_ids(mcg: np.ndarray) -> np.ndarray:
    """Per pixel: 1 + index of the best-ranked (lowest) mask covering it, 0 = none."""
    if len(mcg) == 0:
        return np.zeros(mcg.shape[1:], np.int64)
    first = np.argmax(mcg, axis=0)
    return np.where(mcg.any(axis=0), first + 1, 0)


def draw(item: Item, side: int = 240) -> dict:
    """PIL images per panel (gt only when the item has ground truth)."""
    from PIL import Image, ImageDraw
    h, w = item.rgb.shape[:2]
    size = thumb_size(w, h, side)
    s = size[0] / w, size[1] / h
    base = np.asarray(Image.fromarray(item.rgb).resize(size, Image.BILINEAR))

    def scaled(b):
        return [b[0] * s[0], b[1] * s[1], b[2] * s[0] - 1, b[3] * s[1] - 1]

    panels = {}
    img = Image.fromarray(base).convert("RGBA")
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    pen = ImageDraw.Draw(layer)
    for b in item.removed:
        pen.rectangle(scaled(b), outline=REMOVED, width=1)
    for b in item.boxes:  # thinner lines when there are many
        pen.rectangle(scaled(b), outline=KEPT + (255,), width=2 if len(item.boxes) <= 40 else 1)
    panels["boxes"] = Image.alpha_composite(img, layer).convert("RGB")

    labels = nearest(item.fh, size).astype(np.int64)
    edge = np.zeros(labels.shape, bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    seg = base.copy()
    seg[edge] = FH_EDGE
    panels["segments"] = Image.fromarray(seg)

    panels["masks"] = Image.fromarray(tint(base, nearest(best_mask_ids(item.mcg), size), MASK_ALPHA))

    if item.gt is not None:
        ids = nearest(item.gt_labels, size) if item.gt_labels is not None else np.zeros(size[::-1], int)
        gt = Image.fromarray(tint(base, ids, MASK_ALPHA))
        pen = ImageDraw.Draw(gt)
        for i, a in enumerate(item.gt.get("annotations", [])):
            x, y, bw, bh = a["bbox"]
            pen.rectangle(scaled([x, y, x + bw, y + bh]), outline=PALETTE[i % len(PALETTE)], width=1)
        panels["gt"] = gt
    return panels


def jpeg(img, quality: int = 85) -> bytes:
    """JPEG without chroma subsampling: 1-px coloured lines keep their colour (4:2:0 JPEG
    and lossy WebP smear them into the neighbours); about 14 kB a 240 px panel."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality, subsampling=0)
    return buf.getvalue()

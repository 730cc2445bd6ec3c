"""Listing a dataset's images: one sorted list of ImageRecord for every supported layout.

Kinds:
- `sample`: the built-in synthetic set (`root/images/*.jpg`, `root/annotations/instances_sample.json`).
- `coco`: `root/images/<split>/` or `root/<split>/`, with `root/annotations/instances_<split>.json`
  when it exists (unlabeled2017 has none). Keys are the zero-padded COCO image ids.
- `imagenet`: class folders (`root/<split>/<class>/...` or `root/<class>/...`); label = index of
  the class folder in sorted order.
- `folder`: any tree of images (jpg, jpeg, png, webp, bmp, tif, tiff), recursive.

Records are sorted by key, which fixes the Ray job's part boundaries. Files that later fail
to decode are still listed (they become error rows); only layout problems raise here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common.keys import coco_key, path_key

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
KINDS = ("sample", "coco", "imagenet", "folder")


class DatasetError(ValueError):
    """A dataset layout problem; the message names the path and the fix."""


@dataclass(frozen=True)
class ImageRecord:
    key: str
    path: str          # absolute path of the source file
    relpath: str       # path relative to the dataset root (recorded as source_path)
    label: int | None  # class index for class-folder datasets
    gt: list | None    # COCO annotations of this image (category_name added); None = no GT
    gt_size: tuple[int, int] | None = field(default=None)  # (width, height) the GT refers to


def _image_files(folder: Path) -> list[Path]:
    # not is_file(): a dangling link or unreadable entry is listed so it becomes an error row
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())


def _require_dir(path: Path, what: str, fix: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path} is not a folder; {fix}")
    return path


def _records_from_coco(root: Path, images_dir: Path, ann_file: Path | None) -> list[ImageRecord]:
    """COCO layout: annotated images get their GT; files on disk without an entry get gt=None."""
    records: dict[str, ImageRecord] = {}
    listed: set[str] = set()
    if ann_file is not None:
        try:
            doc = json.loads(ann_file.read_text(encoding="utf-8"))
            names = {c["id"]: c["name"] for c in doc.get("categories", [])}
            per_image: dict[int, list] = {im["id"]: [] for im in doc["images"]}
            for ann in doc.get("annotations", []):
                per_image.setdefault(ann["image_id"], []).append(dict(ann, category_name=names.get(ann["category_id"])))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{ann_file}: not a readable COCO instances file ({e}); "
                               "re-download the annotations or remove the file to run without GT") from e
        for im in doc["images"]:
            key = coco_key(im["id"])
            path = images_dir / im["file_name"]
            listed.add(im["file_name"])
            records[key] = ImageRecord(key, str(path), path.relative_to(root).as_posix(), None,
                                       sorted(per_image.get(im["id"], []), key=lambda a: a.get("id", 0)),
                                       (int(im["width"]), int(im["height"])))
    for path in _image_files(images_dir):
        rel_in_split = path.relative_to(images_dir).as_posix()
        if rel_in_split in listed:
            continue
        relpath = path.relative_to(root).as_posix()
        key = coco_key(int(path.stem)) if path.stem.isdigit() and "/" not in rel_in_split else path_key(relpath)
        if key in records:
            raise DatasetError(f"{path}: its key {key} collides with {records[key].path}; "
                               "rename one of the files")
        records[key] = ImageRecord(key, str(path), relpath, None, None)
    return [records[k] for k in sorted(records)]


def _class_of(path: Path, classes_root: Path) -> str:
    return path.relative_to(classes_root).parts[0]


def list_images(kind: str, root, split: str | None = None) -> list[ImageRecord]:
    """All images of a dataset, sorted by key. Raises DatasetError on a bad layout."""
    root = Path(root).expanduser().resolve()
    if kind not in KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r}; use one of {', '.join(KINDS)}")
    _require_dir(root, f"{kind} dataset root", "set COCO_ROOT / DATA_ROOT to the dataset folder")
    if kind == "sample":
        ann = root / "annotations" / "instances_sample.json"
        if not ann.is_file():
            raise DatasetError(f"{ann} missing: {root} is not a generated sample; run "
                               f"`python -m preprocess.sample --out {root}`")
        return _records_from_coco(root, _require_dir(root / "images", "sample images", "regenerate the sample"), ann)
    if kind == "coco":
        split = split or "train2017"
        candidates = [root / "images" / split, root / split]
        images_dir = next((c for c in candidates if c.is_dir()), None)
        if images_dir is None:
            raise DatasetError(f"COCO split {split!r} not found under {root}: expected "
                               f"{candidates[0]} or {candidates[1]}; set SPLIT or COCO_ROOT")
        ann = root / "annotations" / f"instances_{split}.json"
        return _records_from_coco(root, images_dir, ann if ann.is_file() else None)
    if kind == "imagenet":
        if split and not (root / split).is_dir():
            raise DatasetError(f"imagenet split {split!r} not found: {root / split} is not a folder; "
                               "unset SPLIT to use the class folders directly under the root")
        base = root / split if split else root
        classes = sorted(p.name for p in base.iterdir() if p.is_dir())
        if not classes:
            raise DatasetError(f"{base}: no class folders; an imagenet-style root holds one "
                               "folder per class (optionally under a split folder)")
        labels = {c: i for i, c in enumerate(classes)}
        files = [f for c in classes for f in _image_files(base / c)]
        records = []
        for path in files:
            relpath = path.relative_to(root).as_posix()
            records.append(ImageRecord(path_key(relpath), str(path), relpath,
                                       labels[_class_of(path, base)], None))
        return _sorted_unique(records)
    files = _image_files(root)
    return _sorted_unique([ImageRecord(path_key(p.relative_to(root).as_posix()), str(p),
                                       p.relative_to(root).as_posix(), None, None) for p in files])


def _sorted_unique(records: list[ImageRecord]) -> list[ImageRecord]:
    by_key: dict[str, ImageRecord] = {}
    for r in records:
        if r.key in by_key:  # path_key hashes the exact path, so only a hash collision lands here
            raise DatasetError(f"{r.path}: key {r.key} collides with {by_key[r.key].path}; rename one")
        by_key[r.key] = r
    return [by_key[k] for k in sorted(by_key)]


# ---------------------------------------------------------------- ground-truth masks
def _rle_counts(counts) -> list[int]:
    """COCO RLE counts: a list already, or the compressed string form (LEB128-like, with deltas)."""
    if isinstance(counts, list):
        return [int(c) for c in counts]
    out, i, s = [], 0, counts.encode() if isinstance(counts, str) else counts
    while i < len(s):
        value, shift, more = 0, 0, True
        while more:
            c = s[i] - 48
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            i += 1
            shift += 1
            if not more and c & 0x10:
                value |= -1 << (5 * shift)
        if len(out) > 2:
            value += out[-2]
        out.append(value)
    return out


def annotation_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """Boolean HxW mask of one COCO annotation (polygons or RLE) in the annotation's frame."""
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        h, w = seg["size"]
        flat = np.zeros(h * w, dtype=bool)
        pos, value = 0, False
        for run in _rle_counts(seg["counts"]):
            if value:
                flat[pos:pos + run] = True
            pos += run
            value = not value
        mask = flat.reshape((w, h)).T
        if (h, w) != (height, width):
            raise DatasetError(f"annotation {ann.get('id')}: RLE size {h}x{w} differs from the image "
                               f"{height}x{width}; the annotation file does not match the images")
        return mask
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in seg or []:
        if len(poly) >= 6:
            draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)], fill=1)
    return np.asarray(canvas, dtype=bool)


# ---------------------------------------------------------------- GT in the stored frame
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def orient_points(xy: np.ndarray, orientation: int, width: int, height: int) -> np.ndarray:
    """Map continuous (x, y) points of a width x height raw frame through an EXIF orientation
    (the same transposition PIL's exif_transpose applies to the pixels)."""
    x, y = np.asarray(xy, np.float64).reshape(-1, 2).T
    mapped = {1: (x, y), 2: (width - x, y), 3: (width - x, height - y), 4: (x, height - y),
              5: (y, x), 6: (height - y, x), 7: (height - y, width - x), 8: (y, width - x)}[orientation]
    return np.stack(mapped, 1)


def orient_mask(mask: np.ndarray, orientation: int) -> np.ndarray:
    if orientation == 1:
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).transpose(_TRANSPOSE[orientation]), bool)


def gt_in_stored_frame(annotations: list, gt_size, raw_size, orientation: int):
    """Ground truth moved into the stored (EXIF-oriented) frame.

    COCO annotations refer to the file's raw pixels, so with an EXIF orientation they are
    transposed like the pixels. Returns (annotations with bbox/segmentation in stored pixels,
    uint16 label map of the stored frame with id i+1 = annotation i, painted in order so a
    later annotation wins where masks overlap; None when no annotation has a mask)."""
    raw_w, raw_h = raw_size
    if gt_size is not None and tuple(gt_size) != (raw_w, raw_h):
        raise DatasetError(f"annotations are for a {gt_size[0]}x{gt_size[1]} image but the file "
                           f"is {raw_w}x{raw_h}; the annotation file does not match this image")
    from preprocess.sample import rle_encode  # one RLE encoder for the whole project
    out, label_map = [], None
    for i, ann in enumerate(annotations):
        ann = dict(ann)
        if "bbox" in ann:
            x, y, w, h = (float(v) for v in ann["bbox"])
            corners = orient_points([[x, y], [x + w, y + h]], orientation, raw_w, raw_h)
            (x0, y0), (x1, y1) = corners.min(0), corners.max(0)
            ann["bbox"] = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
        if ann.get("segmentation"):
            mask = orient_mask(annotation_mask(ann, raw_h, raw_w), orientation)
            if label_map is None:
                label_map = np.zeros(mask.shape, np.uint16)
            label_map[mask] = i + 1
            if orientation != 1:
                ann["segmentation"] = rle_encode(mask)
        out.append(ann)
    return out, label_map

"""Listing a dataset's images: one sorted list of ImageRecord for every supported layout.

Kinds:
- `sample`: the built-in synthetic set (`root/images/*.jpg`, `root/annotations/instances_sample.json`).
- `coco`: `root/images/<split>/` or `root/<split>/`, with `root/annotations/instances_<split>.json`
  when it exists (unlabeled2017 has none). Keys are the zero-padded COCO image ids.
- `imagenet`: class folders (`root/<split>/<class>/...` or `root/<class>/...`); label = index of
  the class folder in sorted order.
- `folder`: any tree of images (jpg, jpeg, png, webp, bmp, tif, tiff), recursive.
- `filelist`: a file list, the form crawls come in: a text file with one path a line, or
  a Parquet file with a column of paths (`path` by default). Relative paths are taken
  from the dataset root (by default the list's folder); keys as for `folder` (path slug +
  hash of the path relative to the root). A path outside the root is a failed row saying
  so; a path listed twice is kept once, and counted; empty lines are counted.
Trees are walked following symlinked folders; a folder reached twice (a link loop) is
skipped once seen, and counted.

A dataset is listed as `Source`s (dataset_sources: the annotation file, one class folder,
one tree, one chunk of a file list), each yielding its records (source_records) in any
order; list_images sorts them in memory, preprocess.listing sorts them on disk in Ray
tasks for datasets too large for one process. Records are sorted by key, which fixes the
Ray job's part boundaries. Files that later fail
to decode are still listed (they become error rows); only layout problems raise here.
COCO entries are checked as they are listed (list_images_counted returns the counts,
which the job puts in its summary): a file_name that leaves the root, or an entry without
width/height whose file cannot be read, becomes a record with `error` (a failed row saying
why); a box partly outside the image is clipped, one without area inside it or with a
negative size is dropped, an annotation whose segmentation cannot be drawn is dropped,
never the image.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common.keys import coco_key, path_key

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
KINDS = ("sample", "coco", "imagenet", "folder", "filelist")
FILE_LIST_COLUMN = "path"  # the Parquet column of a file list, by default
LIST_CHUNK_BYTES = 8 << 20  # a text file list is listed in chunks of this many bytes


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
    error: str | None = None  # set when the entry itself is unusable: a failed row saying why


class Counts(dict):
    """What listing changed or skipped, by reason (goes to the job summary, _job.json)."""

    def add(self, what: str, n: int = 1) -> None:
        if n:
            self[what] = self.get(what, 0) + n


def _image_files(folder: Path, counts: Counts) -> list[Path]:
    return sorted(_walk_images(folder, counts))


def _walk_images(folder: Path, counts: Counts):
    """Image files under `folder`, following symlinked folders; a folder reached again
    (a symlink loop, or the same folder twice) is skipped and counted, as are files of
    other types. Not is_file(): a dangling link or unreadable entry is listed so it
    becomes an error row."""
    seen = set()

    def walk_error(e: OSError) -> None:
        counts.add("unreadable folders")

    for top, dirs, files in os.walk(folder, followlinks=True, onerror=walk_error):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:
            counts.add("folders skipped: reached twice (symlink loop or duplicate link)")
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in files:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(top) / name
            else:
                counts.add("files skipped: not an image extension")


def _require_dir(path: Path, what: str, fix: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path} is not a folder; {fix}")
    return path


def _inside(root: Path, path: Path) -> bool:
    """Whether `path` (made absolute lexically: '..' collapsed, links not followed) stays
    under `root`. Lexical, so a dataset that links its images from elsewhere still works."""
    return os.path.normpath(path).startswith(os.path.join(os.path.normpath(root), ""))


def _finite(values) -> bool:
    try:
        return bool(np.isfinite(np.asarray(values, np.float64)).all())
    except (TypeError, ValueError):
        return False


def segmentation_problem(seg, width: int, height: int) -> str | None:
    """Why a COCO segmentation cannot be drawn on a width x height image, or None."""
    if seg is None or seg == []:
        return None
    if isinstance(seg, dict):
        size = seg.get("size")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
            return "RLE without an integer [height, width] size"
        if tuple(size) != (height, width):
            return f"RLE size {size[0]}x{size[1]} differs from the image {height}x{width}"
        try:
            counts = _rle_counts(seg.get("counts"))
        except (TypeError, ValueError, IndexError, AttributeError):
            return "RLE counts unreadable"
        if any(c < 0 for c in counts) or sum(counts) != height * width:
            return f"RLE counts cover {sum(counts)} pixels, the image has {height * width}"
        return None
    if not isinstance(seg, list) or not all(isinstance(p, list) for p in seg):
        return "segmentation is neither a list of polygons nor an RLE"
    for poly in seg:
        if len(poly) < 6 or len(poly) % 2 or not _finite(poly):
            return (f"polygon of {len(poly)} values (needs an even count >= 6 of finite "
                    "numbers)")
    return None


def _checked_annotations(anns: list, width: int, height: int, counts: Counts) -> list:
    """COCO annotations of one image with their edges handled: a box partly outside the
    image is clipped to it, one with no area inside it (or a negative or non-finite
    size) is dropped, an annotation whose segmentation cannot be drawn is dropped.
    Every change is counted."""
    out = []
    for ann in anns:
        if "bbox" in ann:
            bbox = ann["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4 and _finite(bbox)):
                counts.add("annotations dropped: bbox not 4 finite numbers")
                continue
            x, y, w, h = (float(v) for v in bbox)
            if w <= 0 or h <= 0:
                counts.add("annotations dropped: bbox with zero or negative width/height")
                continue
            x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x1 <= x0 or y1 <= y0:
                counts.add("annotations dropped: bbox outside the image")
                continue
            if (x0, y0, x1, y1) != (x, y, x + w, y + h):
                counts.add("boxes clipped to the image")
                ann = dict(ann, bbox=[x0, y0, x1 - x0, y1 - y0])
        problem = segmentation_problem(ann.get("segmentation"), width, height)
        if problem:
            counts.add(f"annotations dropped: bad segmentation ({problem.split(' (')[0]})")
            continue
        out.append(ann)
    return out


def _image_size(im: dict, path: Path, counts: Counts) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) of a COCO image entry, read from the file when the entry lacks it."""
    w, h = im.get("width"), im.get("height")
    if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
        return (w, h), None
    try:
        with Image.open(path) as img:
            size = img.size
    except (OSError, ValueError) as e:
        return None, (f"image entry id={im.get('id')} ({im.get('file_name')}) has no usable "
                      f"width/height ({w!r}, {h!r}) and {path} cannot be read to get them "
                      f"({e}); fix the entry in the annotation file")
    counts.add("image sizes read from the file (entry without width/height)")
    return size, None


def _records_from_coco(root: Path, images_dir: Path, ann_file: Path | None,
                       counts: Counts) -> list[ImageRecord]:
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
            entries = []
            for i, im in enumerate(doc["images"]):
                if not (isinstance(im, dict) and isinstance(im.get("id"), int)
                        and isinstance(im.get("file_name"), str)):
                    raise DatasetError(f"{ann_file}: images[{i}] lacks an integer 'id' or a "
                                       "'file_name'; fix that entry (or remove it)")
                entries.append((coco_key(im["id"]), im, im["file_name"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{ann_file}: not a readable COCO instances file ({e}); "
                               "re-download the annotations or remove the file to run without GT") from e
        for key, im, file_name in entries:
            path = images_dir / file_name
            listed.add(file_name)
            if not _inside(root, path):
                counts.add("entries failed: file_name outside the dataset root")
                records[key] = ImageRecord(key, str(path), file_name, None, None, error=(
                    f"{ann_file}: image id={im['id']} file_name {file_name!r} resolves outside "
                    f"the dataset root {root}; fix the file_name (images must lie under the root)"))
                continue
            relpath = os.path.relpath(os.path.normpath(path), root).replace(os.sep, "/")
            size, error = _image_size(im, path, counts)
            if error:
                counts.add("entries failed: no width/height")
                records[key] = ImageRecord(key, str(path), relpath, None, None, error=error)
                continue
            anns = sorted(per_image.get(im["id"], []), key=lambda a: a.get("id", 0))
            records[key] = ImageRecord(key, str(path), relpath, None,
                                       _checked_annotations(anns, *size, counts), size)
    for path in _image_files(images_dir, counts):
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


@dataclass(frozen=True)
class Source:
    """One unit of listing work (a Ray task in preprocess.listing): the COCO annotation
    file with its image folder, one class folder, one tree, or one chunk of a file list."""
    kind: str                  # coco | tree | lines | parquet
    root: str                  # the dataset root (relpaths and keys are relative to it)
    folder: str | None = None  # coco: the images folder; tree: the folder walked
    ann: str | None = None     # coco: the annotation file (None: no GT)
    label: int | None = None   # tree: the class index of its images
    file_list: str | None = None
    start: int = 0             # lines: byte range [start, end) of the lines it owns
    end: int = 0
    row_group: int = 0         # parquet: the row group it reads
    column: str = FILE_LIST_COLUMN


def list_images(kind: str, root, split: str | None = None, file_list=None) -> list[ImageRecord]:
    """All images of a dataset, sorted by key. Raises DatasetError on a bad layout."""
    return list_images_counted(kind, root, split, file_list)[0]


def list_images_counted(kind: str, root, split: str | None = None, file_list=None,
                        column: str = FILE_LIST_COLUMN) -> tuple[list[ImageRecord], Counts]:
    """(list_images, what listing clipped, dropped or skipped, by reason), in memory."""
    counts = Counts()
    records = [r for source in dataset_sources(kind, root, split, file_list, column)
               for r in source_records(source, counts)]
    return _sorted_unique(records, counts), counts


def dataset_root(kind: str, root, file_list=None) -> Path:
    """The folder source paths are relative to (a file list's: its own folder by default)."""
    if kind == "filelist" and root is None:
        if file_list is None:
            raise DatasetError("dataset 'filelist' needs the list: pass --file-list PATH "
                               "(make proposals DATASET=filelist FILE_LIST=PATH)")
        return Path(file_list).expanduser().resolve().parent
    return Path(root).expanduser().resolve()


def dataset_sources(kind: str, root, split: str | None = None, file_list=None,
                    column: str = FILE_LIST_COLUMN) -> list[Source]:
    """The listing work of a dataset; checks the layout (DatasetError naming the fix)."""
    if kind not in KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r}; use one of {', '.join(KINDS)}")
    root = dataset_root(kind, root, file_list)
    _require_dir(root, f"{kind} dataset root", "set COCO_ROOT / DATA_ROOT to the dataset folder")
    r = str(root)
    if kind == "sample":
        ann = root / "annotations" / "instances_sample.json"
        if not ann.is_file():
            raise DatasetError(f"{ann} missing: {root} is not a generated sample; run "
                               f"`python -m preprocess.sample --out {root}`")
        images = _require_dir(root / "images", "sample images", "regenerate the sample")
        return [Source("coco", r, folder=str(images), ann=str(ann))]
    if kind == "coco":
        split = split or "train2017"
        candidates = [root / "images" / split, root / split]
        images_dir = next((c for c in candidates if c.is_dir()), None)
        if images_dir is None:
            raise DatasetError(f"COCO split {split!r} not found under {root}: expected "
                               f"{candidates[0]} or {candidates[1]}; set SPLIT or COCO_ROOT")
        ann = root / "annotations" / f"instances_{split}.json"
        return [Source("coco", r, folder=str(images_dir), ann=str(ann) if ann.is_file() else None)]
    if kind == "imagenet":
        if split and not (root / split).is_dir():
            raise DatasetError(f"imagenet split {split!r} not found: {root / split} is not a folder; "
                               "unset SPLIT to use the class folders directly under the root")
        base = root / split if split else root
        classes = sorted(p.name for p in base.iterdir() if p.is_dir())
        if not classes:
            raise DatasetError(f"{base}: no class folders; an imagenet-style root holds one "
                               "folder per class (optionally under a split folder)")
        return [Source("tree", r, folder=str(base / c), label=i) for i, c in enumerate(classes)]
    if kind == "folder":
        return [Source("tree", r, folder=r)]
    return _file_list_sources(r, file_list, column)


def _file_list_sources(root: str, file_list, column: str) -> list[Source]:
    if file_list is None:
        raise DatasetError("dataset 'filelist' needs the list: pass --file-list PATH "
                           "(make proposals DATASET=filelist FILE_LIST=PATH)")
    path = Path(file_list).expanduser().resolve()
    if not path.is_file():
        raise DatasetError(f"file list {path} not found; FILE_LIST must name a text file "
                           "(one path a line) or a Parquet file with a column of paths")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq
        try:
            meta = pq.ParquetFile(path)
        except Exception as e:
            raise DatasetError(f"{path}: not a readable Parquet file ({e}); rewrite the list") from e
        if column not in meta.schema_arrow.names:
            raise DatasetError(f"{path} has no column {column!r} (columns: "
                               f"{', '.join(meta.schema_arrow.names)}); pass --file-list-column NAME")
        return [Source("parquet", root, file_list=str(path), row_group=g, column=column)
                for g in range(meta.num_row_groups)]
    size = path.stat().st_size
    return [Source("lines", root, file_list=str(path), start=a, end=min(size, a + LIST_CHUNK_BYTES))
            for a in range(0, max(size, 1), LIST_CHUNK_BYTES)]


def source_records(source: Source, counts: Counts):
    """The records of one Source, in no particular order (callers sort by key)."""
    root = Path(source.root)
    if source.kind == "coco":
        yield from _records_from_coco(root, Path(source.folder),
                                      None if source.ann is None else Path(source.ann), counts)
    elif source.kind == "tree":
        for path in _walk_images(Path(source.folder), counts):
            relpath = path.relative_to(root).as_posix()
            yield ImageRecord(path_key(relpath), str(path), relpath, source.label, None)
    else:
        for line in _list_lines(source):
            if not line.strip():
                counts.add("file list: empty lines skipped")
                continue
            yield _listed_file(root, line, source.file_list, counts)


def _list_lines(source: Source):
    if source.kind == "parquet":
        import pyarrow.parquet as pq
        table = pq.ParquetFile(source.file_list).read_row_group(source.row_group, [source.column])
        for value in table.column(0).to_pylist():
            yield "" if value is None else str(value)
        return
    with open(source.file_list, "rb") as f:  # the lines that start in [start, end)
        if source.start:
            f.seek(source.start - 1)
            f.readline()
        while f.tell() < source.end:
            raw = f.readline()
            if not raw:
                return
            try:
                yield raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise DatasetError(f"{source.file_list}: the line at byte {f.tell() - len(raw)} "
                                   "is not UTF-8; write the list in UTF-8") from None


def _listed_file(root: Path, line: str, file_list: str, counts: Counts) -> ImageRecord:
    path = Path(os.path.normpath(root / line))  # an absolute line replaces the root
    if not _inside(root, path):
        counts.add("entries failed: path outside the dataset root")
        return ImageRecord(path_key(line), str(path), line, None, None, error=(
            f"{file_list}: {line!r} lies outside the dataset root {root}; list paths under "
            "the root, or pass --root (DATA_ROOT) a folder holding them all"))
    relpath = path.relative_to(root).as_posix()
    return ImageRecord(path_key(relpath), str(path), relpath, None, None)


def check_unique(previous: ImageRecord | None, record: ImageRecord, counts: Counts) -> bool:
    """False for the second listing of the same path (counted); raises on two paths with
    one key (a key hash collision: rename one)."""
    if previous is None or previous.key != record.key:
        return True
    if previous.relpath == record.relpath:
        counts.add("entries skipped: the same path listed twice")
        return False
    raise DatasetError(f"{record.path}: key {record.key} collides with {previous.path}; rename one")


def _sorted_unique(records: list[ImageRecord], counts: Counts) -> list[ImageRecord]:
    out: list[ImageRecord] = []
    for r in sorted(records, key=lambda r: (r.key, r.relpath)):
        if check_unique(out[-1] if out else None, r, counts):
            out.append(r)
    return out


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

"""Labelled images and objects from shards, resized deterministically for frozen probes.

Labels, by what the shards carry:
  - COCO-style ground truth (`Sample.gt`: the built-in sample's shape classes, COCO
    instances): every non-crowd annotation is an object labelled by its category id; the
    image label is the category of the largest object (by annotation area, ties by order);
  - class folders (ImageNet-style, `Sample.meta["label"]`): image label only.
Images are letterboxed: the long side is scaled to `image_size`, the rest padded with the
ImageNet mean colour (0 after normalisation), so every object stays whole and unstretched
and boxes only scale. What is dropped (unlabelled images, crowd or empty boxes) is counted."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from common.progress import Progress

from train.loader.collate import MEAN, STD  # the loader's ImageNet normalisation

PAD = tuple(int(round(255 * m)) for m in MEAN)


class EvalDataError(ValueError):
    """Bad evaluation input; the message names the folder and the fix."""


@dataclass
class LabelledSet:
    """Images [N,S,S,3] uint8 (letterboxed) with image labels, and objects: boxes [M,4]
    x1y1x2y2 in letterboxed pixels, the image each belongs to, and their labels."""
    name: str
    keys: list[str]
    images: np.ndarray
    image_labels: np.ndarray                 # [N] int64, -1 = none
    boxes: np.ndarray                        # [M,4] float32
    box_image: np.ndarray                    # [M] int64 index into images
    box_labels: np.ndarray                   # [M] int64
    dropped: dict = field(default_factory=dict)

    def subset(self, idx) -> "LabelledSet":
        idx = np.asarray(idx, np.int64)
        remap = np.full(len(self.keys), -1, np.int64)
        remap[idx] = np.arange(len(idx))
        keep = remap[self.box_image] >= 0
        return LabelledSet(self.name, [self.keys[i] for i in idx], self.images[idx],
                           self.image_labels[idx], self.boxes[keep], remap[self.box_image[keep]],
                           self.box_labels[keep], dict(self.dropped))


def letterbox(rgb: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """(size x size x 3 uint8, scale): long side to `size`, pad right/bottom with the mean."""
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    out = np.empty((size, size, 3), np.uint8)
    out[:] = PAD
    out[:nh, :nw] = cv2.resize(rgb, (nw, nh), interpolation=interp)
    return out, scale


def image_label_from_gt(annotations: list[dict]) -> int:
    """Category of the largest object (area, else box area); -1 when there is none."""
    best, best_area = -1, -1.0
    for a in annotations:
        x, y, w, h = a["bbox"]
        area = float(a.get("area") or w * h)
        if area > best_area:
            best, best_area = int(a["category_id"]), area
    return best


def load_labelled(shards_dir, image_size: int, max_samples: int | None = None,
                  name: str | None = None) -> LabelledSet:
    """Every sample of a shards folder with its labels (see the module docstring)."""
    from shards.reader import ShardDataset
    shards_dir = Path(shards_dir)
    ds = ShardDataset(shards_dir)
    total = len(ds) if max_samples is None else min(len(ds), int(max_samples))
    keys, images, labels, boxes, box_image, box_labels = [], [], [], [], [], []
    dropped = dict(no_label=0, crowd=0, empty_box=0, not_packed=len(ds.failed))
    progress = Progress(f"eval {shards_dir.name}", total)
    for n, s in enumerate(ds):
        if n >= total:
            break
        gt = s.gt
        anns = []
        if gt is not None:
            for a in gt.get("annotations", []):
                if a.get("iscrowd"):
                    dropped["crowd"] += 1
                elif a["bbox"][2] <= 0 or a["bbox"][3] <= 0:
                    dropped["empty_box"] += 1
                else:
                    anns.append(a)
            label = image_label_from_gt(anns)
        else:
            label = s.meta.get("label")
            label = -1 if label is None else int(label)
        if label < 0 and not anns:
            dropped["no_label"] += 1
            progress.update()
            continue
        img, scale = letterbox(s.image, image_size)
        i = len(keys)
        keys.append(s.key)
        images.append(img)
        labels.append(label)
        for a in anns:
            x, y, w, h = (float(v) * scale for v in a["bbox"])
            boxes.append((x, y, x + w, y + h))
            box_image.append(i)
            box_labels.append(int(a["category_id"]))
        progress.update()
    if not keys:
        raise EvalDataError(
            f"{shards_dir}: none of its {total} samples has a label (no ground truth in gt.json, "
            "no class folder label): evaluate on labelled shards, e.g. `make eval RUN=... "
            "EVAL_DATASET=sample` or --train/--test pointing at shards of the built-in sample, "
            "COCO with instances or class folders")
    return LabelledSet(name or shards_dir.parent.name, keys, np.stack(images),
                       np.asarray(labels, np.int64), np.asarray(boxes, np.float32).reshape(-1, 4),
                       np.asarray(box_image, np.int64), np.asarray(box_labels, np.int64), dropped)


def key_fraction(key: str, seed: int = 0) -> float:
    """A key's deterministic position in [0, 1) (sha1 of seed and key)."""
    digest = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_by_key(data: LabelledSet, test_fraction: float, seed: int = 0) -> tuple[LabelledSet, LabelledSet]:
    """(train, test): a key goes to test when its hash position is below `test_fraction`,
    so an image's side never depends on which other images are present."""
    if not 0.0 < test_fraction < 1.0:
        raise EvalDataError(f"test_fraction must be in (0, 1), got {test_fraction} (eval.test_fraction)")
    test = np.array([key_fraction(k, seed) < test_fraction for k in data.keys])
    if test.all() or not test.any():
        raise EvalDataError(f"{data.name}: splitting {len(data.keys)} image(s) by key left one side "
                            "empty; add images or pass --train and --test")
    return data.subset(np.flatnonzero(~test)), data.subset(np.flatnonzero(test))


def to_tensor_batch(images: np.ndarray):
    """uint8 [B,H,W,3] -> normalised float32 NCHW tensor (ImageNet mean/std)."""
    import torch
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std

"""Pixel-level oracles for the loader tests: classify augmented pixels back to the
synthetic objects (train/loader/synthetic.py) and check boxes and masks against them."""
from __future__ import annotations

import numpy as np
import torch

from train.loader.collate import MEAN, STD
from train.loader.synthetic import PALETTE


def to_uint8(view: torch.Tensor) -> np.ndarray:
    """Undo ImageNet normalisation: [3,H,W] float -> [H,W,3] float in 0..255."""
    x = view.numpy() * np.array(STD)[:, None, None] + np.array(MEAN)[:, None, None]
    return (x * 255).transpose(1, 2, 0)


def classify(view: torch.Tensor) -> np.ndarray:
    """Nearest palette entry per pixel; -1 where no entry is within 40 (blended edges)."""
    px = to_uint8(view)
    d = np.linalg.norm(px[:, :, None, :] - PALETTE[None, None].astype(np.float32), axis=-1)
    lab = d.argmin(-1)
    lab[d.min(-1) > 40] = -1
    return lab


def expected_labels(src_labels: np.ndarray, params, size: int) -> np.ndarray:
    """What a view must show: the source label at each output pixel centre (the crop,
    resize and flip recomputed here from the view's parameters)."""
    x0, y0, w, h, flip = [float(v) for v in params]
    i = np.arange(size) + 0.5
    xs = np.floor(x0 + i * w / size).astype(int).clip(0, src_labels.shape[1] - 1)
    ys = np.floor(y0 + i * h / size).astype(int).clip(0, src_labels.shape[0] - 1)
    out = src_labels[ys[:, None], xs[None, :]]
    return out[:, ::-1] if flip else out


def interior(labels: np.ndarray, margin: int) -> np.ndarray:
    """Pixels whose (2*margin+1)^2 neighbourhood holds a single label and lies inside the
    view (DALI's ROI resize filters across the crop border, torchvision's does not)."""
    h, w = labels.shape
    pad = np.pad(labels.astype(np.int64), margin, mode="constant", constant_values=-1)
    same = np.ones((h, w), bool)
    for dy in range(0, 2 * margin + 1):
        for dx in range(0, 2 * margin + 1):
            same &= pad[dy:dy + h, dx:dx + w] == labels
    return same


def margin_for(params, size: int) -> int:
    """Edge blur in output pixels: about one source pixel (upscale factor) plus filters."""
    return int(np.ceil(size / min(float(params[2]), float(params[3])))) + 2


def box_frames_object(classes: np.ndarray, box, obj: int, margin: int) -> str | None:
    """None when `box` frames object `obj`: its inside (less `margin`) is that object and
    no pixel of it lies outside the box grown by `margin`; else the reason."""
    h, w = classes.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    x1, y1, x2, y2 = [float(v) for v in box]
    inside = (xs > x1 + margin) & (xs < x2 - margin) & (ys > y1 + margin) & (ys < y2 - margin)
    if inside.sum() > 0 and (classes[inside] == obj).mean() < 0.98:
        return f"inside of box {box} is {(classes[inside] == obj).mean():.2f} object {obj}"
    grown = (xs > x1 - margin) & (xs < x2 + margin) & (ys > y1 - margin) & (ys < y2 + margin)
    stray = ((classes == obj) & ~grown).sum()
    if stray > 0:
        return f"{stray} pixels of object {obj} lie outside box {box}"
    return None

"""Frozen features of a backbone, in batches, at every feature level.

Image level: the global average of each feature map. Object level: RoIAlign
(torchvision.ops.roi_align, aligned=True, `OUTPUT_SIZE` bins of `SAMPLING` samples each)
of each map over the ground-truth boxes, averaged over its bins, so a box's feature is
the mean of the map over the box. Crop level (`crop_size` set): each ground-truth box
cut out of the (normalised, letterboxed) image by RoIAlign at `crop_size` x `crop_size`
pixels -- the object on its own, at the size the network was trained on -- through the
backbone, each map averaged; this is the "object crop" of issue 11. Level names follow
the backbone's `feature_info` ("res2".."res5" for a ResNet) plus the aliases "C4" = res4
and "C5" = res5, and its `embedding_info` when it has one (a ViT's "cls"): a vector an
image, used as it is at image and crop scope; it has no object-scope (RoIAlign) feature.

The network runs in eval mode under torch.no_grad, with bf16 autocast on CUDA (fp32 on
CPU); features come back as float32 CPU tensors."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn
from torchvision.ops import roi_align

from train.eval.data import LabelledSet, to_tensor_batch

ALIASES = {"C2": "res2", "C3": "res3", "C4": "res4", "C5": "res5"}
OUTPUT_SIZE = 7
SAMPLING = 2


def embedding_levels(backbone: nn.Module) -> list[str]:
    """Names of the backbone's vector outputs (`embedding_info`; a ViT's "cls"), none for a ResNet."""
    return [e["name"] for e in getattr(backbone, "embedding_info", ())]


def all_levels(backbone: nn.Module) -> list[str]:
    """Every level the eval can probe: the maps shallow to deep, then the vector outputs."""
    return [f["name"] for f in backbone.feature_info] + embedding_levels(backbone)


def resolve_levels(backbone: nn.Module, levels) -> dict[str, str]:
    """{asked name: feature name}; an unknown level is one clear error naming the choices."""
    names = all_levels(backbone)
    out = {}
    for lv in levels:
        real = ALIASES.get(lv, lv)
        if real not in names:
            raise ValueError(f"unknown feature level {lv!r}: this backbone has {names} "
                             f"(and aliases {sorted(k for k, v in ALIASES.items() if v in names)}); "
                             "set eval.levels / --levels")
        out[lv] = real
    return out


def strides(backbone: nn.Module) -> dict[str, int]:
    return {f["name"]: int(f["stride"]) for f in backbone.feature_info}


def box_features(fmap: torch.Tensor, boxes: torch.Tensor, batch_index: torch.Tensor, stride: int,
                 output_size: int = OUTPUT_SIZE, sampling: int = SAMPLING) -> torch.Tensor:
    """[M, C]: the RoIAlign of `fmap` [B,C,H,W] over boxes [M,4] (x1y1x2y2 input pixels,
    image `batch_index`), averaged over its output bins."""
    if len(boxes) == 0:
        return fmap.new_zeros((0, fmap.shape[1]))
    rois = torch.cat([batch_index.to(fmap.dtype)[:, None], boxes.to(fmap.dtype)], 1)
    pooled = roi_align(fmap, rois, output_size=output_size, spatial_scale=1.0 / stride,
                       sampling_ratio=sampling, aligned=True)
    return pooled.mean((2, 3))


def image_size_of(cfg: dict, override: int | None = None) -> int:
    """The letterbox side of eval images: `override`, else `eval.image_size`, else the run's
    `data.image_size`, else 224 (0 or None at any step falls through to the next)."""
    return int(override or (cfg.get("eval") or {}).get("image_size")
               or (cfg.get("data") or {}).get("image_size") or 224)


def crop_size_of(cfg: dict, override: int | None = None) -> int:
    """The crop probe's side: `override`, else `eval.crop_size`, else the run's
    `data.image_size` (the view size it trained on), else 224; 0 = no crop probe."""
    if override is None:
        override = (cfg.get("eval") or {}).get("crop_size")
    if override is None:
        override = (cfg.get("data") or {}).get("image_size") or 224
    return int(override)


def crop_boxes(x: torch.Tensor, boxes: torch.Tensor, batch_index: torch.Tensor, size: int) -> torch.Tensor:
    """[M,3,size,size]: each box (x1y1x2y2 pixels of image `batch_index` of x [B,3,H,W])
    resampled bilinearly to size x size (RoIAlign on the pixels, aligned=True)."""
    if len(boxes) == 0:
        return x.new_zeros((0, x.shape[1], size, size))
    rois = torch.cat([batch_index.to(x.dtype)[:, None], boxes.to(x.dtype)], 1)
    return roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=SAMPLING, aligned=True)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _pooled(x: torch.Tensor) -> torch.Tensor:
    """[B, C]: a map's global average; a vector output as it is."""
    return x if x.ndim == 2 else x.mean((2, 3))


@torch.no_grad()
def extract(backbone: nn.Module, data: LabelledSet, levels, batch_size: int = 64,
            device: torch.device | str = "cpu", crop_size: int | None = None, whole: bool = True) -> dict:
    """{"image": {level: [N,C]}, "object": {level: [M,C]}[, "crop": {level: [M,C]}]} float32
    CPU tensors ("crop" when `crop_size` is set; `whole=False` skips the whole-image forward
    and returns "crop" only). A vector level (`embedding_levels`) is in "image" and "crop"
    as it is, and absent from "object".

    The backbone's train/eval mode is restored afterwards."""
    device = torch.device(device)
    names = resolve_levels(backbone, levels)
    stride = strides(backbone)
    vectors = set(embedding_levels(backbone))
    was_training = backbone.training
    backbone.eval()
    image = {lv: [] for lv in names}
    obj = {lv: [] for lv, real in names.items() if real not in vectors}
    crop = {lv: [] for lv in names}
    boxes = torch.from_numpy(data.boxes)
    order = []   # box indices in the order they are computed (batch by batch)
    try:
        for start in range(0, len(data.keys), batch_size):
            stop = min(start + batch_size, len(data.keys))
            x = to_tensor_batch(data.images[start:stop]).to(device)
            sel = np.flatnonzero((data.box_image >= start) & (data.box_image < stop))
            b = boxes[sel].to(device)
            bi = torch.from_numpy(data.box_image[sel] - start).to(device)
            order.append(sel)
            if whole:
                with _autocast(device):
                    maps = backbone.forward_features(x)
                for lv, real in names.items():
                    fmap = maps[real].float()
                    image[lv].append(_pooled(fmap).cpu())
                    if lv in obj:
                        obj[lv].append(box_features(fmap, b, bi, stride[real]).cpu())
            if crop_size:
                cuts = crop_boxes(x, b, bi, int(crop_size))
                for c0 in range(0, len(cuts), batch_size):
                    with _autocast(device):
                        maps = backbone.forward_features(cuts[c0:c0 + batch_size])
                    for lv, real in names.items():
                        crop[lv].append(_pooled(maps[real].float()).cpu())
    finally:
        backbone.train(was_training)
    back = torch.from_numpy(np.argsort(np.concatenate(order))) if order else torch.zeros(0, dtype=torch.long)
    out = {"image": {lv: torch.cat(v) for lv, v in image.items()},
           "object": {lv: torch.cat(v)[back] for lv, v in obj.items()}} if whole else {}   # in data.boxes order
    if crop_size:
        out["crop"] = {lv: (torch.cat(v) if v else torch.zeros(0, 0))[back] for lv, v in crop.items()}
    return out

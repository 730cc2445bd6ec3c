"""Helpers shared by the audit tests: the distance statistic written out independently."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from preprocess.audit.backbones import IMAGENET_MEAN, IMAGENET_STD
from preprocess.audit.distance import crop_pairs


def direct_distances(net: torch.nn.Module, key: str, rgb: np.ndarray, cfg,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """The statistic written out with torchvision's own pieces: PIL resized_crop, to_tensor,
    normalize, then `net` (pooled features: a resnet with fc removed, our backbone, a timm
    model without classifier), unit norm, squared distance per crop pair."""
    img = Image.fromarray(rgb)
    out = []
    for pair in crop_pairs(key, rgb.shape[1], rgb.shape[0], cfg):
        ys = []
        for x1, y1, x2, y2 in pair.tolist():
            view = TF.resized_crop(img, y1, x1, y2 - y1, x2 - x1, [cfg.size, cfg.size],
                                   interpolation=TF.InterpolationMode.BILINEAR)
            x = TF.normalize(TF.to_tensor(view), mean, std)
            with torch.no_grad():
                ys.append(torch.nn.functional.normalize(net(x[None]).flatten(1), dim=1)[0])
        out.append(float(((ys[0] - ys[1]) ** 2).sum()))
    return np.array(out)

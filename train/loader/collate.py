"""Batch assembly shared by both backends: fixed-shape box tensors, ids, validity flags
(keys from the recipe's BoxSets), the per-view crop parameters, then the recipe's own
`finish` (e.g. MaskCo zeroes its query box with `zero_box`)."""
from __future__ import annotations

import numpy as np
import torch

from .recipes import Plan, Recipe

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def box_tensors(recipe: Recipe, plans: list[Plan], view_boxes: list[dict]) -> dict:
    """`view_boxes[i][key]` are sample i's boxes already in view pixels; adds ids/valid."""
    out = {}
    for spec in recipe.box_sets:
        stacked = torch.from_numpy(np.stack([np.asarray(vb[spec.boxes], np.float32) for vb in view_boxes]))
        out[spec.boxes] = stacked[:, 0] if spec.single else stacked
        if spec.ids:
            ids = torch.from_numpy(np.stack([p.ids[spec.ids] for p in plans]).astype(np.int64))
            out[spec.ids] = ids
            if spec.valid:
                out[spec.valid] = ids >= 0
    return out


def view_params(recipe: Recipe, plans: list[Plan]) -> torch.Tensor:
    """float32 [B, V, 5]: each view's crop x0, y0, w, h (source pixels) and flip."""
    rows = [[[v.x0, v.y0, v.w, v.h, float(v.flip)] for v in (p.views[s.name] for s in recipe.views)]
            for p in plans]
    return torch.tensor(rows, dtype=torch.float32)


def zero_box(images: torch.Tensor, boxes: torch.Tensor) -> None:
    """MaskCo: set the pixels of each image's box to zero (after normalisation, i.e. the
    mean colour); pixel i is inside when its centre i+0.5 lies in [x1, x2)."""
    h, w = images.shape[-2:]
    xs = torch.arange(w, device=images.device) + 0.5
    ys = torch.arange(h, device=images.device) + 0.5
    b = boxes.to(images.device)
    inx = (xs[None] >= b[:, 0:1]) & (xs[None] < b[:, 2:3])
    iny = (ys[None] >= b[:, 1:2]) & (ys[None] < b[:, 3:4])
    images.mul_(~(iny[:, :, None] & inx[:, None, :])[:, None])


def finish(recipe: Recipe, batch: dict, plans: list[Plan], view_boxes: list[dict],
           samples: np.ndarray) -> dict:
    batch.update(box_tensors(recipe, plans, view_boxes))
    batch["views"] = view_params(recipe, plans)
    batch["index"] = torch.as_tensor(np.asarray(samples), dtype=torch.int64)
    return recipe.finish(batch)

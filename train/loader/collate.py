"""Batch assembly shared by both backends: fixed-shape box tensors, ids, validity flags,
the per-view crop parameters, and MaskCo's zeroed query box."""
from __future__ import annotations

import numpy as np
import torch

from .recipes import Plan, Recipe

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def ids_key(box_key: str) -> str | None:
    return "ids" + box_key[len("boxes"):] if box_key.startswith("boxes") else None


def box_tensors(recipe: Recipe, plans: list[Plan], view_boxes: list[dict]) -> dict:
    """`view_boxes[i][key]` are sample i's boxes already in view pixels; adds ids/valid."""
    out = {}
    for key in plans[0].boxes:
        stacked = torch.from_numpy(np.stack([np.asarray(vb[key], np.float32) for vb in view_boxes]))
        out[key] = stacked[:, 0] if key == "query_box" else stacked
        ik = ids_key(key)
        if ik:
            ids = torch.from_numpy(np.stack([p.ids[ik] for p in plans]).astype(np.int64))
            out[ik] = ids
            out["valid" + key[len("boxes"):]] = ids >= 0
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
    if recipe.method == "maskco":
        zero_box(batch["query"], batch["query_box"])
    return batch

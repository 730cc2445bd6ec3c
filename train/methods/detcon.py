"""DetCon-B and DetCon-S (Hénaff et al. 2021): contrast features pooled inside
unsupervised masks instead of whole views.

The variant comes from config (`method.variant: b | s`):
- B: BYOL-style online encoder + projector + predictor against an EMA target.
- S: one shared encoder + projector (SimCLR style); both views act as prediction
  and as target, and gradients flow through both (including the cross-rank gather).

Mask handling follows the official code (methods.md 2.4): each view's label map is
area-pooled onto the backbone's output grid and every cell takes the id with the
largest area (ties: the smallest id); 16 ids are drawn uniformly with replacement
among the ids present on the grid, independently per view; the same ids serve the
online and the target branch; features are averaged inside each drawn mask.
The loss is `byol_nce_detcon` (methods.md 2.6) written in torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from train.distributed import all_gather_with_grad
from train.loader import geometry as G
from train.loader.recipes import Plan, Recipe, ViewSpec, two_crops
from train.methods import Method, build_on_backbone, cosine_momentum, ema_update, make_target
from train.models import deepest_map
from train.models.heads import MLP
from train.schema import BackboneFields

INFINITY = 1e9  # what the official loss subtracts from the trivial same-view logits


# --- masks on the feature grid ---------------------------------------------------------
def masks_to_grid(masks: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Reduce label maps [B,H,W] (int ids >= 0) to the feature grid [B,h,w].

    Each pixel (y, x) falls in cell (y*h//H, x*w//W): for H divisible by h this is
    the official VALID average pool with window = stride. The cell takes the id
    covering most of its pixels (smallest id on ties), i.e. avg-pool + argmax.
    Works for any id range (16-bit FH ids, MCG, GT) without a one-hot of all ids."""
    if masks.dim() != 3 or masks.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"detcon masks must be integer [B,H,W] label maps, got {tuple(masks.shape)} {masks.dtype}")
    masks = masks.long()
    if masks.numel() and int(masks.min()) < 0:
        raise ValueError("detcon masks contain negative ids; the loader's detcon recipe must emit label ids >= 0 "
                         "for every pixel (use mask source 'grid' if a dataset has no segments)")
    B, H, W = masks.shape
    h, w = grid_hw
    if h > H or w > W:
        raise ValueError(f"feature grid {h}x{w} is finer than the mask {H}x{W}; use a larger image_size")
    cy = torch.arange(H, device=masks.device) * h // H
    cx = torch.arange(W, device=masks.device) * w // W
    cell = (cy[:, None] * w + cx[None, :]).expand(B, H, W)
    group = torch.arange(B, device=masks.device)[:, None, None] * (h * w) + cell      # (image, cell)
    span = int(masks.max()) + 1 if masks.numel() else 1
    keys, counts = torch.unique(group * span + masks, return_counts=True)             # (image, cell, id) -> pixels
    key_group, key_id = keys // span, keys % span
    best = torch.zeros(B * h * w, dtype=counts.dtype, device=masks.device)
    best = best.scatter_reduce(0, key_group, counts, reduce="amax")
    candidate = torch.where(counts == best[key_group], key_id, torch.full_like(key_id, span))
    label = torch.full((B * h * w,), span, dtype=torch.long, device=masks.device)
    label = label.scatter_reduce(0, key_group, candidate, reduce="amin")
    return label.view(B, h, w)


def sample_mask_ids(cells: torch.Tensor, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw `num_samples` ids per image uniformly with replacement among the ids
    present on the grid `cells` [B,h,w] (every cell belongs to exactly one mask)."""
    B = cells.shape[0]
    flat, _ = cells.reshape(B, -1).sort(dim=1)
    first = torch.ones_like(flat, dtype=torch.bool)
    first[:, 1:] = flat[:, 1:] != flat[:, :-1]
    n_present = first.sum(dim=1)                                           # >= 1 per image
    # present ids first (in id order), repeated cells after them
    order = torch.argsort((~first).to(torch.int8), dim=1, stable=True)
    present = flat.gather(1, order)
    u = torch.rand(B, num_samples, generator=generator, device="cpu").to(cells.device)
    pick = torch.minimum((u * n_present[:, None]).long(), n_present[:, None] - 1)  # float rounding guard
    return present.gather(1, pick)


def pool_in_masks(features: torch.Tensor, cells: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean of `features` [B,C,h,w] inside each mask `ids` [B,M] of `cells` [B,h,w] -> [B,M,C]."""
    B, C = features.shape[:2]
    binary = (cells.reshape(B, 1, -1) == ids[:, :, None]).to(features.dtype)   # [B,M,hw]
    area = binary.sum(dim=2, keepdim=True).clamp(min=1)
    return torch.bmm(binary / area, features.reshape(B, C, -1).transpose(1, 2))


# --- loss --------------------------------------------------------------------------------
def _same(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B,M] x [B,M] -> [B,M,1,M]: 1 where the ids agree within the same image."""
    return (x[:, :, None] == y[:, None, :]).to(dtype)[:, :, None, :]


def _one_side(pred, target_other, target_same, pind, tind_other, tind_same, own, temperature):
    """Cross-entropy of view a's predictions against [target b (positives), target a]."""
    B, M = pind.shape
    logits_ab = torch.einsum("bmd,cnd->bmcn", pred, target_other) / temperature
    logits_aa = torch.einsum("bmd,cnd->bmcn", pred, target_same) / temperature
    labels_ab = own * _same(pind, tind_other, own.dtype)
    logits_aa = logits_aa - INFINITY * (own * _same(pind, tind_same, own.dtype))   # drop the trivial match
    logits = torch.cat([logits_ab, logits_aa], dim=2).reshape(B, M, -1)
    labels = torch.cat([labels_ab, torch.zeros_like(logits_aa)], dim=2).reshape(B, M, -1)
    n_pos = labels.sum(dim=-1)
    labels = labels / n_pos.clamp(min=1)[..., None]
    duplicates = _same(pind, pind, own.dtype).sum(dim=(2, 3))                      # how often each id was drawn
    weights = (n_pos > 1e-3).to(own.dtype) / duplicates
    ce = -(labels * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    return (weights * ce).mean()


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def detcon_loss(pred1, pred2, target1, target2, pind1, pind2, tind1, tind2, *,
                offset: int = 0, temperature: float = 0.1) -> torch.Tensor:
    """DetCon contrastive loss (`byol_nce_detcon`, local negatives on).

    pred1/pred2 [B,M,D]: this rank's predictions; target1/target2 [B',M,D]: targets
    gathered over all ranks (B' = world*B) in rank order; pind*/tind* [B,M]: this rank's
    mask ids; `offset` = where this rank's images start in the gathered batch.
    Half-precision inputs are computed in float32 (the -1e9 mask needs it)."""
    if abs(temperature) < 1e-8:
        raise ValueError("detcon temperature must be non-zero (default 0.1)")
    B, Bg = pred1.shape[0], target1.shape[0]
    if not 0 <= offset <= Bg - B:
        raise ValueError(f"offset {offset} does not place {B} local images inside {Bg} gathered targets")
    with torch.autocast(pred1.device.type, enabled=False):
        pred1, pred2, target1, target2 = (F.normalize(_at_least_fp32(t), dim=-1)
                                          for t in (pred1, pred2, target1, target2))
        own = F.one_hot(torch.arange(B, device=pred1.device) + offset, Bg).to(pred1.dtype)[:, None, :, None]
        return (_one_side(pred1, target2, target1, pind1, tind2, tind1, own, temperature)
                + _one_side(pred2, target1, target2, pind2, tind1, tind2, own, temperature))


# --- the recipe (methods.md 2.3) ------------------------------------------------------------
RECIPE = "detcon"
VIEWS = ("view1", "view2")
MASKS = ("mask1", "mask2")          # each view's label map, cropped and flipped with it
MASK_SOURCES = ("fh", "mcg", "gt", "grid")


class DetConRecipe(Recipe):
    """Two BYOL views (bicubic) and their label maps from a mask source."""
    name = "detcon"
    DEFAULTS = dict(size=224, scale=(0.08, 1.0), mask_source="fh", grid=(5, 5), colour=True)
    MASK_VIEWS = dict(zip(MASKS, VIEWS))

    def check(self) -> None:
        if self.cfg["mask_source"] not in MASK_SOURCES:
            raise ValueError(f"detcon mask_source {self.cfg['mask_source']!r} is not one of {MASK_SOURCES}")

    def view_specs(self) -> list[ViewSpec]:
        s = self.cfg["size"]
        return [ViewSpec(VIEWS[0], s, "byol1", "cubic"), ViewSpec(VIEWS[1], s, "byol2", "cubic")]

    @property
    def mask_member(self) -> tuple[str, ...]:
        src = self.cfg["mask_source"]
        return (f"{src}.png",) if src in ("fh", "mcg", "gt") else ()

    def label_map(self, raw, where: str) -> np.ndarray:
        from train.loader.source import ShardReadError, decode_png
        src = self.cfg["mask_source"]
        if src == "grid":
            return G.grid_labels(raw.height, raw.width, *self.cfg["grid"])
        labels = decode_png(raw.members[f"{src}.png"], f"{where} member {raw.key}.{src}.png")
        if labels.shape != (raw.height, raw.width):
            raise ShardReadError(f"{where}: {raw.key}.{src}.png is {labels.shape[::-1]} but the image "
                                 f"is {(raw.width, raw.height)}; rebuild the shards with make shards")
        return G.mcg_labels(labels) if src == "mcg" else labels

    def plan(self, W, H, boxes, draw, rng) -> Plan:
        return two_crops(self, W, H, draw, VIEWS)


# --- the method --------------------------------------------------------------------------
@dataclass
class ModelConfig(BackboneFields):
    variant: Literal["b", "s"] = "b"
    num_samples: int = 16
    temperature: float = 0.1
    hidden_dim: int = 4096
    dim: int = 256
    base_momentum: float = 0.996
    gather: bool = True


def gather_targets(targets: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """Every rank's targets in rank order, and where this rank's images start. The
    gather is differentiable: DetCon-S's gradients reach every rank's copy (summed over
    ranks, so DDP's average is the gradient of the mean per-rank loss); DetCon-B's
    targets carry no gradient anyway."""
    if not dist.is_initialized():
        return targets, 0
    # one collective for both views: two differentiable gathers may run their backward
    # collectives in different orders on different ranks and swap gradients
    gathered = all_gather_with_grad(torch.stack(targets, dim=1))            # [world*B, views, M, D]
    return list(gathered.unbind(dim=1)), dist.get_rank() * targets[0].shape[0]


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """DetCon's projector/predictor: Linear -> BN -> ReLU -> Linear without bias (2.5)."""
    mlp = MLP(in_dim, hidden_dim, out_dim, bn=True)
    mlp[-1] = nn.Linear(hidden_dim, out_dim, bias=False)
    return mlp


class DetCon(Method):
    optimizer = "lars"   # methods.md 2.8: 1-D parameters skip decay and adaptation (Method default)

    def __init__(self, backbone: nn.Module, variant: str, num_samples: int, temperature: float,
                 hidden_dim: int, dim: int, base_momentum: float, gather: bool):
        super().__init__()
        if variant not in ("b", "s"):
            raise ValueError(f"detcon model.variant must be 'b' (BYOL-style) or 's' (SimCLR-style), got {variant!r}")
        self.variant, self.num_samples, self.temperature = variant, num_samples, temperature
        self.base_momentum, self.gather = base_momentum, gather
        self.backbone = backbone
        self.projector = _mlp(backbone.feature_info[-1]["channels"], hidden_dim, dim)
        if variant == "b":
            self.predictor = _mlp(dim, hidden_dim, dim)
            self.target_backbone, self.target_projector = make_target(backbone), make_target(self.projector)

    def momentum_update(self, step: int, total_steps: int) -> None:
        if self.variant == "b":
            m = cosine_momentum(step, total_steps, self.base_momentum)
            ema_update(self.backbone, self.target_backbone, m)
            ema_update(self.projector, self.target_projector, m)

    def export_modules(self, target: bool = False) -> dict[str, nn.Module]:
        if target and self.variant != "b":
            raise NotImplementedError("DetCon-S has no EMA target network: export with export.target=false")
        return {"backbone": self.target_backbone if target else self.backbone}

    def _embed(self, backbone, projector, feature_map, cells, ids) -> torch.Tensor:
        pooled = pool_in_masks(feature_map, cells, ids)                               # [B,M,C]
        return projector(pooled.flatten(0, 1)).view(*ids.shape, -1)

    def forward(self, batch: dict) -> dict:
        views = tuple(batch[v] for v in VIEWS)
        maps = [deepest_map(self.backbone, v) for v in views]
        cells = [masks_to_grid(batch[k].to(v.device), f.shape[-2:])
                 for k, v, f in zip(MASKS, views, maps)]
        ids = [sample_mask_ids(c, self.num_samples) for c in cells]       # views draw independently
        z = [self._embed(self.backbone, self.projector, f, c, i) for f, c, i in zip(maps, cells, ids)]
        if self.variant == "b":
            pred = [self.predictor(t.flatten(0, 1)).view(t.shape) for t in z]
            with torch.no_grad():                                           # same ids as the online branch
                target = [self._embed(self.target_backbone, self.target_projector,
                                      deepest_map(self.target_backbone, v), c, i)
                          for v, c, i in zip(views, cells, ids)]
        else:
            pred = target = z                                               # DetCon-S: shared, grads both ways
        target, offset = gather_targets(target) if self.gather else (target, 0)
        loss = detcon_loss(pred[0], pred[1], target[0], target[1], ids[0], ids[1], ids[0], ids[1],
                           offset=offset, temperature=self.temperature)
        paired = (ids[0][:, :, None] == ids[1][:, None, :]).any(dim=2).float().mean()
        return dict(loss=loss, masks_per_image=sum(_count_masks(c) for c in cells) / 2,
                    paired_share=float(paired))   # near 0 = masks rarely match across views: loss ~ 0


def _count_masks(cells: torch.Tensor) -> float:
    """Mean number of distinct masks per image on the feature grid (a log for tuning mask sources)."""
    flat = cells.flatten(1).sort(dim=1).values
    return float((flat[:, 1:] != flat[:, :-1]).sum(dim=1).add(1).float().mean())



def build(cfg: dict) -> DetCon:
    """Options live under `model:` (ModelConfig: the backbone keys plus DetCon's)."""
    return build_on_backbone(DetCon, cfg, ModelConfig, "detcon")

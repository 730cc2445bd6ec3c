"""SoCo (methods.md section 1): box-level BYOL between views of one image.

Variants (config `model.variant`):
  fpn   ResNet + FPN P2..P5 + RoIAlign 7x7 + 4conv1fc head; pairs (1,2) and (1,3).
  star  SoCo*: as fpn plus the pair (1,4) (loader recipe `soco_star`).
  c4    RoIAlign 14x14 on res4, res5 as the head, avg-pool; pair (1,2) only (loader recipe
        `soco_c4`: V1 and V2, no V3).
`model.roi_size` overrides the RoIAlign side (7 FPN, 14 C4), e.g. for small views.
Unlike the paper's code, each box is RoI-aligned only at its assigned FPN level: the
paper pools every box on all four levels but its correspondence matrix only ever
pairs the assigned-level slots, so the loss is the same at a quarter of the head
compute (methods.md 1.4, 10). The head's BN therefore sees only assigned-level RoIs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from train.loader import geometry as G
from train.loader.recipes import BoxSet, Plan, Recipe, ViewSpec
from train.methods import Method, build_on_backbone, cosine_momentum, ema_update, make_target
from train.models.fpn import FPN
from train.models.heads import MLP, ConvFCHead
from train.schema import BackboneFields

RECIPE = "soco"
LEVEL_RANGES = (48.0, 96.0, 192.0, 224.0)  # sqrt(wh) upper bounds for P2..P5 at 224-px views
REFERENCE_SIZE = 224.0

# --- the recipe (methods.md 1.3): batch keys named once, here ------------------------------
V1, V2, V3, V4 = "view1", "view2", "view3", "view4"
BOXES1_2 = BoxSet("boxes1_2", V1, "ids1_2", "valid1_2")   # V1's boxes paired with V2's
BOXES2 = BoxSet("boxes2", V2, "ids2", "valid2")
BOXES1_3 = BoxSet("boxes1_3", V1, "ids1_3", "valid1_3")   # V1's boxes paired with V3's
BOXES3 = BoxSet("boxes3", V3, "ids3", "valid3")
BOXES4 = BoxSet("boxes4", V4, "ids4", "valid4")           # SoCo*: V4 = V2 resized, V2's boxes
# (online box set, other box set, log name) per view pair
PAIRS = {"fpn": [(BOXES1_2, BOXES2, "loss_12"), (BOXES1_3, BOXES3, "loss_13")],
         "c4": [(BOXES1_2, BOXES2, "loss_12")]}
PAIRS["star"] = PAIRS["fpn"] + [(BOXES1_2, BOXES4, "loss_14")]


class SoCoRecipe(Recipe):
    """V1 the whole image, V2/V3 random crops with K shared proposals each (jittered on V1)."""
    name = "soco"
    DEFAULTS = dict(size=224, size3=112, scale2=(0.5, 1.0), scale3=(0.5, 1.0), k=4, max_tries=5,
                    jitter_prob=0.5, jitter_ratio=0.1, colour=True, star=False, size4=112)
    SCALED = ("size3", "size4")

    def view_specs(self) -> list[ViewSpec]:  # V1, then the other view of each drawn pair (, V4)
        c = self.cfg
        views = [ViewSpec(V1, c["size"], "byol1")]
        views += [ViewSpec(set_v.view, size, "byol2") for (_, set_v, _), size, _ in self.drawn_pairs()]
        return views + ([ViewSpec(V4, c["size4"], "byol2")] if c.get("star") else [])

    @property
    def box_sets(self) -> tuple[BoxSet, ...]:
        sets = tuple(b for (set_1, set_v, _), _, _ in self.drawn_pairs() for b in (set_1, set_v))
        return sets + ((BOXES4,) if self.cfg.get("star") else ())

    def drawn_pairs(self) -> list[tuple]:
        """(pair, view size, crop scale) of each V1-Vi pair this recipe draws, in draw order."""
        c = self.cfg
        return [(PAIRS["fpn"][0], c["size"], c["scale2"]), (PAIRS["fpn"][1], c["size3"], c["scale3"])]

    def plan(self, W, H, boxes, draw, rng) -> Plan:
        c = self.cfg
        v1 = G.View(0, 0, W, H, c["size"], c["size"], draw.coin(0.5))
        plan = Plan({V1: v1})
        for (set_1, set_v, _), size, scale in self.drawn_pairs():
            least = c["k"] // 2
            for _ in range(c["max_tries"]):  # SoCo: retry the crop, halving what is enough
                x0, y0, w, h = draw.crop(W, H, scale)
                cand = np.flatnonzero(G.overlapping(boxes, G.intersect(v1.rect, np.array(
                    [x0, y0, x0 + w, y0 + h], np.float32))))
                if len(cand) >= least:
                    break
                least //= 2
            view = G.View(x0, y0, w, h, size, size, draw.coin(0.5))
            plan.views[set_v.view] = view
            if len(cand):
                ids = G.choose_shared(rng, cand, c["k"])
                box_a, box_b = boxes[ids], boxes[ids]
            else:  # nothing overlaps: each whole view is the box, one shared id after the proposals
                ids = np.full(c["k"], len(boxes), np.int64)
                box_a, box_b = np.repeat(v1.rect[None], c["k"], 0), np.repeat(view.rect[None], c["k"], 0)
            plan.boxes[set_1.boxes] = (set_1.view, G.jitter(rng, box_a, c["jitter_prob"], c["jitter_ratio"]))
            plan.boxes[set_v.boxes] = (set_v.view, box_b)
            plan.ids[set_1.ids] = plan.ids[set_v.ids] = ids
        if c.get("star"):  # V4: V2's crop at size4 with its own flip, V2's boxes
            v2 = plan.views[BOXES2.view]
            plan.views[BOXES4.view] = G.View(v2.x0, v2.y0, v2.w, v2.h, c["size4"], c["size4"], draw.coin(0.5))
            plan.boxes[BOXES4.boxes] = (BOXES4.view, plan.boxes[BOXES2.boxes][1])
            plan.ids[BOXES4.ids] = plan.ids[BOXES2.ids]
        return plan


class SoCoStarRecipe(SoCoRecipe):
    """SoCo*: V3 at 192 and V4 = V2 resized to 112 (methods.md 1.3)."""
    name = "soco_star"
    DEFAULTS = {**SoCoRecipe.DEFAULTS, "star": True, "size3": 192}


class SoCoC4Recipe(SoCoRecipe):
    """SoCo C4: V1 and V2 only (the C4 head trains the pair (1,2); methods.md 1.5), V2 cropped
    at scale 0.6-1 as the C4 scripts do. No V3 is drawn, decoded or augmented."""
    name = "soco_c4"
    DEFAULTS = {**{k: v for k, v in SoCoRecipe.DEFAULTS.items() if k not in ("size3", "scale3", "star", "size4")},
                "scale2": (0.6, 1.0)}
    SCALED = ()

    def drawn_pairs(self) -> list[tuple]:
        return [(PAIRS["c4"][0], self.cfg["size"], self.cfg["scale2"])]


VARIANT_RECIPES = {"fpn": SoCoRecipe.name, "star": SoCoStarRecipe.name, "c4": SoCoC4Recipe.name}   # each variant's batches


@dataclass
class ModelConfig(BackboneFields):
    variant: Literal["fpn", "star", "c4"] = "fpn"
    fpn_channels: int = 256
    head_conv_channels: int = 256
    head_fc_dim: int = 1024
    proj_hidden: int = 4096
    proj_dim: int = 256
    ema_base: float = 0.99
    level_ranges: list[float] = field(default_factory=lambda: list(LEVEL_RANGES))
    roi_size: int | None = None     # RoIAlign output side; None = the paper's (7 FPN, 14 C4)


def assign_levels(boxes: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """FPN level index (0 = P2) per box: the first level whose bound >= sqrt(w*h).
    Boxes beyond the last bound go to the last level. `boxes` [..., 4] x1y1x2y2."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    scale = torch.sqrt(wh[..., 0] * wh[..., 1])
    return torch.bucketize(scale, ranges.to(scale), right=False).clamp(max=len(ranges) - 1)


def pool_boxes(feats: list[torch.Tensor], boxes: torch.Tensor, levels: torch.Tensor,
               view_size: int, output_size: int) -> torch.Tensor:
    """RoIAlign (aligned=True) of each box [B,K,4] (view pixels) on feats[level];
    returns [B*K, C, s, s] in box order. Boxes scale to each map by map/view size,
    as SoCo scales its [0,1] boxes by the map's size."""
    B, K = boxes.shape[:2]
    flat, lv = boxes.reshape(-1, 4).float(), levels.reshape(-1)
    batch_idx = torch.arange(B, device=boxes.device).repeat_interleave(K).to(flat)
    pieces, order = [], []
    for level, fmap in enumerate(feats):
        sel = (lv == level).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        rois = torch.cat([batch_idx[sel, None], flat[sel]], dim=1)
        # fp32 boxes and map: bf16 would round box corners by up to ~1 px at 224
        pieces.append(roi_align(fmap.float(), rois, output_size,
                                spatial_scale=fmap.shape[-1] / view_size,
                                sampling_ratio=-1, aligned=True))
        order.append(sel)
    pooled = torch.cat(pieces)
    return pooled[torch.argsort(torch.cat(order))]


def byol_box_loss(p: torch.Tensor, z: torch.Tensor, ids_p: torch.Tensor,
                  ids_z: torch.Tensor) -> torch.Tensor:
    """l(a->b) = -2 mean_n [sum_ij C_nij <p_ni, z_nj> / (sum_ij C_nij + 1e-6)] with
    C_nij = [id_ni == id_nj], ids < 0 (padding) never matching (methods.md 1.6)."""
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.float(), dim=-1)
    match = (ids_p[:, :, None] == ids_z[:, None, :]) & (ids_p[:, :, None] >= 0) & (ids_z[:, None, :] >= 0)
    match = match.to(p.dtype)
    sim = torch.einsum("bid,bjd->bij", p, z)
    per_image = (match * sim).sum((1, 2)) / (match.sum((1, 2)) + 1e-6)
    return -2.0 * per_image.mean()


class SoCo(Method):
    find_unused_parameters = True  # a level with no box in a batch gets no gradient

    def __init__(self, backbone: nn.Module, variant: str = "fpn", fpn_channels: int = 256,
                 head_conv_channels: int = 256, head_fc_dim: int = 1024, proj_hidden: int = 4096,
                 proj_dim: int = 256, ema_base: float = 0.99, level_ranges=LEVEL_RANGES,
                 roi_size: int | None = None):
        super().__init__()
        if variant not in PAIRS:
            raise ValueError(f"unknown SoCo variant {variant!r}: use one of {sorted(PAIRS)} (model.variant)")
        if getattr(backbone, "family", None) != "resnet":
            raise ValueError(f"SoCo needs a multi-scale ResNet (FPN over res2..res5, C4 head on res5); "
                             f"model.backbone is a {getattr(backbone, 'family', '?')} backbone")
        self.variant, self.ema_base = variant, ema_base
        self.pairs = PAIRS[variant]
        self.recipe = VARIANT_RECIPES[variant]
        self.backbone = backbone
        self.register_buffer("level_ranges", torch.tensor(level_ranges, dtype=torch.float32),
                             persistent=False)
        if variant == "c4":
            self.neck, self.head, self.roi_size = None, None, roi_size or 14
            feat_dim = self.backbone.out_channels[3]
        else:
            self.neck = FPN(self.backbone.out_channels, fpn_channels)
            self.head = ConvFCHead(fpn_channels, head_conv_channels, head_fc_dim)
            self.roi_size, feat_dim = roi_size or 7, head_fc_dim
        self.projector = MLP(feat_dim, proj_hidden, proj_dim)
        self.predictor = MLP(proj_dim, proj_hidden, proj_dim)
        self.target = make_target(self._online)

    @property
    def _online(self) -> nn.ModuleList:
        """The online branch in the target's layout: [backbone, (neck, head,) projector].
        Built on access so the modules keep their own names in the state_dict."""
        mods = [self.backbone, self.neck, self.head, self.projector]
        return nn.ModuleList(m for m in mods if m is not None)

    # -- one branch: a view's feature maps, then per-box embeddings -------------
    def _maps(self, branch: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
        backbone = branch[0]
        if self.variant == "c4":
            return backbone.features(x, upto=4)[-1:]
        return branch[1](backbone.features(x))

    def _embed(self, branch: nn.ModuleList, maps, boxes, view_size, level_scale) -> torch.Tensor:
        B, K = boxes.shape[:2]
        if self.variant == "c4":
            rois = pool_boxes(maps, boxes, torch.zeros(B, K, dtype=torch.long, device=boxes.device),
                              view_size, self.roi_size)
            feats = torch.flatten(F.adaptive_avg_pool2d(branch[0].layer4(rois), 1), 1)
        else:
            levels = assign_levels(boxes, self.level_ranges * level_scale)
            feats = branch[2](pool_boxes(maps, boxes, levels, view_size, self.roi_size))
        return branch[-1](feats).reshape(B, K, -1)

    def batch_keys(self) -> tuple[str, ...]:
        """Each pair's views, boxes and ids (a `valid` mask is optional)."""
        return tuple(dict.fromkeys(k for pair in self.pairs for b in pair[:2] for k in (b.view, b.boxes, b.ids)))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        # Level bounds are for 224-px views; smaller recipes scale them by V1's size.
        level_scale = batch[V1].shape[-1] / REFERENCE_SIZE
        views = sorted({b.view for pair in self.pairs for b in pair[:2]})
        branch = self._online
        online = {v: self._maps(branch, batch[v]) for v in views}
        with torch.no_grad():
            target = {v: self._maps(self.target, batch[v]) for v in views}

        def embeds(view, boxes_key):
            size = batch[view].shape[-1]
            boxes = batch[boxes_key]
            p = self.predictor(self._embed(branch, online[view], boxes, size, level_scale).flatten(0, 1))
            with torch.no_grad():
                z = self._embed(self.target, target[view], boxes, size, level_scale)
            return p.reshape(z.shape), z

        def ids(box_set: BoxSet):  # ids < 0 are padding; a `valid` mask, when given, must agree
            valid = batch.get(box_set.valid)
            return batch[box_set.ids] if valid is None else torch.where(valid, batch[box_set.ids], -1)

        logs, total = {}, 0.0
        for a, b, log in self.pairs:
            p_a, z_a = embeds(a.view, a.boxes)
            p_b, z_b = embeds(b.view, b.boxes)
            pair = byol_box_loss(p_a, z_b, ids(a), ids(b)) + byol_box_loss(p_b, z_a, ids(b), ids(a))
            logs[log] = float(pair.detach())
            total = total + pair
        return dict(loss=total, **logs)

    def momentum_update(self, step: int, total_steps: int) -> None:
        ema_update(self._online, self.target, cosine_momentum(step, total_steps, self.ema_base))

    def export_modules(self, target: bool = False) -> dict[str, nn.Module]:
        branch = self.target if target else self._online
        mods = {"backbone": branch[0]}
        if self.variant != "c4":
            mods.update(fpn=branch[1], head=branch[2])
        return mods


def build(cfg: dict) -> SoCo:
    """Options live under `model:` (ModelConfig: the backbone keys plus SoCo's)."""
    return build_on_backbone(SoCo, cfg, ModelConfig, "SoCo")

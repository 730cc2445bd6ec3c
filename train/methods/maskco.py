"""MaskCo and MaskCo(+in) (Zhao et al. 2021, methods.md 3): contrastive mask prediction.

A box of the query view is zeroed (by the loader); the query path (backbone ->
mask prediction head -> RoIAlign on the masked box -> MoCo v2 projection head) must
pick the same region's feature from the unmasked key view (momentum encoder, no
MPH, RoIAlign on 17 key boxes) out of negatives: by default the 16 negative key
boxes (1..16) of every other image in the batch, optionally gathered across ranks;
MaskCo(+in) also uses the 16 boxes of the same image. InfoNCE at temperature 0.2,
key momentum 0.999, SGD lr 0.03 momentum 0.9 weight decay 1e-3 (as the paper prints)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops import roi_align

from train.distributed import all_gather_with_grad
from train.loader import geometry as G
from train.loader.collate import zero_box
from train.loader.recipes import BoxSet, Plan, Recipe, ViewSpec
from train.methods import MomentumEncoderMethod, build_on_backbone, make_target
from train.models import deepest_map
from train.models.heads import MLP
from train.schema import BackboneFields

RECIPE = "maskco"
QUERY, KEY = "query", "key"
KEY_BOXES = BoxSet("key_boxes", KEY)                  # [B,17,4]: box 0 the positive, 1..16 negatives
QUERY_BOX = BoxSet("query_box", QUERY, single=True)   # [B,4]: box 0 seen from the query view, zeroed


class MaskCoRecipe(Recipe):
    """Key and query crops overlapping enough; 17 key boxes in the overlap; the query view's
    copy of box 0 is zeroed (after normalisation: the mean colour)."""
    name = "maskco"
    DEFAULTS = dict(size=224, scale=(0.2, 1.0), min_overlap=0.5, overlap_tries=10, n_boxes=17,
                    box_side=(32, 128), neg_iou=0.2, colour=True)
    SCALED = ("box_side",)
    BOX_SETS = (KEY_BOXES, QUERY_BOX)

    def view_specs(self) -> list[ViewSpec]:
        return [ViewSpec(QUERY, self.cfg["size"], "moco"), ViewSpec(KEY, self.cfg["size"], "moco")]

    def plan(self, W, H, boxes, draw, rng) -> Plan:
        c, s = self.cfg, self.cfg["size"]
        key = G.View(*draw.crop(W, H, c["scale"]), s, s, draw.coin(0.5))
        best, best_overlap = None, -1.0
        for _ in range(c["overlap_tries"]):  # query crop must share enough of the key crop
            crop = draw.crop(W, H, c["scale"])
            inter = G.intersect(key.rect, np.array([crop[0], crop[1], crop[0] + crop[2], crop[1] + crop[3]], np.float32))
            overlap = G.area(inter)[0] / min(crop[2] * crop[3], key.w * key.h)
            if overlap > best_overlap:
                best, best_overlap, best_inter = crop, overlap, inter
            if overlap >= c["min_overlap"]:
                break
        query = G.View(*best, s, s, draw.coin(0.5))
        region = G.to_view(best_inter, key)[0]
        key_boxes = G.maskco_boxes(rng, region, s, c["n_boxes"], c["box_side"], c["neg_iou"])
        src = G.to_source(key_boxes, key)
        return Plan({QUERY: query, KEY: key},
                    boxes={KEY_BOXES.boxes: (KEY, src), QUERY_BOX.boxes: (QUERY, src[:1])})

    def finish(self, batch: dict) -> dict:
        zero_box(batch[QUERY], batch[QUERY_BOX.boxes])
        return batch


def maskco_loss(q: torch.Tensor, keys: torch.Tensor, *, offset: int = 0, temperature: float = 0.2,
                intra: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of the masked-box queries against key-box features.

    q [B,D]: this rank's query features (unit norm); keys [B',17,D]: key-box features
    (unit norm) of all images whose boxes serve as negatives, this rank's images at
    rows offset..offset+B-1; box 0 is each image's positive. Negatives: boxes 1..16 of
    every other image, plus (intra=True) boxes 1..16 of the same image.
    Returns (loss, top-1 accuracy of the positive)."""
    B, Bg = q.shape[0], keys.shape[0]
    if keys.dim() != 3 or keys.shape[1] < 2:
        raise ValueError(f"maskco keys must be [B,1+negatives,D], got {tuple(keys.shape)}")
    if not 0 <= offset <= Bg - B:
        raise ValueError(f"offset {offset} does not place {B} local images inside {Bg} key rows")
    with torch.autocast(q.device.type, enabled=False):
        if q.dtype in (torch.float16, torch.bfloat16):
            q = q.float()
        keys = keys.to(q.dtype)
        own = torch.arange(B, device=q.device) + offset
        l_pos = (q * keys[own, 0]).sum(dim=1, keepdim=True)                   # [B,1]
        l_neg = torch.einsum("bd,cnd->bcn", q, keys[:, 1:])                    # [B,B',16]
        if not intra:
            same_image = F.one_hot(own, Bg).bool()[:, :, None].expand_as(l_neg)
            l_neg = l_neg.masked_fill(same_image, float("-inf"))           # drop, not down-weight
        logits = torch.cat([l_pos, l_neg.reshape(B, -1)], dim=1) / temperature
        labels = torch.zeros(B, dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels), (logits.argmax(dim=1) == 0).float().mean()


def mask_prediction_head(channels: int, num_blocks: int) -> nn.Sequential:
    """`num_blocks` bottleneck blocks (1x1-3x3-1x1, ResNet conv5-shaped: width
    channels/4, expansion 4) keeping the channel count; 0 blocks = identity (ablation)."""
    if not 0 <= num_blocks <= 8:
        raise ValueError(f"maskco model.mph_blocks must be in 0..8 (paper: 0..4, default 3), got {num_blocks}")
    if num_blocks and channels % 4:
        raise ValueError(f"maskco MPH needs backbone channels divisible by 4, got {channels}")
    return nn.Sequential(*[Bottleneck(channels, channels // 4) for _ in range(num_blocks)])


def box_features(features: torch.Tensor, boxes: torch.Tensor, image_size: int, roi_size: int) -> torch.Tensor:
    """RoIAlign (aligned) of boxes [B,K,4] given in view pixels, then average pooled: [B,K,C]."""
    B, K = boxes.shape[:2]
    scale = features.shape[-1] / image_size
    rois = torch.cat([torch.arange(B, device=boxes.device, dtype=boxes.dtype).repeat_interleave(K)[:, None],
                      boxes.reshape(-1, 4)], dim=1)
    pooled = roi_align(features, rois.to(features.dtype), roi_size, spatial_scale=scale,
                       sampling_ratio=-1, aligned=True)   # adaptive, as SoCo: ~1 sample a feature cell
    return pooled.mean(dim=(2, 3)).view(B, K, -1)


# --- the method --------------------------------------------------------------------------
@dataclass
class ModelConfig(BackboneFields):
    zero_init_residual: bool = False
    intra: bool = False                  # MaskCo(+in): also the 16 intra-image negatives
    mph_blocks: int = 3
    dim: int = 128
    hidden_dim: int | None = None        # null = backbone channels
    roi_size: int = 7
    momentum: float = 0.999
    temperature: float = 0.2
    gather: bool = False


class MaskCo(MomentumEncoderMethod):
    optimizer = "sgd"

    def __init__(self, backbone: nn.Module, intra: bool, mph_blocks: int, dim: int, hidden_dim: int | None,
                 roi_size: int, momentum: float, temperature: float, gather: bool):
        super().__init__()
        channels = backbone.feature_info[-1]["channels"]
        self.backbone = backbone
        self.mph = mask_prediction_head(channels, mph_blocks)                    # query path only
        self.head = MLP(channels, hidden_dim or channels, dim, bn=False)          # MoCo v2 head
        self.key_backbone, self.key_head = make_target(backbone), make_target(self.head)
        self.intra, self.roi_size, self.momentum = intra, roi_size, momentum
        self.temperature, self.gather = temperature, gather


    def forward(self, batch: dict) -> dict:
        query, key = batch[QUERY], batch[KEY]
        query_box = batch[QUERY_BOX.boxes].to(query.device, torch.float32)[:, None]  # [B,1,4]
        key_boxes = batch[KEY_BOXES.boxes].to(key.device, torch.float32)             # [B,17,4]
        fq = self.mph(deepest_map(self.backbone, query))
        q = F.normalize(self.head(box_features(fq, query_box, query.shape[-1], self.roi_size)[:, 0]), dim=1)
        with torch.no_grad():
            fk = deepest_map(self.key_backbone, key)
            k = F.normalize(self.key_head(box_features(fk, key_boxes, key.shape[-1], self.roi_size)), dim=-1)
            offset = 0
            if self.gather and dist.is_initialized():         # negatives from every rank's images
                offset, k = dist.get_rank() * k.shape[0], all_gather_with_grad(k)
        loss, acc = maskco_loss(q, k, offset=offset, temperature=self.temperature, intra=self.intra)
        return dict(loss=loss, acc=acc.item())



def build(cfg: dict) -> MaskCo:
    """Options live under `model:` (ModelConfig: the backbone keys plus MaskCo's)."""
    return build_on_backbone(MaskCo, cfg, ModelConfig, "maskco")

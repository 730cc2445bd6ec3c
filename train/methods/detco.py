"""DetCo (Xie et al., ICCV 2021; methods.md 4; the DetCo slides, seed 004): MoCo v2 plus
  HIC  hierarchical intermediate contrast: a global head and an InfoNCE loss on every ResNet
       stage res2..res5, not only the last;
  CGLC cross global-local contrast: each view also yields a 3x3 jigsaw of patches (one
       random crop inside each cell of the view, shuffled), each patch through the same
       backbone, the 9 pooled patch features concatenated into a local head; per stage a
       local-local term and a local-query vs global-key term join the global-global one.
No official pretext code exists (xieenze/DetCo has transfer configs only), so every choice
below is a `model:` / `data.options` key; README "DetCo" lists both unofficial readings.

Per stage s (weight w_s), with q from the query view (online encoder) and k from the key
view (momentum encoder), negatives from the queue of the key's kind at that stage:
  L_s = NCE(q_g, k_g; Q_g) + NCE(q_l, k_l; Q_l) + NCE(q_l, k_g; Q_g)     (`combine: sum`)
  L   = sum_s w_s L_s      (`combine: mean` divides L_s by its number of terms)
hic=false keeps only the last stage; cglc=false keeps only the global-global terms (and
needs no patches: set data.options.grid=0 so the loader does not cut them).

Heads: global, per stage, avgpool -> fc(C, C) -> ReLU -> fc(C, dim) (MoCo v2's, no BN);
local, per stage, each patch avgpooled to C, the 9 concatenated in slot order (9C) ->
fc(9C, H) -> ReLU -> fc(H, dim) with H = C (`local_hidden: c`, ours) or 9C (`9c`, the
shuuchen/DetCo.pytorch reading; 340M parameters at res5 of a ResNet-50)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from train.distributed import all_gather_with_grad
from train.loader import geometry as G
from train.loader.recipes import BoxSet, Plan, Recipe, ViewSpec, two_crops
from train.methods import MomentumEncoderMethod, build_on_backbone, make_target
from train.methods.mocov2 import (KeyQueue, infonce, shuffle_across_ranks, shuffle_bn_mode,
                                  unshuffle_across_ranks)
from train.models.heads import MLP
from train.schema import BackboneFields

RECIPE = "detco"
VIEWS = ("query", "key")
# Per global view: its patches stacked [B, n, 3, P, P], and a box set recording where each
# patch lies in the view (boxes in view pixels) and which jigsaw cell it came from (ids,
# row-major cell number; slot order = the shuffled order the local head sees).
PATCHES = {v: f"{v}_patches" for v in VIEWS}
PATCH_BOXES = {v: BoxSet(boxes=f"{v}_patch_boxes", view=v, ids=f"{v}_patch_cells") for v in VIEWS}


def patch_view_names(view: str, n: int) -> list[str]:
    """The loader's view name of each patch slot of `view` (stacked away by `finish`)."""
    return [f"{view}_patch{i}" for i in range(n)]


def cell_rect(cell: int, grid: int, size: int) -> np.ndarray:
    """Jigsaw cell `cell` (row-major) of a size x size view as a box in view pixels."""
    r, c = divmod(int(cell), grid)
    step = size / grid
    return np.array([c * step, r * step, (c + 1) * step, (r + 1) * step], np.float32)


def patch_rect(view: G.View, cell: int, grid: int, patch: int, rng: np.random.Generator) -> tuple:
    """A random patch of `view`'s cell as an integer source rectangle (x0, y0, w, h).

    The cell is mapped back through the view's crop and flip (geometry.to_source); the patch
    spans `patch` view pixels (patch * view.w / size source pixels, rounded) and lies wholly
    inside the cell's source rectangle at a uniform integer offset. Integer source pixels are
    what both backends execute exactly (the reference crops whole pixels). A cell narrower
    than one source pixel (a crop of a few pixels) gets a one-pixel patch at its start."""
    size = view.out_w
    x1, y1, x2, y2 = G.to_source(cell_rect(cell, grid, size), view)[0]
    out = []
    for lo, hi, extent in ((x1, x2, view.w), (y1, y2, view.h)):
        lo_i, hi_i = math.ceil(lo - 1e-3), math.floor(hi + 1e-3)
        side = int(min(max(round(extent * patch / size), 1), max(hi_i - lo_i, 1)))
        out.append((int(rng.integers(lo_i, max(hi_i - side, lo_i) + 1)), side))
    (x0, w), (y0, h) = out
    return x0, y0, w, h


def view_patch_rect(cell: int, grid: int, size: int, patch: int, rng: np.random.Generator) -> np.ndarray:
    """A random patch x patch square of the view's cell at integer view pixels (x1y1x2y2):
    the `patches: view` reading, cut from the augmented view itself."""
    x1, y1, x2, y2 = cell_rect(cell, grid, size)
    lo = np.ceil([x1, y1]).astype(int)
    hi = np.floor([x2, y2]).astype(int) - patch
    x0, y0 = (int(rng.integers(a, max(b, a) + 1)) for a, b in zip(lo, hi))
    return np.array([x0, y0, x0 + patch, y0 + patch], np.float32)


class DetCoRecipe(Recipe):
    """MoCo v2's two aug-plus views, plus per view a grid x grid jigsaw of `patch`-pixel
    patches (one random square inside each cell, shuffled). `patches` says where a patch's
    pixels come from:
      image  each patch is a view of its own integer source rectangle (the cell mapped back
             through the view's crop and flip): both backends crop it from the image, with
             its own colour draw; recorded in `views` like any view (ours, the default);
      view   each patch is cut from the augmented view in `finish`, sharing the view's
             colour, blur and flip (shuuchen/DetCo.pytorch cuts its jigsaw from the
             transformed tensor); no extra loader views.
    Either way `<view>_patch_boxes` hold each patch's box in its view's pixels and
    `<view>_patch_cells` its cell (row-major), in slot order."""
    name = "detco"
    DEFAULTS = dict(size=224, scale=(0.2, 1.0), colour=True, grid=3, patch=64, patches="image")
    SCALED = ("patch",)

    def check(self) -> None:
        c = self.cfg
        if not isinstance(c["grid"], int) or c["grid"] < 0:
            raise ValueError(f"recipe detco: grid must be an integer >= 0 (0 = no patches), got "
                             f"{c['grid']!r} (data.options.grid)")
        if c["grid"] and not 1 <= c["patch"] <= c["size"] // c["grid"]:
            raise ValueError(f"recipe detco: a {c['patch']} px patch does not fit a cell of the "
                             f"{c['size']} px view cut {c['grid']}x{c['grid']}; lower data.options.patch "
                             f"to at most {c['size'] // c['grid']} or the grid")
        if c["patches"] not in ("image", "view"):
            raise ValueError(f"recipe detco: patches must be image or view, got {c['patches']!r} "
                             "(data.options.patches)")

    @property
    def n_patches(self) -> int:
        return self.cfg["grid"] ** 2

    @property
    def patch_views(self) -> bool:
        """Whether patches are loader views of their own (`patches: image`)."""
        return bool(self.n_patches) and self.cfg["patches"] == "image"

    def view_specs(self) -> list[ViewSpec]:
        specs = [ViewSpec(v, self.cfg["size"], "moco") for v in VIEWS]
        for v in (VIEWS if self.patch_views else ()):
            specs += [ViewSpec(n, self.cfg["patch"], "moco") for n in patch_view_names(v, self.n_patches)]
        return specs

    @property
    def box_sets(self) -> tuple[BoxSet, ...]:
        return tuple(PATCH_BOXES[v] for v in VIEWS) if self.n_patches else ()

    @property
    def batch_keys(self) -> tuple[str, ...]:
        patches = tuple(PATCHES[v] for v in VIEWS) if self.n_patches else ()
        boxes = tuple(k for b in self.box_sets for k in (b.boxes, b.ids))
        return VIEWS + patches + boxes + ("views", "index")

    def plan(self, W, H, boxes, draw, rng) -> Plan:
        plan = two_crops(self, W, H, draw, VIEWS)
        grid, patch, n, size = self.cfg["grid"], self.cfg["patch"], self.n_patches, self.cfg["size"]
        for v in (VIEWS if n else ()):
            view = plan.views[v]
            cells = rng.permutation(n)                        # slot i shows cell cells[i]
            if self.patch_views:
                rects = [patch_rect(view, cell, grid, patch, rng) for cell in cells]
                for name, (x0, y0, w, h) in zip(patch_view_names(v, n), rects):
                    plan.views[name] = G.View(x0, y0, w, h, patch, patch, view.flip)
                src = np.array([[x, y, x + w, y + h] for x, y, w, h in rects], np.float32)
            else:
                src = G.to_source(np.stack([view_patch_rect(c, grid, size, patch, rng) for c in cells]), view)
            plan.boxes[PATCH_BOXES[v].boxes] = (v, src)
            plan.ids[PATCH_BOXES[v].ids] = cells.astype(np.int64)
        return plan

    def finish(self, batch: dict) -> dict:
        """`<view>_patches` [B, n, 3, P, P]: the patch views stacked (`image`), or the patch
        boxes cut from the view (`view`; boxes are whole view pixels up to float error)."""
        for v in (VIEWS if self.n_patches else ()):
            if self.patch_views:
                batch[PATCHES[v]] = torch.stack([batch.pop(k) for k in patch_view_names(v, self.n_patches)], 1)
                continue
            corners = batch[PATCH_BOXES[v].boxes][..., :2].round().long().tolist()
            P, images = self.cfg["patch"], batch[v]
            batch[PATCHES[v]] = torch.stack([torch.stack([images[b, :, y:y + P, x:x + P] for x, y in row])
                                             for b, row in enumerate(corners)])
        return batch


# --- the method --------------------------------------------------------------------------
@dataclass
class ModelConfig(BackboneFields):
    zero_init_residual: bool = False
    dim: int = 128
    queue_size: int = 65536                  # per queue: one global and one local queue per stage
    momentum: float = 0.999
    temperature: float = 0.2                 # unofficial ports: 0.07 (shuuchen), 0.1 (OpenSelfSup-style)
    stage_weights: list[float] = field(default_factory=lambda: [0.1, 0.4, 0.7, 1.0])   # res2..res5
    hic: bool = True                         # false: res5 only
    cglc: bool = True                        # false: global-global terms only
    local_hidden: Literal["c", "9c"] = "c"   # local head hidden width: C (ours) or 9C (shuuchen)
    combine: Literal["sum", "mean"] = "sum"  # a stage's terms summed (shuuchen) or averaged (OpenSelfSup-style)
    shuffle_bn: str | bool = "auto"          # auto | true | false (as MoCo v2)


def _pool(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


class DetCo(MomentumEncoderMethod):
    optimizer = "sgd"
    sync_bn = False       # per-rank BN with shuffled keys, as MoCo v2

    def __init__(self, backbone: nn.Module, dim: int, queue_size: int, momentum: float,
                 temperature: float, stage_weights: list[float], hic: bool, cglc: bool,
                 local_hidden: str, combine: str, shuffle_bn: str | bool):
        super().__init__()
        info = backbone.feature_info
        if len(stage_weights) != len(info):
            raise ValueError(f"model.stage_weights has {len(stage_weights)} weights but the backbone has "
                             f"{len(info)} stages ({', '.join(i['name'] for i in info)}): give one per stage")
        chosen = info if hic else info[-1:]
        self.stages = [i["name"] for i in chosen]
        self.weights = dict(zip([i["name"] for i in info], map(float, stage_weights)))
        self.backbone = backbone
        self.cglc, self.combine = cglc, combine
        kinds = ("global", "local") if cglc else ("global",)
        heads = {"global": nn.ModuleDict({i["name"]: MLP(i["channels"], i["channels"], dim, bn=False)
                                          for i in chosen})}
        if cglc:
            n = 9   # the grid is the loader's; the head's width follows the batch (checked in forward)
            heads["local"] = nn.ModuleDict({i["name"]: MLP(n * i["channels"], (n if local_hidden == "9c" else 1)
                                                           * i["channels"], dim, bn=False) for i in chosen})
        self.head = nn.ModuleDict(heads)
        self.key_backbone, self.key_head = make_target(backbone), make_target(self.head)
        self.queues = nn.ModuleDict({kind: nn.ModuleDict({s: KeyQueue(dim, queue_size) for s in self.stages})
                                     for kind in kinds})
        self.momentum, self.temperature, self.shuffle_bn = momentum, temperature, shuffle_bn

    # embeddings: [B, stages, dim], L2-normalised
    def _global(self, backbone, head, images: torch.Tensor) -> torch.Tensor:
        feats = backbone.forward_features(images)
        return torch.stack([F.normalize(head["global"][s](_pool(feats[s])), dim=1) for s in self.stages], 1)

    def _local(self, backbone, head, patches: torch.Tensor) -> torch.Tensor:
        B, n = patches.shape[:2]
        if n != 9:
            raise ValueError(f"DetCo's local head takes 9 patches a view (a 3x3 jigsaw), the batch has {n}: "
                             "set data.options.grid=3 (or model.cglc=false with grid=0)")
        feats = backbone.forward_features(patches.flatten(0, 1))
        return torch.stack([F.normalize(head["local"][s](_pool(feats[s]).reshape(B, -1)), dim=1)
                            for s in self.stages], 1)

    @torch.no_grad()
    def _keys(self, encode, x: torch.Tensor) -> torch.Tensor:
        """`encode(key_backbone, key_head, x)` with MoCo's shuffled BN when it is on."""
        if shuffle_bn_mode(self.shuffle_bn, x.device):
            x, inverse = shuffle_across_ranks(x)
            return unshuffle_across_ranks(encode(self.key_backbone, self.key_head, x), inverse)
        return encode(self.key_backbone, self.key_head, x)

    def embeddings(self, batch: dict) -> dict[str, torch.Tensor]:
        """q_g, k_g and (with CGLC) q_l, k_l, each [B, stages, dim]; keys without gradient."""
        out = {"q_g": self._global(self.backbone, self.head, batch[VIEWS[0]]),
               "k_g": self._keys(self._global, batch[VIEWS[1]])}
        if self.cglc:
            missing = [PATCHES[v] for v in VIEWS if PATCHES[v] not in batch]
            if missing:
                raise KeyError(f"DetCo with model.cglc=true needs the patches {missing} in the batch: use the "
                               "detco recipe with data.options.grid=3 (or set model.cglc=false)")
            out["q_l"] = self._local(self.backbone, self.head, batch[PATCHES[VIEWS[0]]])
            out["k_l"] = self._keys(self._local, batch[PATCHES[VIEWS[1]]])
        return out

    def forward(self, batch: dict) -> dict:
        e = self.embeddings(batch)
        total, named = 0.0, {}
        for i, s in enumerate(self.stages):
            pairs = {"gg": ("q_g", "k_g", "global")}
            if self.cglc:
                pairs.update(ll=("q_l", "k_l", "local"), lg=("q_l", "k_g", "global"))
            stage = 0.0
            # one snapshot a queue kind (gg and lg share the global one); enqueueing comes after the loop
            negatives = {kind: self.queues[kind][s].keys.clone() for _, _, kind in pairs.values()}
            for term, (q, k, kind) in pairs.items():
                loss, acc = infonce(e[q][:, i], e[k][:, i], negatives[kind], self.temperature)
                stage = stage + loss
                named[f"{term}_{s}"] = loss.detach()
                if term == "gg":
                    named["acc"] = acc.detach()          # ends as the last stage's global-global
            total = total + self.weights[s] * (stage / len(pairs) if self.combine == "mean" else stage)
        with torch.no_grad():
            for i, s in enumerate(self.stages):
                self.queues["global"][s].enqueue(all_gather_with_grad(e["k_g"][:, i]))
                if self.cglc:
                    self.queues["local"][s].enqueue(all_gather_with_grad(e["k_l"][:, i]))
        logs = dict(zip(named, torch.stack(list(named.values())).float().tolist()))   # one device sync
        return dict(loss=total, **logs)


def build(cfg: dict) -> DetCo:
    """Options live under `model:` (ModelConfig: the backbone keys plus DetCo's)."""
    return build_on_backbone(DetCo, cfg, ModelConfig, "detco")

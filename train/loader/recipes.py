"""Per-method view recipes: which views, crops, flips and boxes one sample gets.

A recipe turns one sample's size and proposals into a `Plan`: every view as a crop +
size + flip of the source image, and every box set in *source* pixels tied to the view
it belongs to. Both backends execute plans (DALI via `geometry.to_view`, the reference
via torchvision's tv_tensors), so the method logic lives here once. Randomness comes
from a `draw` object (`crop(W, H, scale)`, `coin(p)`) and a numpy Generator for the box
samplers, so the reference can substitute torchvision's own crop sampler.
Parameters: methods.md 1.3 (SoCo), 2.3 (DetCon), 3 (MaskCo), 6 (MoCo v2)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import geometry as G

# Colour schemes (methods.md 1.3, 2.3, 6): jitter strengths (b, c, s, h), probabilities.
COLOUR = {
    "byol1": dict(jitter=(0.4, 0.4, 0.2, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=1.0, p_solarize=0.0),
    "byol2": dict(jitter=(0.4, 0.4, 0.2, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=0.1, p_solarize=0.2),
    "moco": dict(jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=0.5, p_solarize=0.0),
}

DEFAULTS = {
    "soco": dict(size=224, size3=112, scale2=(0.5, 1.0), scale3=(0.5, 1.0), k=4, max_tries=5,
                 jitter_prob=0.5, jitter_ratio=0.1, colour=True, star=False, size4=112),
    "detcon": dict(size=224, scale=(0.08, 1.0), mask_source="fh", grid=(5, 5), colour=True),
    "maskco": dict(size=224, scale=(0.2, 1.0), min_overlap=0.5, overlap_tries=10, n_boxes=17,
                   box_side=(32, 128), neg_iou=0.2, colour=True),
    "mocov2": dict(size=224, scale=(0.2, 1.0), colour=True),
}
DEFAULTS["soco_star"] = {**DEFAULTS["soco"], "star": True, "size3": 192}
MASK_SOURCES = ("fh", "mcg", "gt", "grid")


@dataclass
class ViewSpec:
    name: str  # batch key
    size: int
    colour: str  # key of COLOUR
    interp: str = "linear"  # pixels; label maps are always nearest


@dataclass
class Plan:
    views: dict  # view name -> geometry.View
    boxes: dict = field(default_factory=dict)  # batch key -> (view name, source boxes (K,4))
    ids: dict = field(default_factory=dict)  # ids key -> int64 (K,)


class Recipe:
    """Resolved parameters of one recipe; `plan()` draws one sample's geometry."""

    def __init__(self, name: str, image_size: int | None = None, **overrides):
        if name not in DEFAULTS:
            raise ValueError(f"unknown loader recipe {name!r}; choose one of {sorted(DEFAULTS)}")
        cfg = dict(DEFAULTS[name])
        unknown = sorted(set(overrides) - set(cfg))
        if unknown:
            raise ValueError(f"recipe {name!r} has no parameters {unknown}; "
                             f"known: {sorted(cfg)}")
        if image_size:  # scale every pixel size with the main view size
            f = image_size / cfg["size"]
            for key in ("size3", "size4"):
                if key in cfg:
                    cfg[key] = int(round(cfg[key] * f))
            if "box_side" in cfg:
                cfg["box_side"] = tuple(s * f for s in cfg["box_side"])
            cfg["size"] = image_size
        cfg.update(overrides)
        self.name, self.cfg = name, cfg
        self.method = "soco" if name.startswith("soco") else name
        if self.method == "detcon" and cfg["mask_source"] not in MASK_SOURCES:
            raise ValueError(f"detcon mask_source {cfg['mask_source']!r} is not one of {MASK_SOURCES}")
        self.views = self._view_specs()
        self.mask_views = {"mask1": "view1", "mask2": "view2"} if self.method == "detcon" else {}

    def _view_specs(self) -> list[ViewSpec]:
        c, s = self.cfg, self.cfg["size"]
        if self.method == "soco":
            views = [ViewSpec("view1", s, "byol1"), ViewSpec("view2", s, "byol2"),
                     ViewSpec("view3", c["size3"], "byol2")]
            return views + ([ViewSpec("view4", c["size4"], "byol2")] if c["star"] else [])
        if self.method == "detcon":
            return [ViewSpec("view1", s, "byol1", "cubic"), ViewSpec("view2", s, "byol2", "cubic")]
        return [ViewSpec("query", s, "moco"), ViewSpec("key", s, "moco")]

    @property
    def mask_member(self) -> tuple[str, ...]:
        """Shard members the recipe reads besides jpg/boxes/json."""
        src = self.cfg.get("mask_source") if self.method == "detcon" else None
        return (f"{src}.png",) if src in ("fh", "mcg", "gt") else ()

    def plan(self, width: int, height: int, boxes: np.ndarray, draw, rng: np.random.Generator) -> Plan:
        return getattr(self, f"_plan_{self.method}")(width, height, boxes, draw, rng)

    # ------------------------------------------------------------------ recipes
    def _plan_soco(self, W, H, boxes, draw, rng) -> Plan:
        c = self.cfg
        v1 = G.View(0, 0, W, H, c["size"], c["size"], draw.coin(0.5))
        plan = Plan({"view1": v1})
        for tag, size, scale in (("2", c["size"], c["scale2"]), ("3", c["size3"], c["scale3"])):
            least = c["k"] // 2
            for _ in range(c["max_tries"]):  # SoCo: retry the crop, halving what is enough
                x0, y0, w, h = draw.crop(W, H, scale)
                cand = np.flatnonzero(G.overlapping(boxes, G.intersect(v1.rect, np.array(
                    [x0, y0, x0 + w, y0 + h], np.float32))))
                if len(cand) >= least:
                    break
                least //= 2
            view = G.View(x0, y0, w, h, size, size, draw.coin(0.5))
            plan.views[f"view{tag}"] = view
            if len(cand):
                ids = G.choose_shared(rng, cand, c["k"])
                box_a, box_b = boxes[ids], boxes[ids]
            else:  # nothing overlaps: each whole view is the box, one shared id after the proposals
                ids = np.full(c["k"], len(boxes), np.int64)
                box_a, box_b = np.repeat(v1.rect[None], c["k"], 0), np.repeat(view.rect[None], c["k"], 0)
            plan.boxes[f"boxes1_{tag}"] = ("view1", G.jitter(rng, box_a, c["jitter_prob"], c["jitter_ratio"]))
            plan.boxes[f"boxes{tag}"] = (f"view{tag}", box_b)
            plan.ids[f"ids1_{tag}"] = plan.ids[f"ids{tag}"] = ids
        if c["star"]:  # V4: V2's crop at size4 with its own flip, V2's boxes
            v2 = plan.views["view2"]
            plan.views["view4"] = G.View(v2.x0, v2.y0, v2.w, v2.h, c["size4"], c["size4"], draw.coin(0.5))
            plan.boxes["boxes4"] = ("view4", plan.boxes["boxes2"][1])
            plan.ids["ids4"] = plan.ids["ids2"]
        return plan

    def _plan_detcon(self, W, H, boxes, draw, rng) -> Plan:
        s, scale = self.cfg["size"], self.cfg["scale"]
        return Plan({name: G.View(*draw.crop(W, H, scale), s, s, draw.coin(0.5))
                     for name in ("view1", "view2")})

    def _plan_mocov2(self, W, H, boxes, draw, rng) -> Plan:
        s, scale = self.cfg["size"], self.cfg["scale"]
        return Plan({name: G.View(*draw.crop(W, H, scale), s, s, draw.coin(0.5))
                     for name in ("query", "key")})

    def _plan_maskco(self, W, H, boxes, draw, rng) -> Plan:
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
        return Plan({"query": query, "key": key},
                    boxes={"key_boxes": ("key", src), "query_box": ("query", src[:1])})


class NumpyDraw:
    """Crop and coin draws from a numpy Generator (the DALI backend's sampler)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def crop(self, W, H, scale):
        return G.rrc(self.rng, W, H, scale)

    def coin(self, p: float) -> bool:
        return bool(self.rng.random() < p)


def blur_kernel(size: int) -> int:
    """BYOL's blur kernel: about a tenth of the view side, odd."""
    return max(3, int(math.floor(size / 10)) // 2 * 2 + 1)


def label_map(recipe: Recipe, raw, where: str) -> np.ndarray | None:
    """DetCon's source label map (H,W) uint16 for one sample, or None for other recipes."""
    if recipe.method != "detcon":
        return None
    from .source import ShardReadError, decode_png
    src = recipe.cfg["mask_source"]
    if src == "grid":
        return G.grid_labels(raw.height, raw.width, *recipe.cfg["grid"])
    labels = decode_png(raw.members[f"{src}.png"], f"{where} member {raw.key}.{src}.png")
    if labels.shape != (raw.height, raw.width):
        raise ShardReadError(f"{where}: {raw.key}.{src}.png is {labels.shape[::-1]} but the image "
                             f"is {(raw.width, raw.height)}; rebuild the shards with make shards")
    return G.mcg_labels(labels) if src == "mcg" else labels

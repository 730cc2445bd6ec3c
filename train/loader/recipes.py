"""View recipes: which views, crops, flips and boxes one sample gets.

A recipe turns one sample's size and proposals into a `Plan`: every view as a crop +
size + flip of the source image, and every box set in *source* pixels tied to the view
it belongs to. Both backends execute plans (DALI via `geometry.to_view`, the reference
via torchvision's tv_tensors), so the geometry lives in the recipe once. Randomness comes
from a `draw` object (`crop(W, H, scale)`, `coin(p)`) and a numpy Generator for the box
samplers, so the reference can substitute torchvision's own crop sampler.

Each method declares its recipes next to its code (train/methods/<name>.py): a `Recipe`
subclass with `name`, `DEFAULTS`, `view_specs()`, `BOX_SETS`, `MASK_VIEWS` and `plan()`,
registered by name when its module is imported. `Recipe(name, ...)` returns an instance of
the registered subclass, so the loader never branches on method names. Built-in recipes are
found by importing the built-in method modules on first use (at call time, not import time).
Parameters: methods.md 1.3 (SoCo), 2.3 (DetCon), 3 (MaskCo), 6 (MoCo v2)."""
from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from . import geometry as G

# Colour schemes (methods.md 1.3, 2.3, 6): jitter strengths (b, c, s, h), probabilities.
COLOUR = {
    "byol1": dict(jitter=(0.4, 0.4, 0.2, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=1.0, p_solarize=0.0),
    "byol2": dict(jitter=(0.4, 0.4, 0.2, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=0.1, p_solarize=0.2),
    "moco": dict(jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=0.5, p_solarize=0.0),
    # ours, for the synthetic sample (README "Evaluation"): its shapes' colours are drawn at
    # random, so colour must carry no identity -- any hue, strong saturation, grey half the time
    "strong": dict(jitter=(0.4, 0.4, 0.8, 0.5), p_jitter=1.0, p_gray=0.5, p_blur=0.5, p_solarize=0.0),
}


@dataclass
class ViewSpec:
    name: str  # batch key
    size: int
    colour: str  # key of COLOUR
    interp: str = "linear"  # pixels; label maps are always nearest


@dataclass(frozen=True)
class BoxSet:
    """One box set's batch keys, named once (recipe, collate and method share this object).
    `boxes` [B,K,4] in `view` pixels; `ids` [B,K] int64 and `valid` [B,K] bool when the set
    carries ids (Plan.ids[ids]); `single` = one box per sample, batched as [B,4]."""
    boxes: str
    view: str
    ids: str | None = None
    valid: str | None = None
    single: bool = False


@dataclass
class Plan:
    views: dict  # view name -> geometry.View
    boxes: dict = field(default_factory=dict)  # batch key -> (view name, source boxes (K,4))
    ids: dict = field(default_factory=dict)  # ids key -> int64 (K,)


_REGISTRY: dict[str, type] = {}


class Recipe:
    """Resolved parameters of one recipe; `plan()` draws one sample's geometry.

    Subclasses set `name` (registered on definition), `DEFAULTS` (every parameter; the
    recipe options `data.options` may override), `SCALED` (pixel sizes scaled with
    `image_size`), `BOX_SETS`, `MASK_VIEWS` ({mask key: view name}) and implement
    `view_specs()` and `plan()`; optionally `check()`, `mask_member`, `label_map()` and
    `finish(batch)` (last touch on the collated batch)."""

    name: ClassVar[str] = ""
    DEFAULTS: ClassVar[dict] = {}
    SCALED: ClassVar[tuple[str, ...]] = ()
    BOX_SETS: ClassVar[tuple[BoxSet, ...]] = ()
    MASK_VIEWS: ClassVar[dict] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            other = _REGISTRY.get(cls.name)
            if other is not None and other.__qualname__ != cls.__qualname__:
                raise TypeError(f"recipe {cls.name!r} is declared twice ({other.__module__}, {cls.__module__})")
            _REGISTRY[cls.name] = cls

    def __new__(cls, name: str | None = None, image_size: int | None = None, **overrides):
        if cls is Recipe:
            cls = recipe_class(name)
        return object.__new__(cls)

    def __init__(self, name: str | None = None, image_size: int | None = None, **overrides):
        name = name or self.name
        cfg = dict(self.DEFAULTS)
        unknown = sorted(set(overrides) - set(cfg))
        if unknown:
            raise ValueError(f"recipe {name!r} has no parameters {unknown}; "
                             f"known: {sorted(cfg)}")
        if image_size:  # scale every pixel size with the main view size
            f = image_size / cfg["size"]
            for key in self.SCALED:
                v = cfg[key]
                cfg[key] = tuple(s * f for s in v) if isinstance(v, (tuple, list)) else int(round(v * f))
            cfg["size"] = image_size
        cfg.update(overrides)
        self.name, self.cfg = name, cfg
        self.check()
        self.views = self.view_specs()
        scheme = cfg.get("colour")
        if isinstance(scheme, str):  # `colour: <scheme>` replaces every view's own scheme
            if scheme not in COLOUR:
                raise ValueError(f"recipe {name!r}: colour {scheme!r} is not a colour scheme; "
                                 f"choose true, false or one of {sorted(COLOUR)}")
            for v in self.views:
                v.colour = scheme
        self.mask_views = dict(self.MASK_VIEWS)

    def check(self) -> None:
        return None

    def view_specs(self) -> list[ViewSpec]:
        raise NotImplementedError

    @property
    def box_sets(self) -> tuple[BoxSet, ...]:
        return self.BOX_SETS

    @property
    def mask_member(self) -> tuple[str, ...]:
        """Shard members the recipe reads besides jpg/boxes/json."""
        return ()

    def label_map(self, raw, where: str) -> np.ndarray | None:
        """The source label map (H,W) for the mask views, or None."""
        return None

    def plan(self, width: int, height: int, boxes: np.ndarray, draw, rng: np.random.Generator) -> Plan:
        raise NotImplementedError

    def finish(self, batch: dict) -> dict:
        return batch

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """Every key a batch of this recipe carries (train/loader/collate.py adds views, index)."""
        keys = [v.name for v in self.views] + list(self.mask_views)
        for b in self.box_sets:
            keys += [k for k in (b.boxes, b.ids, b.valid) if k]
        return tuple(keys) + ("views", "index")


def _discover() -> None:
    """Import the built-in method modules, which declare (register) their recipes."""
    from train import methods
    for name in methods.known():
        importlib.import_module(f"train.methods.{name}")


def recipe_class(name: str) -> type:
    """The Recipe subclass registered as `name`."""
    if name not in _REGISTRY:
        _discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown loader recipe {name!r}; choose one of {sorted(_REGISTRY)} "
                         "(a method's module declares its recipes)")
    return _REGISTRY[name]


class _Defaults(Mapping):
    """recipe name -> its default parameters, read lazily (built-ins are found on first use)."""

    def _all(self) -> dict:
        _discover()
        return {k: c.DEFAULTS for k, c in _REGISTRY.items()}

    def __getitem__(self, name):
        return recipe_class(name).DEFAULTS

    def __iter__(self):
        return iter(self._all())

    def __len__(self):
        return len(self._all())


DEFAULTS = _Defaults()


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
    """The recipe's source label map (H,W) for one sample (mask views), or None."""
    return recipe.label_map(raw, where)


def two_crops(recipe: Recipe, W: int, H: int, draw, names: tuple[str, str]) -> Plan:
    """Two independent random-resized crops at `size` with a coin flip each (MoCo, DetCon)."""
    s, scale = recipe.cfg["size"], recipe.cfg["scale"]
    return Plan({name: G.View(*draw.crop(W, H, scale), s, s, draw.coin(0.5)) for name in names})

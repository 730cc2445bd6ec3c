"""The reference backend: the same recipes in plain PyTorch + torchvision.transforms.v2.

It is the fallback when DALI is missing and the oracle in tests, so it shares only the
recipe logic (recipes.py) with the DALI backend: crops come from torchvision's own
RandomResizedCrop sampler, flips and colour from torch's RNG and torchvision's
transforms, and boxes and label maps are moved by tv_tensors (BoundingBoxes, Mask),
not by geometry.to_view. Each sample runs under its own torch seed (seed, epoch, slot)
inside `torch.random.fork_rng`, so results do not depend on workers or resumes and
the caller's RNG is untouched."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms as T, tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from shards import format as fmt

from . import collate, geometry as G
from .recipes import COLOUR, Recipe, blur_kernel, label_map
from .source import BadSamples, ShardReadError, ShardSource
from .split import worker_batches

INTERP = {"linear": F.InterpolationMode.BILINEAR, "cubic": F.InterpolationMode.BICUBIC}


class TorchDraw:
    """Crops from torchvision's RandomResizedCrop sampler, coins from torch.rand."""

    def crop(self, W, H, scale):
        top, left, h, w = T.RandomResizedCrop.get_params(torch.empty(1, H, W, dtype=torch.uint8),
                                                         list(scale), [3 / 4, 4 / 3])
        return left, top, w, h

    def coin(self, p: float) -> bool:
        return bool(torch.rand(()) < p)


def colour_transform(scheme: str, size: int) -> v2.Transform:
    p = COLOUR[scheme]
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(*p["jitter"])], p=p["p_jitter"]),
        v2.RandomGrayscale(p=p["p_gray"]),
        v2.RandomApply([v2.GaussianBlur(blur_kernel(size), sigma=(0.1, 2.0))], p=p["p_blur"]),
        v2.RandomSolarize(threshold=128, p=p["p_solarize"]),
    ])


def geometric(x, view: G.View, interp=F.InterpolationMode.BILINEAR):
    """Crop + resize + mirror any tv_tensor (image, boxes, mask) to `view`."""
    x = F.resized_crop(x, top=int(view.y0), left=int(view.x0), height=int(view.h),
                       width=int(view.w), size=[view.out_h, view.out_w], interpolation=interp,
                       antialias=True)
    return F.horizontal_flip(x) if view.flip else x


def transform_sample(recipe: Recipe, source: ShardSource, index: int, seed_words) -> tuple:
    """One sample -> (views dict, plan, view boxes dict)."""
    seed = int(np.random.SeedSequence(seed_words).generate_state(1)[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed_words + [1])
        raw = source.load(index, recipe.mask_member)
        plan = recipe.plan(raw.width, raw.height, raw.boxes, TorchDraw(), rng)
        where = source.where(index)
        try:  # strict: a JPEG that decodes with errors stops here naming its key
            rgb = fmt.decode_jpeg(raw.jpeg, f"{raw.key}.jpg", raw.width, raw.height)
        except fmt.MemberError as e:
            raise ShardReadError(f"{where}: {e}; rebuild the shards with make shards") from None
        image = tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1))
        out = {}
        for spec in recipe.views:
            x = geometric(image, plan.views[spec.name], INTERP[spec.interp])
            if recipe.cfg["colour"]:
                x = colour_transform(spec.colour, spec.size)(x)
            out[spec.name] = F.normalize(F.to_dtype(x, torch.float32, scale=True),
                                         collate.MEAN, collate.STD).as_subclass(torch.Tensor)
        labels = label_map(recipe, raw, where)
        for mask_key, view_name in recipe.mask_views.items():
            mask = tv_tensors.Mask(torch.from_numpy(labels.astype(np.int64))[None])
            out[mask_key] = geometric(mask, plan.views[view_name],
                                      F.InterpolationMode.NEAREST_EXACT)[0].as_subclass(torch.Tensor)
        view_boxes = {}
        for key, (view_name, src) in plan.boxes.items():
            bb = tv_tensors.BoundingBoxes(torch.from_numpy(np.ascontiguousarray(src)), format="XYXY",
                                          canvas_size=(raw.height, raw.width))
            view_boxes[key] = geometric(bb, plan.views[view_name]).as_subclass(torch.Tensor).numpy()
    return out, plan, view_boxes


def make_batch(recipe, source, samples, slots, epoch, seed, bad: BadSamples) -> dict:
    """One batch; a bad sample goes to `bad` (stop, or the next readable sample in its place)."""
    results, used = [], []
    for i, s in zip(samples, slots):
        j, r = bad.run(source, int(i), lambda j, s=s: (j, transform_sample(
            recipe, source, j, [seed, epoch, int(s)])))
        results.append(r)
        used.append(j)
    batch = {k: torch.stack([r[0][k] for r in results]) for k in results[0][0]}
    return collate.finish(recipe, batch, [r[1] for r in results], [r[2] for r in results],
                          np.asarray(used))


class _Batches(IterableDataset):
    """Yields (batch, bad samples recorded while making it, None) or (None, [], message)
    when the policy says stop: worker processes each hold a copy of the policy, so the
    parent adds their records up, enforces the limit and raises the message itself (a
    worker's exception would reach the user wrapped in its traceback)."""

    def __init__(self, recipe, source, batches, epoch, seed, num_workers, limit):
        self.args = (recipe, source, epoch, seed)
        self.batches, self.num_workers, self.limit = batches, num_workers, limit

    def __iter__(self):
        info = get_worker_info()
        mine = worker_batches(self.batches, self.num_workers, info.id if info else 0) \
            if info else self.batches
        recipe, source, epoch, seed = self.args
        bad = BadSamples(self.limit)
        for samples, slots in mine:
            seen = len(bad.items)
            try:
                batch = make_batch(recipe, source, samples, slots, epoch, seed, bad)
            except ShardReadError as e:
                yield None, bad.items[seen:], str(e)
                return
            yield batch, bad.items[seen:], None


def iterate(recipe: Recipe, source: ShardSource, batches, epoch: int, seed: int, num_workers: int,
            bad: BadSamples | None = None):
    """Yield batches in order; `num_workers` DataLoader processes (0 = in this process).
    bad: the loader's bad-sample policy (default: stop at the first)."""
    if not batches:
        return
    bad = bad if bad is not None else BadSamples(0)
    workers = min(num_workers, len(batches))
    remaining = bad.limit - len(bad.items)
    for batch, items, error in DataLoader(_Batches(recipe, source, batches, epoch, seed, workers,
                                                   remaining),
                                          batch_size=None, num_workers=workers,
                                          persistent_workers=False,
                                          generator=torch.Generator()):  # never draws from the global RNG
        for key, reason in items:
            bad.record(key, ShardReadError(reason))
        if error is not None:
            raise ShardReadError(error)
        yield batch

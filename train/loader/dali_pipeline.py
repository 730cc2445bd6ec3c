"""The DALI backend: one pipeline definition for CPU and GPU.

Python draws each sample's geometry and colour parameters (seeded by epoch and slot,
see split.py) and feeds them, with the JPEG bytes read by offset from the shards,
through ONE external_source, so parameters and pixels cannot fall out of step. DALI
then decodes ("mixed" on GPU, "cpu" otherwise), crops + resizes each view in one
`fn.resize` over the view's ROI (one decode serves all views), applies colour twist,
grayscale (saturation 0), conditional blur and solarize, and mirror + normalise. Label
maps go through the same ROI with nearest-neighbour resize and the same flip. Boxes
never enter DALI: their transform is exact arithmetic (geometry.to_view) in Python.
Differences from torchvision (the reference): DALI applies the jitter's brightness,
contrast, saturation and hue as one colour matrix in a fixed order, and contrast is
taken around mid-grey rather than the image mean."""
from __future__ import annotations

from collections import deque

import cv2
import numpy as np
import torch

from . import collate, geometry as G
from .recipes import COLOUR, NumpyDraw, Recipe, blur_kernel, label_map
from .source import ShardReadError, ShardSource

PER_VIEW = 6  # roi_start, roi_end, mirror, twist (b, c, s, hue degrees), blur sigma (0 = none), solarize
PER_MASK = 3  # label map, roi_start, roi_end (in label-map pixels)


def draw_colour(rng: np.random.Generator, scheme: str, enabled: bool) -> tuple:
    """(twist[4], blur sigma or 0, solarize) for one view; always the same number of draws."""
    p = COLOUR[scheme]
    u = rng.random(4)
    b, c, s, h = p["jitter"]
    f = rng.uniform([1 - b, 1 - c, 1 - s, -h], [1 + b, 1 + c, 1 + s, h])
    sigma = rng.uniform(0.1, 2.0)
    if not enabled:
        return np.array([1, 1, 1, 0], np.float32), np.float32(0), np.bool_(False)
    twist = np.array([*f[:3], f[3] * 360.0], np.float32) if u[0] < p["p_jitter"] else \
        np.array([1, 1, 1, 0], np.float32)
    if u[1] < p["p_gray"]:
        twist[2] = 0.0
    return twist, np.float32(sigma if u[2] < p["p_blur"] else 0.0), np.bool_(u[3] < p["p_solarize"])


def reduction(plan) -> int:
    """Largest JPEG DCT scale-down (1, 2, 4, 8) that still leaves every view's crop at
    least as many pixels as the view has: the views lose nothing, the decode and every
    resize touch up to 64x fewer pixels."""
    shrink = min(min(v.w / v.out_w, v.h / v.out_h) for v in plan.views.values())
    return max((f for f in (1, 2, 4, 8) if f <= shrink), default=1)


def decode_reduced(jpeg: bytes, factor: int, where: str) -> np.ndarray:
    """RGB HWC uint8 at 1/factor of the stored size (libjpeg's reduced IDCT, via OpenCV).
    Pixel j of the result covers stored pixels [factor*j, factor*(j+1)), so crop windows
    just divide by `factor`. EXIF orientation is ignored, as in the reference: shards
    store the pixels their boxes refer to."""
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}[factor] | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), flags)
    if bgr is None:
        raise ShardReadError(f"{where}: the .jpg member does not decode; rebuild the shards "
                             "with make shards (preprocess validates every image)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def check_size(image: np.ndarray, raw, factor: int, where: str) -> np.ndarray:
    """Crop windows come from the json's size: a JPEG of another size would shift them."""
    want = (-(-raw.height // factor), -(-raw.width // factor))
    if image.shape[:2] != want:
        raise ShardReadError(f"{where}: JPEG decodes to {image.shape[:2]} (h, w) at 1/{factor} "
                             f"but its json says {(raw.height, raw.width)}; rebuild the shards")
    return image


class Feeder:
    """The external_source callback: one call = one batch, in split order. What the
    pixels do not carry (plans, sample ids) waits in `pending` for the matching output."""

    def __init__(self, recipe: Recipe, source: ShardSource, batches, epoch: int, seed: int,
                 decode_here: bool = False):
        self.recipe, self.source, self.epoch, self.seed = recipe, source, epoch, seed
        self.decode_here = decode_here
        self.batches = iter(batches)
        self.pending: deque = deque()

    def __call__(self):
        samples, slots = next(self.batches)  # StopIteration ends the epoch
        cols = [[] for _ in range(1 + PER_VIEW * len(self.recipe.views) + PER_MASK * len(self.recipe.mask_views))]
        plans, view_boxes = [], []
        for index, slot in zip(samples, slots):
            rng = np.random.default_rng([self.seed, self.epoch, int(slot)])
            raw = self.source.load(int(index), self.recipe.mask_member)
            plan = self.recipe.plan(raw.width, raw.height, raw.boxes, NumpyDraw(rng), rng)
            where = self.source.where(int(index))
            if self.decode_here:
                factor = reduction(plan)
                cols[0].append(check_size(decode_reduced(raw.jpeg, factor, where), raw, factor, where))
            else:
                factor = 1
                cols[0].append(np.frombuffer(raw.jpeg, np.uint8))
            col = 1
            for spec in self.recipe.views:
                v = plan.views[spec.name]
                twist, sigma, solarize = draw_colour(rng, spec.colour, self.recipe.cfg["colour"])
                cols[col].append(np.array([v.y0, v.x0], np.float32) / factor)
                cols[col + 1].append(np.array([v.y0 + v.h, v.x0 + v.w], np.float32) / factor)
                cols[col + 2].append(np.int32(v.flip))
                cols[col + 3].append(twist)
                cols[col + 4].append(np.array(sigma, np.float32))
                cols[col + 5].append(np.array(solarize))
                col += PER_VIEW
            labels = label_map(self.recipe, raw, where)
            for view_name in self.recipe.mask_views.values():  # full-size maps: unscaled windows
                v = plan.views[view_name]
                cols[col].append(labels[:, :, None])
                cols[col + 1].append(np.array([v.y0, v.x0], np.float32))
                cols[col + 2].append(np.array([v.y0 + v.h, v.x0 + v.w], np.float32))
                col += PER_MASK
            plans.append(plan)
            view_boxes.append({k: G.to_view(b, plan.views[vn]) for k, (vn, b) in plan.boxes.items()})
        self.pending.append((plans, view_boxes, samples))
        return tuple(cols)


def build_pipeline(recipe: Recipe, feeder: Feeder, batch_size: int, num_threads: int,
                   device_id: int | None):
    """The graph. Its input image is JPEG bytes decoded here ("mixed" on GPU) or, when
    `feeder.decode_here`, pixels the feeder already decoded at reduced size."""
    from nvidia.dali import fn, pipeline_def, types
    import nvidia.dali.math as dmath

    gpu = device_id is not None
    interp = {"linear": types.INTERP_LINEAR, "cubic": types.INTERP_CUBIC}
    mean = [m * 255 for m in collate.MEAN]
    std = [s * 255 for s in collate.STD]
    n_views, n_masks = len(recipe.views), len(recipe.mask_views)
    layouts = ["HWC" if feeder.decode_here else None] + [None] * PER_VIEW * n_views + ["HWC", None, None] * n_masks

    @pipeline_def(enable_conditionals=True)
    def views_pipeline():
        ins = fn.external_source(source=feeder, num_outputs=len(layouts), batch=True,
                                 layout=layouts)
        if feeder.decode_here:
            image = ins[0]
        else:  # "mixed": nvJPEG / the hardware JPEG decoder
            image = fn.decoders.image(ins[0], device="mixed" if gpu else "cpu",
                                      output_type=types.RGB, adjust_orientation=False)
        outs, rois = [], {}
        for i, spec in enumerate(recipe.views):
            start, end, mirror, twist, sigma, solarize = ins[1 + PER_VIEW * i: 1 + PER_VIEW * (i + 1)]
            rois[spec.name] = (start, end, mirror)
            x = fn.resize(image, size=[spec.size, spec.size], roi_start=start, roi_end=end,
                          interp_type=interp[spec.interp], antialias=True)
            # float out + clamp: half the cost of uint8 out, same values up to rounding
            x = dmath.clamp(fn.color_twist(x, brightness=twist[0], contrast=twist[1],
                                           saturation=twist[2], hue=twist[3], dtype=types.FLOAT),
                            0.0, 255.0)
            if sigma > 0:  # window 2*ceil(3 sigma)+1 (DALI's default), not BYOL's fixed 23
                x = fn.gaussian_blur(x, sigma=sigma)
            if solarize:
                x = x + (x >= 128.0) * (255.0 - 2.0 * x)
            outs.append(fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW",
                                                 mean=mean, std=std, mirror=mirror))
        for j, (mask_key, view_name) in enumerate(recipe.mask_views.items()):
            mirror = rois[view_name][2]
            size = next(s.size for s in recipe.views if s.name == view_name)
            lab, start, end = ins[1 + PER_VIEW * n_views + PER_MASK * j: 1 + PER_VIEW * n_views + PER_MASK * (j + 1)]
            lab = lab.gpu() if gpu else lab
            lab = fn.resize(lab, size=[size, size], roi_start=start, roi_end=end,
                            interp_type=types.INTERP_NN, antialias=False)
            outs.append(fn.cast(fn.flip(lab, horizontal=mirror), dtype=types.INT32))
        return tuple(outs)

    return views_pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                          prefetch_queue_depth=2, seed=0)


def to_torch(tensor_list) -> torch.Tensor:
    """Copy a dense DALI batch into a torch tensor on the batch's device (DALI reuses its
    buffers, so a copy is required)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    t = tensor_list.as_tensor()
    device = "cuda" if hasattr(t, "device_id") and type(t).__name__.endswith("GPU") else "cpu"
    out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
    feed_ndarray(t, out)
    return out


def iterate(recipe: Recipe, source: ShardSource, batches, epoch: int, seed: int,
            batch_size: int, num_threads: int, device_id: int | None, decode: str = "auto"):
    """Yield finished batch dicts for `batches` (a list of (samples, slots)).
    decode: "dali" (DALI's decoder), "feeder" (OpenCV reduced-size decode in the feeder)
    or "auto" (feeder on CPU, where it measured faster; DALI's mixed decode on GPU)."""
    if not batches:
        return
    feeder = Feeder(recipe, source, batches, epoch, seed, decode_here=decode == "feeder" or (decode == "auto" and device_id is None))
    pipe = build_pipeline(recipe, feeder, batch_size, num_threads, device_id)
    pipe.build()
    names = [s.name for s in recipe.views] + list(recipe.mask_views)
    try:
        for _ in range(len(batches)):
            outputs = pipe.run()
            plans, view_boxes, samples = feeder.pending.popleft()
            batch = {}
            for name, out in zip(names, outputs):
                t = to_torch(out)
                batch[name] = t.long() if name.startswith("mask") else t
            if batch.get("mask1") is not None:
                for m in recipe.mask_views:
                    batch[m] = batch[m][..., 0]
            yield collate.finish(recipe, batch, plans, view_boxes, samples)
    finally:
        del pipe

"""The DALI backend: one pipeline definition for CPU and GPU.

Python draws each sample's geometry and colour parameters (seeded by epoch and slot,
see split.py) and feeds them, with the image read by offset from the shards, through
ONE external_source, so parameters and pixels cannot fall out of step. DALI crops +
resizes each view in one `fn.resize` over the view's ROI, applies colour twist,
grayscale (saturation 0), conditional blur and solarize, and mirror + normalise. Label
maps go through the same window with nearest-neighbour resize and the same flip. Boxes
never enter DALI: their transform is exact arithmetic (geometry.to_view) in Python.

Where the image is decoded (`decode`): "dali" feeds JPEG bytes and DALI decodes once
for all views ("mixed" = nvJPEG on GPU). "feeder" (the CPU default) decodes in the
feeder with OpenCV at the largest DCT reduction every view allows and gives each view
its own pyramid level (2x2 area averages) holding at least the view's pixels: DALI's
antialiased CPU resize costs in proportion to the input window, and measured as the
largest single cost (bench/loader.py), so views that shrink 2x or more start smaller.
Differences from torchvision (the reference): DALI applies the jitter's brightness,
contrast, saturation and hue as one colour matrix in a fixed order, and contrast is
taken around mid-grey rather than the image mean.

Blur is `fn.filter` run twice with a per-sample 1-D Gaussian the feeder computes
(`gaussian_taps`): the same kernel and reflect-101 border as `fn.gaussian_blur` (a test
checks they agree), at a fifth of its CPU cost (measured on 224 px float views: about
0.3 ms against 1.2-2.3 ms for sigma 0.5-2)."""
from __future__ import annotations

from collections import deque

import cv2
import numpy as np
import torch

from shards import format as fmt

from . import collate, geometry as G
from .recipes import COLOUR, NumpyDraw, Recipe, label_map
from .source import BadSamples, ShardReadError, ShardSource

MASK_INPUTS = ("labels", "start", "end")  # windows in label-map pixels


def view_inputs(recipe: Recipe, colour_scheme: str) -> tuple[str, ...]:
    """A view's per-sample parameters that its graph uses (no colour when colour is off;
    no blur taps / solarize flag where their probability is 0, no blur flag `sigma`
    where blur always applies)."""
    p = COLOUR[colour_scheme]
    names = ("start", "end", "mirror")
    if recipe.cfg["colour"]:
        names += ("twist",) + (("sigma",) if 0 < p["p_blur"] < 1 else ()) + \
            (("taps",) if p["p_blur"] > 0 else ()) + \
            (("solarize",) if p["p_solarize"] > 0 else ())
    return names


def input_names(recipe: Recipe, decode_here: bool) -> list[str]:
    """The external_source outputs, in order: the feeder and the graph both use this."""
    names = [] if decode_here else ["jpeg"]
    for spec in recipe.views:
        names += ([f"{spec.name}.image"] if decode_here else []) + \
            [f"{spec.name}.{k}" for k in view_inputs(recipe, spec.colour)]
    for mask_key in recipe.mask_views:
        names += [f"{mask_key}.{k}" for k in MASK_INPUTS]
    return names


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


def gaussian_taps(sigma: float) -> np.ndarray:
    """The normalised 1-D Gaussian of `fn.gaussian_blur`'s default window, 2*ceil(3 sigma)+1
    taps (not BYOL's fixed 23: the weights past 3 sigma are below 1.2% of the centre);
    one tap of 1 for sigma 0, so unblurred samples still feed a valid filter."""
    radius = int(np.ceil(3 * sigma)) if sigma > 0 else 0
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-x * x / (2 * sigma * sigma)) if sigma > 0 else np.ones(1)
    return (taps / taps.sum()).astype(np.float32)


def shrink_of(view: G.View) -> float:
    return min(view.w / view.out_w, view.h / view.out_h)


def pow2_at_most(x: float, cap: int = 8) -> int:
    f = 1
    while f * 2 <= min(x, cap):
        f *= 2
    return f


def decode_reduced(raw, factor: int, where: str) -> np.ndarray:
    """RGB HWC uint8 at 1/factor of the stored size (shards.format.decode_jpeg: libjpeg's
    reduced IDCT, strict, so a JPEG that decodes with errors stops here naming its key).
    Pixel j of the result covers stored pixels [factor*j, factor*(j+1)); crop windows come
    from the index's size, which the decode must match."""
    try:
        return fmt.decode_jpeg(raw.jpeg, f"{raw.key}.jpg", raw.width, raw.height, factor)
    except fmt.MemberError as e:
        raise ShardReadError(f"{where}: {e}; rebuild the shards with make shards (it decodes "
                             "every image strictly)") from None


class Pyramid:
    """One sample's decoded image at the coarsest DCT reduction all its views allow, and
    further 2x area-averaged levels on demand; `for_view` picks the smallest level that
    still holds the view's pixels and maps the crop window into it."""

    def __init__(self, raw, plan, where: str):
        self.raw = raw
        self.base = pow2_at_most(min(shrink_of(v) for v in plan.views.values()))
        self.levels = {1: decode_reduced(raw, self.base, where)}

    def for_view(self, view: G.View) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g = pow2_at_most(shrink_of(view) / self.base)
        while g not in self.levels:  # levels are 1, 2, 4, ...: halve the finest missing one
            top = max(self.levels)
            h, w = self.levels[top].shape[:2]
            self.levels[top * 2] = cv2.resize(self.levels[top], (max(w // 2, 1), max(h // 2, 1)),
                                              interpolation=cv2.INTER_AREA)
        image = self.levels[g]
        scale = np.array([image.shape[0] / self.raw.height, image.shape[1] / self.raw.width], np.float32)
        return (image, np.array([view.y0, view.x0], np.float32) * scale,
                np.array([view.y0 + view.h, view.x0 + view.w], np.float32) * scale)


class Feeder:
    """The external_source callback: one call = one batch, in split order. What the
    pixels do not carry (plans, sample ids) waits in `pending` for the matching output.
    A sample that fails to read or decode goes to the loader's BadSamples policy
    (source.py): stop, or be replaced by the next readable sample."""

    def __init__(self, recipe: Recipe, source: ShardSource, batches, epoch: int, seed: int,
                 decode_here: bool = False, bad: BadSamples | None = None):
        self.recipe, self.source, self.epoch, self.seed = recipe, source, epoch, seed
        self.decode_here = decode_here
        self.bad = bad if bad is not None else BadSamples(0)
        self.names = input_names(recipe, decode_here)
        self.batches = iter(batches)
        self.pending: deque = deque()

    def sample(self, index: int, slot: int) -> tuple:
        """(index, {input name: value}, plan, view boxes) of one sample; raises
        ShardReadError before anything of it reaches the batch."""
        rng = np.random.default_rng([self.seed, self.epoch, int(slot)])
        raw = self.source.load(index, self.recipe.mask_member)
        plan = self.recipe.plan(raw.width, raw.height, raw.boxes, NumpyDraw(rng), rng)
        where = self.source.where(index)
        cols = {}
        if self.decode_here:
            pyramid = Pyramid(raw, plan, where)
        else:
            cols["jpeg"] = np.frombuffer(raw.jpeg, np.uint8)
        for spec in self.recipe.views:
            v, n = plan.views[spec.name], spec.name
            twist, sigma, solarize = draw_colour(rng, spec.colour, self.recipe.cfg["colour"])
            if self.decode_here:
                image, start, end = pyramid.for_view(v)
                cols[f"{n}.image"] = image
            else:
                start = np.array([v.y0, v.x0], np.float32)
                end = np.array([v.y0 + v.h, v.x0 + v.w], np.float32)
            values = {"start": start, "end": end, "mirror": np.int32(v.flip),
                      "twist": twist,  # brightness, contrast, saturation, hue in degrees
                      "sigma": np.array(sigma, np.float32), "solarize": np.array(solarize)}
            if f"{n}.taps" in self.names:  # only views that can blur feed a kernel
                values["taps"] = gaussian_taps(float(sigma))
            for k, value in values.items():
                cols[f"{n}.{k}"] = value
        labels = label_map(self.recipe, raw, where)
        for mask_key, view_name in self.recipe.mask_views.items():  # full-size maps
            v = plan.views[view_name]
            cols[f"{mask_key}.labels"] = labels[:, :, None]
            cols[f"{mask_key}.start"] = np.array([v.y0, v.x0], np.float32)
            cols[f"{mask_key}.end"] = np.array([v.y0 + v.h, v.x0 + v.w], np.float32)
        boxes = {k: G.to_view(b, plan.views[vn]) for k, (vn, b) in plan.boxes.items()}
        return index, cols, plan, boxes

    def __call__(self):
        samples, slots = next(self.batches)  # StopIteration ends the epoch
        cols = {name: [] for name in self.names}
        plans, view_boxes, used = [], [], []
        for index, slot in zip(samples, slots):
            i, values, plan, boxes = self.bad.run(self.source, int(index),
                                                  lambda j, slot=slot: self.sample(j, slot))
            for name in self.names:
                cols[name].append(values[name])
            used.append(i)
            plans.append(plan)
            view_boxes.append(boxes)
        out = tuple(cols[name] for name in self.names)
        # no_copy: DALI reads these arrays in place, so they live until the batch is out
        self.pending.append((plans, view_boxes, np.asarray(used), out))
        return out


def separable_blur(x, taps):
    """Rows then columns with the sample's 1-D Gaussian `taps` (reflect-101 border); the
    GPU fn.filter takes its filters from the CPU too, so one graph serves both."""
    from nvidia.dali import fn
    return fn.filter(fn.filter(x, fn.reshape(taps, shape=[1, -1])), fn.reshape(taps, shape=[-1, 1]))


def build_pipeline(recipe: Recipe, feeder: Feeder, batch_size: int, num_threads: int,
                   device_id: int | None):
    """The graph; the same for CPU and GPU. Views crop from the image DALI decoded
    ("mixed" on GPU) or, with `feeder.decode_here`, from the level the feeder chose."""
    from nvidia.dali import fn, pipeline_def, types
    import nvidia.dali.math as dmath

    gpu = device_id is not None
    interp = {"linear": types.INTERP_LINEAR, "cubic": types.INTERP_CUBIC}
    mean = [m * 255 for m in collate.MEAN]
    std = [s * 255 for s in collate.STD]
    names = feeder.names
    layouts = ["HWC" if n.endswith((".image", ".labels")) else None for n in names]

    @pipeline_def(enable_conditionals=True)
    def views_pipeline():
        ins = dict(zip(names, fn.external_source(source=feeder, num_outputs=len(names),
                                                 batch=True, layout=layouts, no_copy=True)))
        if not feeder.decode_here:
            image = fn.decoders.image(ins["jpeg"], device="mixed" if gpu else "cpu",
                                      output_type=types.RGB, adjust_orientation=False)
        outs = []
        for spec in recipe.views:
            n = spec.name
            src = ins[f"{n}.image"] if feeder.decode_here else image
            src = src.gpu() if gpu and feeder.decode_here else src
            x = fn.resize(src, size=[spec.size, spec.size], roi_start=ins[f"{n}.start"],
                          roi_end=ins[f"{n}.end"], interp_type=interp[spec.interp], antialias=True)
            p = COLOUR[spec.colour]
            if recipe.cfg["colour"]:  # ops with probability 0 or 1 skip the conditional's copies
                twist = ins[f"{n}.twist"]
                # float out, then clamp: half the cost of uint8 out, same values up to
                # rounding; min(max()) measured 2.5x faster than math.clamp on CPU
                x = dmath.min(dmath.max(fn.color_twist(
                    x, brightness=twist[0], contrast=twist[1], saturation=twist[2],
                    hue=twist[3], dtype=types.FLOAT), 0.0), 255.0)
                if p["p_blur"] >= 1:
                    x = separable_blur(x, ins[f"{n}.taps"])
                elif p["p_blur"] > 0 and ins[f"{n}.sigma"] > 0:
                    x = separable_blur(x, ins[f"{n}.taps"])
                if p["p_solarize"] > 0 and ins[f"{n}.solarize"]:
                    x = x + (x >= 128.0) * (255.0 - 2.0 * x)
            outs.append(fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mean=mean,
                                                 std=std, mirror=ins[f"{n}.mirror"]))
        for mask_key, view_name in recipe.mask_views.items():
            size = next(s.size for s in recipe.views if s.name == view_name)
            lab = ins[f"{mask_key}.labels"]
            lab = lab.gpu() if gpu else lab
            lab = fn.resize(lab, size=[size, size], roi_start=ins[f"{mask_key}.start"],
                            roi_end=ins[f"{mask_key}.end"], interp_type=types.INTERP_NN,
                            antialias=False)
            outs.append(fn.cast(fn.flip(lab, horizontal=ins[f"{view_name}.mirror"]), dtype=types.INT32))
        return tuple(outs)

    return views_pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                          prefetch_queue_depth=2, seed=0)


def to_torch(tensor_list) -> torch.Tensor:
    """Copy a dense DALI batch into a torch tensor on the batch's device (DALI reuses its
    buffers, so a copy is required; on CPU numpy's copy measured 5x faster than
    feed_ndarray)."""
    t = tensor_list.as_tensor()
    if not type(t).__name__.endswith("GPU"):
        view = np.asarray(t)
        out = np.empty(view.shape, view.dtype)
        np.copyto(out, view)  # measured 20% faster than np.array(t)
        return torch.from_numpy(out)
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
    out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device="cuda")
    feed_ndarray(t, out)
    return out


def iterate(recipe: Recipe, source: ShardSource, batches, epoch: int, seed: int,
            batch_size: int, num_threads: int, device_id: int | None, decode: str = "auto",
            bad: BadSamples | None = None):
    """Yield finished batch dicts for `batches` (a list of (samples, slots)).
    decode: "dali" (DALI's decoder), "feeder" (OpenCV decode + pyramid in the feeder)
    or "auto" (feeder on CPU, where it measured faster; DALI's mixed decode on GPU).
    bad: the loader's bad-sample policy (default: stop at the first)."""
    if not batches:
        return
    decode_here = decode == "feeder" or (decode == "auto" and device_id is None)
    feeder = Feeder(recipe, source, batches, epoch, seed, decode_here, bad)
    pipe = build_pipeline(recipe, feeder, batch_size, num_threads, device_id)
    pipe.build()
    names = [s.name for s in recipe.views] + list(recipe.mask_views)
    try:
        for _ in range(len(batches)):
            outputs = pipe.run()
            plans, view_boxes, samples, _inputs = feeder.pending.popleft()
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

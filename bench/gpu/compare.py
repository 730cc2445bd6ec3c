"""One batch of a recipe from two DALI graphs fed the SAME plans, compared key by key.

The loader's Feeder draws every sample's plan (crop windows, flips, box choice, colour
parameters) in Python from (seed, epoch, slot) alone, and the graph only executes it, so
two graphs run over the same split batch with the same seed and the same decode path are
fed identical external_source inputs, whatever their device. `first_batch` runs
`train.loader.dali_pipeline.iterate` (the code the trainer's loader runs) on one device;
`compare_batches` then demands exact equality of everything the plan decides (boxes, ids,
valid flags, view windows, sample index: all exact Python arithmetic) and of the masks
(nearest-neighbour label maps, no arithmetic on values), and pixels within PIXEL_TOL.

Pixel tolerance, on the 0-255 scale (normalisation undone), for every sample's view:
mean |diff| <= 1.5 and at most 1% of values off by more than 16. Single values are not
bounded (the largest |diff| is recorded). Why: the GPU decodes with nvJPEG and
the CPU with libjpeg-turbo, whose IDCT and chroma upsampling differ by a few levels and, on
sharp colour edges of 4:2:0 JPEGs, by tens of levels at single pixels; resize, colour twist
and blur run the same formulas in float on both. Measured on CPU with this harness (SoCo,
batch 8): DALI's decoder against the feeder's reduced IDCT + pyramid, same plans, 640x480
photo-like shards: mean |diff| 0.02-0.44 and max 11 per view (two legitimate decode paths).
What the check is for moves the per-sample mean further: colour augmentation off 3-31, a
view mirrored 17-62, a view shifted by one output pixel 5.3-10.6 on photo-like images but
only 1.0-3.6 on the built-in sample's flat shapes, which is why the GPU check compares on
both."""
from __future__ import annotations

import numpy as np
import torch

MEAN_ABS_TOL = 1.5     # per view, 0-255 scale
BIG_DIFF = 16.0        # a value off by more than this counts as "big"
BIG_SHARE_TOL = 0.01   # share of big differences allowed per view
PIXEL_TOL = {"mean_abs": MEAN_ABS_TOL, "big_diff": BIG_DIFF, "big_share": BIG_SHARE_TOL}


def device_name(device_id: int | None) -> str:
    return "cpu" if device_id is None else f"cuda:{device_id}"


def graph_batches(recipe: str, shards, batch_size: int, seed: int, device_id: int | None,
                  decode: str = "dali", image_size: int | None = None, num_threads: int = 2,
                  batches: int | None = None, **overrides):
    """Epoch 0's batches (the first `batches` of them) from the DALI graph on `device_id`
    (None = CPU), as `train.loader.dali_pipeline.iterate` yields them (GPU tensors on a GPU).
    decode "dali" is the GPU graph's plan path (JPEG bytes and windows in stored pixels into
    the graph; "mixed" decode on a GPU); "feeder" decodes in Python; "auto" as the loader.
    The plans depend on (seed, epoch, slot) only, never on the device."""
    from train.loader import build_loader, dali_available
    if not dali_available():
        raise RuntimeError("nvidia-dali is not installed: the graph comparison needs it "
                           "(pip install the nvidia-dali wheel pinned in requirements.txt)")
    from train.loader import dali_pipeline
    # build_loader resolves the recipe, the shard index and the split; the device is
    # passed to iterate explicitly, because build_loader maps None to "the current GPU"
    loader = build_loader(recipe, shards, batch_size, seed=seed, backend="dali",
                          image_size=image_size, decode=decode, **overrides)
    chosen = loader.split.batches(0)[:batches]
    return dali_pipeline.iterate(loader.recipe, loader.source, chosen, 0, loader.split.seed,
                                 batch_size, num_threads, device_id, decode)


def first_batch(recipe: str, shards, batch_size: int, seed: int, device_id: int | None,
                decode: str = "dali", image_size: int | None = None, num_threads: int = 2,
                **overrides) -> dict:
    """The first batch of `graph_batches`, every tensor moved to the CPU."""
    it = graph_batches(recipe, shards, batch_size, seed, device_id, decode, image_size, num_threads,
                       batches=1, **overrides)
    try:
        batch = next(it)
    finally:
        it.close()
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def pixel_keys(recipe: str, **overrides) -> list[str]:
    """The batch keys that hold view pixels (the rest must be equal exactly)."""
    from train.loader.recipes import Recipe
    return [s.name for s in Recipe(recipe, **overrides).views]


def to_255(view: torch.Tensor) -> torch.Tensor:
    """Undo the loader's ImageNet normalisation: [B,3,H,W] float -> the 0-255 scale."""
    from train.loader.collate import MEAN, STD
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    return (view.double() * std + mean) * 255.0


def pixel_stats(a: torch.Tensor, b: torch.Tensor) -> dict:
    """|a - b| on the 0-255 scale, over the batch and per sample: the tolerance holds for
    each sample's view, so one bad sample is not averaged away by the good ones."""
    d = (to_255(a) - to_255(b)).abs()
    per_mean = d.flatten(1).mean(1)
    per_big = (d.flatten(1) > BIG_DIFF).double().mean(1)
    flat = d.flatten()
    sub = flat[:: max(1, flat.numel() // 1_000_000)].float()  # quantile's input limit
    return {"max_abs": float(flat.max()), "mean_abs": float(flat.mean()),
            "p999_abs": float(torch.quantile(sub, 0.999)),
            "big_share": float((flat > BIG_DIFF).double().mean()),
            "worst_sample_mean_abs": float(per_mean.max()), "worst_sample_big_share": float(per_big.max()),
            "worst_sample": int(torch.argmax(per_mean / MEAN_ABS_TOL + per_big / BIG_SHARE_TOL))}


def first_difference(a: torch.Tensor, b: torch.Tensor, index) -> str:
    diff = (a != b) if not a.is_floating_point() else ~torch.isclose(a, b, rtol=0, atol=0, equal_nan=True)
    where = tuple(int(i) for i in torch.nonzero(diff)[0])
    sample = f"sample {where[0]} (shard index {int(index[where[0]])})" if index is not None else f"at {where}"
    return (f"{int(diff.sum())} of {diff.numel()} values differ, first {sample} at {list(where)}: "
            f"{a[where].item()} vs {b[where].item()}")


def compare_batches(recipe: str, a: dict, b: dict, names: tuple[str, str] = ("a", "b"),
                    pixels: list[str] | None = None, tol: dict = PIXEL_TOL) -> dict:
    """Report {recipe, ok, exact: [keys equal], pixels: {key: stats}, problems: [messages]}.
    Every message names the recipe and the batch key."""
    pixels = pixel_keys(recipe) if pixels is None else pixels
    na, nb = names
    problems, exact, stats = [], [], {}
    if set(a) != set(b):
        problems.append(f"{recipe}: batch keys differ: only in {na} {sorted(set(a) - set(b))}, "
                        f"only in {nb} {sorted(set(b) - set(a))}")
    index = a.get("index")
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{recipe}: {key} is {tuple(x.shape)} {x.dtype} in {na} but "
                            f"{tuple(y.shape)} {y.dtype} in {nb}")
            continue
        if key in pixels:
            s = stats[key] = pixel_stats(x, y)
            if not (s["worst_sample_mean_abs"] <= tol["mean_abs"]
                    and s["worst_sample_big_share"] <= tol["big_share"]):
                i = s["worst_sample"]
                where = f"sample {i}" + (f" (shard index {int(index[i])})" if index is not None else "")
                problems.append(
                    f"{recipe}: {key} pixels differ beyond tolerance ({na} vs {nb}, 0-255 scale), worst "
                    f"{where}: mean |diff| {s['worst_sample_mean_abs']:.3f} (allowed {tol['mean_abs']}), "
                    f"share off by more than {tol['big_diff']:g} {s['worst_sample_big_share']:.4f} "
                    f"(allowed {tol['big_share']}); batch max |diff| {s['max_abs']:.1f}")
        elif torch.equal(x, y):
            exact.append(key)
        else:
            problems.append(f"{recipe}: {key} differs ({na} vs {nb}; must be equal): "
                            + first_difference(x, y, index))
    missing = [k for k in pixels if k not in a]
    if missing:
        problems.append(f"{recipe}: view keys {missing} are not in the batch")
    return {"recipe": recipe, "ok": not problems, "exact": exact, "pixels": stats,
            "problems": problems}


def compare_graphs(recipe: str, shards, plans_seed: int, device_a: int | None,
                   device_b: int | None, batch_size: int = 8, decode: str = "dali",
                   image_size: int | None = None, num_threads: int = 2, **overrides) -> dict:
    """One batch of `recipe` from the DALI graph on `device_a` and on `device_b` (None = CPU,
    an int = that CUDA device), both fed the plans drawn from `plans_seed`, compared by
    `compare_batches`. The report adds the devices, the decode path and the tolerance."""
    names = (device_name(device_a), device_name(device_b))
    a, b = (first_batch(recipe, shards, batch_size, plans_seed, dev, decode, image_size, num_threads,
                        **overrides) for dev in (device_a, device_b))
    report = compare_batches(recipe, a, b, names, pixel_keys(recipe, **overrides))
    report.update(devices=list(names), decode=decode, seed=plans_seed, batch_size=batch_size,
                  tolerance=PIXEL_TOL)
    return report

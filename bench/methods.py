"""`make bench-methods`: training-step time of every method's small CPU config, as ratios
to MoCo v2 measured in the same process.

Builds photo-like 640x480 shards with the real shard writer (bench.shards.photo_shards),
draws a few real batches per method with the loader (reference backend, drawn once and
reused, so data loading is not in the figure), then times the trainer's own
`train_step` (forward, backward, optimiser, scheduler, target/EMA update) round-robin
over the methods for several rounds so machine load hits all alike. One torch thread;
ratios use process CPU time (wall time is recorded too).
Writes bench/results/methods.json (median seconds a step, ratios to MoCo v2, and the
ratio one would expect from counting backbone passes; the bytes autograd keeps a step; and
ccMIM's masking ablation: attention-guided over random masking, the cost of its extra no-grad pass)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common.io import atomic_write_text
from common.progress import Progress

RESULTS = Path(__file__).resolve().parent / "results" / "methods.json"
CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"
BASELINE = "mocov2"
# name: (small config, overrides). DetCon on the grid source: the bench shards' FH maps are
# synthetic, and the step cost does not depend on where the masks come from.
METHODS = {
    "mocov2": ("mocov2_small_cpu", []),
    "detcon_b": ("detcon_b_small_cpu", ["data.options.mask_source=grid"]),
    "detcon_s": ("detcon_s_small_cpu", ["data.options.mask_source=grid"]),
    "maskco": ("maskco_small_cpu", ["model.intra=false"]),   # inter-image negatives only (the recipe is +in)
    "maskco_in": ("maskco_small_cpu", ["model.intra=true"]),
    # DetCo and the slides' ablation rows: without CGLC (no patches) and without HIC (res5 only)
    "detco": ("detco_small_cpu", []),
    "detco_no_cglc": ("detco_small_cpu", ["model.cglc=false", "data.options.grid=0"]),
    "detco_no_hic": ("detco_small_cpu", ["model.hic=false"]),
    "ccmim": ("ccmim_small_cpu", []),
    "ccmim_random": ("ccmim_small_cpu", ["model.masking=random"]),
}
# Backbone work a step, counting forward = 1 and backward = 2 per view:
# MoCo v2 / MaskCo: query fwd+bwd (3) + key fwd (1) = 4; DetCon-B: 2 x 3 + 2 target fwd = 8;
# DetCon-S: 2 x 3 = 6. MaskCo adds its MPH on top.
# DetCo: MoCo v2's 4 plus the 9 patches a view at 9 x (18/64)^2 = 0.71 of a view's pixels,
# again 3 (query) + 1 (key): 4 + 4 x 0.71 = 6.85, i.e. 1.71x (heads on res2..res4 not counted).
DETCO_PATCH_SHARE = 9 * (round(64 * 64 / 224) / 64) ** 2
EXPECTED = {"mocov2": 1.0, "detcon_b": 2.0, "detcon_s": 1.5, "maskco": 1.0, "maskco_in": 1.0,
            "detco": 1 + DETCO_PATCH_SHARE, "detco_no_cglc": 1.0, "detco_no_hic": 1 + DETCO_PATCH_SHARE,
            "ccmim": None, "ccmim_random": None}   # a ViT: no backbone-pass count against a ResNet


def ccmim_expected_ratio(cfg: dict) -> float:
    """ccMIM attention / random masking step cost by counting multiply-adds of the Transformer
    blocks: a block on N tokens of width D costs N (12 D^2 + 2 N D) (qkv, projection, MLP x4;
    scores and weighted sum), a backward twice its forward. Random: encoder fwd+bwd on CLS + K
    visible, fwd on CLS + (L-K) masked (no gradient), decoder fwd+bwd on 1 + L. Attention adds
    one encoder fwd on 1 + L (the importance pass)."""
    m = cfg["model"]
    o = m["backbone_options"]
    L = (o.get("img_size", 224) // o.get("patch_size", 16)) ** 2
    K = int(L * (1 - m["mask_ratio"]))

    def blocks(n: int, depth: int, d: int) -> float:
        return depth * n * (12 * d * d + 2 * n * d)

    def enc(n: int) -> float:
        return blocks(n, o.get("depth", 12), o.get("embed_dim", 768))

    random = 3 * enc(1 + K) + enc(1 + L - K) + 3 * blocks(1 + L, m["decoder_depth"], m["decoder_dim"])
    return (random + enc(1 + L)) / random


def autograd_saved_bytes(setup) -> int:
    """Bytes of the tensors autograd keeps for backward in one training step (distinct storages):
    the activation memory that sets the peak; a no-grad pass adds only transient buffers."""
    from train.pretrain import train_step
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(setup.method, setup.method, setup.optimizer, setup.scheduler, setup.scaler, setup.batches[0],
                   None, setup.step, setup.total)
    setup.step += 1
    return sum(seen.values())


class Setup:
    """One method ready to step: model, optimiser, scheduler and fixed real batches."""

    def __init__(self, name: str, shards: Path, batch: int, image_size: int, n_batches: int, total: int):
        from train.config import load_config
        from train.loader import build_loader
        from train.optim import build_optimizer, build_scheduler
        from train.methods import build_method, recipe_name
        config, extra = METHODS[name]
        vit = [f"model.backbone_options.img_size={image_size}"] if name.startswith("ccmim") else []  # ViT grid = view
        self.cfg = load_config(CONFIGS / f"{config}.yaml", [
            f"data.shards={shards}", f"data.batch_size={batch}", f"data.image_size={image_size}", *vit, *extra])
        torch.manual_seed(0)
        module, self.method = build_method(self.cfg)
        self.method.train()
        self.optimizer = build_optimizer(self.method, self.cfg, batch)
        self.scheduler = build_scheduler(self.optimizer, self.cfg, total, total)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        options = self.cfg["data"].get("options") or {}
        loader = build_loader(recipe_name(self.cfg, module, self.method), str(shards), batch, backend="reference", num_workers=0,
                              seed=0, image_size=image_size, **options)
        it = iter(loader)
        self.batches = [next(it) for _ in range(n_batches)]
        self.params = sum(p.numel() for p in self.method.parameters() if p.requires_grad)
        self.step, self.total = 0, total

    def run(self, steps: int) -> list[tuple[float, float]]:
        """(wall, CPU) seconds of each step. CPU time is what the ratios use: on a shared
        machine it is not inflated by other processes taking the core."""
        from train.pretrain import train_step
        times = []
        for _ in range(steps):
            batch = self.batches[self.step % len(self.batches)]
            w0, c0 = time.perf_counter(), time.process_time()
            train_step(self.method, self.method, self.optimizer, self.scheduler, self.scaler, batch,
                       None, self.step, self.total)
            times.append((time.perf_counter() - w0, time.process_time() - c0))
            self.step += 1
        return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="step time per method (small CPU configs), ratios to MoCo v2")
    ap.add_argument("--samples", type=int, default=48, help="images in the bench shards")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=64, help="view side in pixels (the small configs' 64)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per method per round")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    names = a.methods.split(",")
    unknown = [n for n in names if n not in METHODS]
    if unknown or BASELINE not in names:
        ap.error(f"--methods must include {BASELINE} and only names from {', '.join(METHODS)}; got {a.methods}")
    torch.set_num_threads(1)
    from bench.shards import photo_shards

    total = a.warmup + a.steps * a.rounds
    with tempfile.TemporaryDirectory(prefix="bench_methods_", dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        shards = photo_shards(tmp, a.samples, 16, per_shard=64, tag="bench-methods")
        setups = {}
        for name in names:
            setups[name] = Setup(name, shards, a.batch, a.image_size, n_batches=3, total=total)
            setups[name].run(a.warmup)
            print(f"[bench-methods] {name}: ready ({setups[name].params / 1e6:.2f} M trainable parameters)",
                  flush=True)
    runs = {name: [] for name in names}
    progress = Progress("bench-methods", a.rounds * len(names), unit="run")
    for _ in range(a.rounds):
        for name in names:
            runs[name] += setups[name].run(a.steps)
            progress.update()
    median = {name: statistics.median(c for _, c in t) for name, t in runs.items()}
    median_wall = {name: statistics.median(w for w, _ in t) for name, t in runs.items()}
    ratios = {name: median[name] / median[BASELINE] for name in names}
    ratios_wall = {name: median_wall[name] / median_wall[BASELINE] for name in names}
    saved_mb = {name: autograd_saved_bytes(setups[name]) / 2 ** 20 for name in names}
    ccmim = {}
    if {"ccmim", "ccmim_random"} <= set(names):   # the masking ablation: the extra no-grad pass
        ccmim = {"attention_over_random": median["ccmim"] / median["ccmim_random"],
                 "attention_over_random_wall": median_wall["ccmim"] / median_wall["ccmim_random"],
                 "expected_from_block_flops": ccmim_expected_ratio(setups["ccmim"].cfg),
                 "autograd_saved_mb_attention_over_random": saved_mb["ccmim"] / saved_mb["ccmim_random"]}
    report = {"bench": "methods", "what": __doc__.split("\n\n")[0].replace("\n", " "),
              "unit": "CPU seconds per training step (forward, backward, optimiser, EMA), median over "
                      "steps; *_wall: the same in wall-clock seconds",
              "baseline": BASELINE, "params": vars(a),
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "platform": platform.platform(), "load_avg": os.getloadavg()},
              "median_step_s": median, "ratio_to_mocov2": ratios,
              "median_step_s_wall": median_wall, "ratio_to_mocov2_wall": ratios_wall,
              "expected_ratio_from_backbone_passes": {n: EXPECTED[n] for n in names},
              "autograd_saved_mb": saved_mb, "ccmim_masking": ccmim,
              "trainable_params": {n: s.params for n, s in setups.items()},
              "configs": {n: METHODS[n][0] + (" " + " ".join(METHODS[n][1]) if METHODS[n][1] else "")
                          for n in names},
              "runs": runs}
    atomic_write_text(a.out, json.dumps(report, indent=1))
    for name in names:
        expected = "a ViT" if EXPECTED[name] is None else f"backbone-pass count predicts {EXPECTED[name]:.1f}x"
        print(f"[bench-methods] {name}: {1000 * median[name]:.0f} CPU-ms/step = {ratios[name]:.2f}x MoCo v2 "
              f"({expected}); autograd keeps {saved_mb[name]:.1f} MB")
    if ccmim:
        print(f"[bench-methods] ccMIM attention masking = {ccmim['attention_over_random']:.2f}x random masking a step "
              f"(block multiply-adds predict {ccmim['expected_from_block_flops']:.2f}x); autograd memory "
              f"{ccmim['autograd_saved_mb_attention_over_random']:.2f}x")
    print(f"[bench-methods] wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make bench-train`: the SoCo small CPU config through the real trainer, on CPU.

Builds photo-like 640x480 shards with the real shard writer (bench.shards.build_dataset),
then in one process:
  1. compute only: the trainer's step on one cached real batch, timed per phase
     (forward, backward, optimiser + EMA): the baseline, and the split;
  2. the trainer itself (train.pretrain.train: DALI loader with 1 thread, background
     prefetch, metrics; 1 torch thread) for --steps steps; steady-state steps/s and data-wait share from its
     metrics.jsonl, first --warmup steps excluded (pipeline start-up);
  3. the same with prefetch off (data.prefetch=0), to show what prefetching buys.
Figures are ratios to (1) measured in the same process. Target: data-wait < 5% of
the step. Writes bench/results/train.json."""
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

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"
CONFIG = Path(__file__).resolve().parents[1] / "train" / "configs" / "soco_small_cpu.yaml"
TARGET_WAIT = 0.05


def compute_split(cfg: dict, steps: int, warmup: int) -> dict:
    """Per-phase seconds of the training step on one cached batch (no data loading)."""
    from train.loader import build_loader
    from train.optim import build_optimizer, build_scheduler
    from train.pretrain import build_method
    torch.manual_seed(0)
    module, method = build_method(cfg)
    method.train()
    loader = build_loader(module.RECIPE, cfg["data"]["shards"], cfg["data"]["batch_size"], backend="reference",
                          num_workers=0, image_size=cfg["data"]["image_size"])
    batch = next(iter(loader))
    total = steps + warmup
    opt = build_optimizer(method, cfg, cfg["data"]["batch_size"])
    sched = build_scheduler(opt, cfg, total, total)
    phases = {"forward": [], "backward": [], "optimiser": [], "step": []}
    for i in range(total):
        t0 = time.perf_counter()
        loss = method(batch)["loss"]
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        sched.step()
        method.momentum_update(i + 1, total)
        t3 = time.perf_counter()
        if i >= warmup:
            for k, v in (("forward", t1 - t0), ("backward", t2 - t1), ("optimiser", t3 - t2), ("step", t3 - t0)):
                phases[k].append(v)
    med = {k: statistics.median(v) for k, v in phases.items()}
    return dict(median_s=med, share={k: med[k] / med["step"] for k in ("forward", "backward", "optimiser")})


def trainer_run(cfg_path: Path, overrides: list[str], out: Path, warmup: int) -> dict:
    from train.config import load_config
    from train.pretrain import train
    cfg = load_config(cfg_path, overrides + [f"train.out={out}"])
    t0 = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - t0
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "step_time" in r][warmup:]
    step_time = sum(r["step_time"] for r in steps)
    wait = sum(r["data_wait"] for r in steps)
    median = statistics.median(r["step_time"] for r in steps)
    return dict(steps_per_s=1.0 / median, mean_steps_per_s=len(steps) / step_time,
                data_wait_share=wait / step_time, median_step_s=median,
                data_wait_share_incl_warmup=summary["data_wait_share"], wall_s_incl_startup=wall)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    # One torch thread: the other core is DALI's; with more, OpenMP threads spin against the
    # loader and against other processes, and the figures become noise.
    torch.set_num_threads(1)
    from bench.shards import build_dataset
    from shards.write import PackParams, write_shards
    with tempfile.TemporaryDirectory(prefix="bench_train_", dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        print(f"[bench-train] building {a.samples} photo-like 640x480 samples in {tmp}", flush=True)
        shards = tmp / "shards"
        write_shards("bench", PackParams(max_samples=32), proposals=build_dataset(tmp / "raw", a.samples, 16),
                     out=shards)
        total = a.steps + a.warmup
        common = [f"data.shards={shards}", f"data.batch_size={a.batch}", f"train.steps={total}",
                  "train.checkpoint_every=100000", "export.enabled=false", "train.tensorboard=false",
                  f"train.log_every={max(total // 3, 1)}"]
        from train.config import load_config
        print("[bench-train] 1/3 compute only (cached batch), per phase", flush=True)
        split = compute_split(load_config(CONFIG, common), a.steps, a.warmup)
        base = 1.0 / split["median_s"]["step"]
        print("[bench-train] 2/3 trainer with the DALI loader and prefetch", flush=True)
        prefetch = trainer_run(CONFIG, common + ["data.backend=dali", "data.prefetch=2"], tmp / "run_prefetch", a.warmup)
        print("[bench-train] 3/3 trainer with prefetch off", flush=True)
        inline = trainer_run(CONFIG, common + ["data.backend=dali", "data.prefetch=0"], tmp / "run_inline", a.warmup)
    result = dict(
        bench="train", config="train/configs/soco_small_cpu.yaml", device="cpu",
        torch_threads=torch.get_num_threads(), cpus=os.cpu_count(), load_avg=os.getloadavg(),
        python=platform.python_version(), torch=torch.__version__,
        params=dict(samples=a.samples, steps=a.steps, warmup=a.warmup, batch=a.batch, image_size=64),
        baseline="compute-only step on a cached batch (same process)",
        compute_only=dict(steps_per_s=base, **split),  # steps/s = 1 / median step, as below
        trainer_prefetch=dict(**prefetch, steps_per_s_ratio_to_compute_only=prefetch["steps_per_s"] / base),
        trainer_no_prefetch=dict(**inline, steps_per_s_ratio_to_compute_only=inline["steps_per_s"] / base),
        target=dict(data_wait_share_below=TARGET_WAIT, met=prefetch["data_wait_share"] < TARGET_WAIT),
    )
    atomic_write_text(a.out, json.dumps(result, indent=2) + "\n")
    s = split["share"]
    print(f"[bench-train] done: compute-only {base:.2f} steps/s (forward {s['forward']:.0%}, backward "
          f"{s['backward']:.0%}, optimiser+EMA {s['optimiser']:.0%}); trainer {prefetch['steps_per_s']:.2f} steps/s "
          f"= {result['trainer_prefetch']['steps_per_s_ratio_to_compute_only']:.2f}x compute-only, data-wait "
          f"{prefetch['data_wait_share']:.1%} (target < {TARGET_WAIT:.0%}: {'met' if result['target']['met'] else 'NOT met'}); "
          f"without prefetch data-wait {inline['data_wait_share']:.1%}; wrote {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make bench-train`: the SoCo small CPU config through the real trainer, on CPU.

Builds photo-like 640x480 shards with the real shard writer (bench.shards.photo_shards),
then, in one process, for --rounds rounds (round-robin, so machine load hits all alike):
  1. compute only: the training step on one cached real batch, timed per phase
     (forward, backward, optimiser + EMA): the baseline, and the split;
  2. the trainer itself (train.pretrain.train: DALI loader with 1 thread, background
     prefetch, metrics) for --steps steps after --warmup (pipeline start-up) steps;
     steps/s and data-wait share from its metrics.jsonl;
  3. the same with prefetch off (data.prefetch=0), to show what prefetching buys.
One torch thread (the second core is DALI's). Speeds are 1 / median step time; ratios
to (1) are taken per round, and their median is reported. Target: data-wait < 5% of
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
from common.progress import Progress

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"
CONFIG = Path(__file__).resolve().parents[1] / "train" / "configs" / "soco_small_cpu.yaml"
TARGET_WAIT = 0.05
PHASES = ("forward", "backward", "optimiser")


class ComputeOnly:
    """The training step on one cached real batch, without data loading."""

    def __init__(self, cfg: dict):
        from train.loader import build_loader
        from train.optim import build_optimizer, build_scheduler
        from train.methods import build_method, recipe_name
        torch.manual_seed(0)
        module, self.method = build_method(cfg)
        self.method.train()
        loader = build_loader(recipe_name(cfg, module, self.method), cfg["data"]["shards"], cfg["data"]["batch_size"],
                              backend="reference", num_workers=0, image_size=cfg["data"]["image_size"])
        self.batch = next(iter(loader))
        self.opt = build_optimizer(self.method, cfg, cfg["data"]["batch_size"])
        self.sched = build_scheduler(self.opt, cfg, 10_000, 10_000)
        self.k = 0

    def run(self, steps: int) -> list[dict]:
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = self.method(self.batch)["loss"]
            t1 = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            self.opt.step()
            self.sched.step()
            self.k += 1
            self.method.momentum_update(self.k, 10_000)
            t3 = time.perf_counter()
            out.append(dict(forward=t1 - t0, backward=t2 - t1, optimiser=t3 - t2, step=t3 - t0))
        return out


def trainer_run(overrides: list[str], out: Path, warmup: int) -> list[dict]:
    """Step records (step_time, data_wait) of one real trainer run, warm-up dropped."""
    from train.config import load_config
    from train.pretrain import train
    # online eval off: the photo-like bench shards carry no labels, and its cost is not the loader's
    train(load_config(CONFIG, overrides + [f"train.out={out}", "eval.every=0"]))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "step_time" in r][warmup:]


def speed(steps: list[dict], key: str = "step_time") -> float:
    return 1.0 / statistics.median(r[key] for r in steps)


def wait_share(steps: list[dict]) -> float:
    return sum(r["data_wait"] for r in steps) / sum(r["step_time"] for r in steps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    # One torch thread: the other core is DALI's; with more, OpenMP threads spin against the
    # loader and against other processes, and the figures become noise.
    torch.set_num_threads(1)
    from bench.shards import photo_shards
    from train.config import load_config
    rounds = {"compute": [], "prefetch": [], "inline": []}
    with tempfile.TemporaryDirectory(prefix="bench_train_", dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        shards = photo_shards(tmp, a.samples, 16, per_shard=32, tag="bench-train")
        common = [f"data.shards={shards}", f"data.batch_size={a.batch}", f"train.steps={a.steps + a.warmup}",
                  "train.checkpoint_every=100000", "export.enabled=false", "train.tensorboard=false",
                  f"train.log_every={a.steps + a.warmup}", "data.backend=dali", "data.num_workers=1"]
        compute = ComputeOnly(load_config(CONFIG, common))
        compute.run(a.warmup)
        progress = Progress("bench-train", a.rounds, unit="round", every_s=0)
        for r in range(a.rounds):
            rounds["compute"].append(compute.run(a.steps))
            rounds["prefetch"].append(trainer_run(common + ["data.prefetch=2"], tmp / f"prefetch{r}", a.warmup))
            rounds["inline"].append(trainer_run(common + ["data.prefetch=0"], tmp / f"inline{r}", a.warmup))
            progress.update()
    per_round = [dict(compute_steps_per_s=speed(c, "step"), prefetch_steps_per_s=speed(p),
                      inline_steps_per_s=speed(i), prefetch_ratio=speed(p) / speed(c, "step"),
                      inline_ratio=speed(i) / speed(c, "step"), prefetch_data_wait=wait_share(p),
                      inline_data_wait=wait_share(i))
                 for c, p, i in zip(rounds["compute"], rounds["prefetch"], rounds["inline"])]
    all_compute = [s for c in rounds["compute"] for s in c]
    med = {k: statistics.median(s[k] for s in all_compute) for k in PHASES + ("step",)}
    prefetch_wait = wait_share([s for p in rounds["prefetch"] for s in p])
    inline_wait = wait_share([s for i in rounds["inline"] for s in i])
    mid = lambda key: statistics.median(r[key] for r in per_round)  # noqa: E731
    result = dict(
        bench="train", config="train/configs/soco_small_cpu.yaml", device="cpu",
        torch_threads=torch.get_num_threads(), cpus=os.cpu_count(), load_avg=os.getloadavg(),
        python=platform.python_version(), torch=torch.__version__,
        params=dict(samples=a.samples, rounds=a.rounds, steps=a.steps, warmup=a.warmup, batch=a.batch,
                    image_size=64),
        baseline="compute-only training step on a cached batch, same process, same rounds",
        compute_only=dict(steps_per_s=1.0 / med["step"], median_s=med,
                          share={k: med[k] / med["step"] for k in PHASES}),
        trainer_prefetch=dict(steps_per_s_ratio_to_compute_only=mid("prefetch_ratio"),
                              data_wait_share=prefetch_wait, steps_per_s=mid("prefetch_steps_per_s")),
        trainer_no_prefetch=dict(steps_per_s_ratio_to_compute_only=mid("inline_ratio"),
                                 data_wait_share=inline_wait, steps_per_s=mid("inline_steps_per_s")),
        per_round=per_round,
        target=dict(data_wait_share_below=TARGET_WAIT, met=prefetch_wait < TARGET_WAIT),
    )
    atomic_write_text(a.out, json.dumps(result, indent=2) + "\n")
    s = result["compute_only"]["share"]
    print(f"[bench-train] done: step split forward {s['forward']:.0%}, backward {s['backward']:.0%}, "
          f"optimiser+EMA {s['optimiser']:.0%}; trainer with prefetch {mid('prefetch_ratio'):.2f}x the "
          f"compute-only speed, data-wait {prefetch_wait:.1%} (target < {TARGET_WAIT:.0%}: "
          f"{'met' if result['target']['met'] else 'NOT met'}); without prefetch {mid('inline_ratio'):.2f}x, "
          f"data-wait {inline_wait:.1%}; wrote {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

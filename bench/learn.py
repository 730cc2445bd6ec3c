"""`make bench-learn`: does each small CPU recipe learn? Every method pretrained on the
built-in sample with the real trainer, then probed against the same architecture at
random init (train.evaluate): kNN and linear, image and object level, every level, on a
sample made with ANOTHER seed (the kNN bank / linear training set is the training
sample's labelled images, the queries the other sample's). Target (issue 11): object-crop
kNN top-1 of the pretrained network >= random + 0.10 at `--target-level`, and MoCo v2's
final loss well below ln(K+1).

Training runs as a subprocess (`train/pretrain.py`, one per method, sequentially) and its
wall and CPU seconds are recorded, with ratios to MoCo v2's run in the same bench.
Writes bench/results/learn.json.

    python -m bench.learn [--train-shards W/sample/shards] [--test-shards W/sample_eval/shards]
                          [--methods soco mocov2 ...] [--extra 'train.steps=50'] [--out ...] [--merge]
                          [--also-test W/sample_seed2/shards ...]

`--also-test` probes each run on further held-out samples (other seeds) as well: how much of
a row's figure is its one test sample. The target stays defined on `--test-shards`; each row
also gets the per-sample differences and their mean (`target.also`, `target.mean_over_samples`)."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from common.io import atomic_write_text
from common.paths import shards_dir, work_dir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "learn.json"
CONFIGS = ROOT / "train" / "configs"
METHODS = {"mocov2": "mocov2_small_cpu", "detcon_s": "detcon_s_small_cpu", "detcon_b": "detcon_b_small_cpu",
           "maskco": "maskco_small_cpu", "soco": "soco_small_cpu", "soco_c4": "soco_c4_small_cpu",
           "detco": "detco_small_cpu",
           "ccmim": "ccmim_small_cpu"}
BASELINE = "mocov2"
TARGET = 0.10


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def pretrain(name: str, train_shards: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "train" / "pretrain.py"), "--config", str(CONFIGS / f"{METHODS[name]}.yaml"),
           f"data.shards={train_shards}", f"train.out={out}", "train.tensorboard=false", *extra]
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if proc.returncode:
        raise SystemExit(f"[bench-learn] {name}: pretraining failed (exit {proc.returncode}); see {out}/train.log")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "event" not in r]
    tail = steps[-max(1, len(steps) // 10):]
    return dict(steps=len(steps), wall_s=wall, cpu_s=cpu, final_loss=sum(r["loss"] for r in tail) / len(tail),
                online=[r for r in records if r.get("event") == "eval"])


def target_level(asked: str, levels: list[str], vector_levels=()) -> str:
    """`asked` when the backbone has it; else its deepest feature map (a ViT: "tokens",
    mean-pooled), the rule fixed before any ViT was benched. Vector levels (summary settings
    `vector_levels`: a ViT's "cls") are probed and reported beside it, never the fallback."""
    maps = [lv for lv in levels if lv not in vector_levels]
    return asked if asked in levels else maps[-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-shards", default=None, help="default WORK_DIR/sample/shards")
    p.add_argument("--test-shards", default=None, help="default WORK_DIR/sample_eval/shards (another seed)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--extra", default="", help="overrides for every run, e.g. 'train.steps=50'")
    p.add_argument("--target-level", default="res5",
                   help="level of the target (a backbone without it, e.g. a ViT: its deepest map, tokens)")
    p.add_argument("--target-scope", default="crop", choices=("crop", "object"),
                   help="crop: each box cut out and resized (the issue's object crops); object: RoIAlign")
    p.add_argument("--image-size", type=int, default=256, help="eval letterbox side: crops are cut from it (256)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--also-test", nargs="+", default=[], metavar="SHARDS",
                   help="further held-out samples to probe every run on (reported beside the target)")
    p.add_argument("--merge", action="store_true",
                   help="keep the other methods' rows already in --out (rerun some methods only)")
    a = p.parse_args(argv)
    train_shards = Path(a.train_shards or shards_dir("sample"))
    test_shards = Path(a.test_shards or shards_dir("sample_eval"))
    also = [Path(d) for d in a.also_test]
    for d in (train_shards, test_shards, *also):
        if not (d / "manifest.json").is_file():
            raise SystemExit(f"[bench-learn] {d}: no shards; `make bench-learn` builds the training and test "
                             "samples, `make bench-learn-samples` the further ones (or run make sample/proposals/shards)")
    runs = work_dir() / "bench_learn"
    rows, t_start = {}, time.perf_counter()
    if a.merge and Path(a.out).is_file():
        rows = {k: v for k, v in json.loads(Path(a.out).read_text()).get("methods", {}).items()
                if k not in a.methods}
    for i, name in enumerate(a.methods):
        print(f"[bench-learn] {i + 1}/{len(a.methods)} {name}: pretraining", file=sys.stderr, flush=True)
        out = runs / name
        if out.exists():
            import shutil
            shutil.rmtree(out)
        run = pretrain(name, train_shards, out, a.extra.split())
        summary = _probe(out, train_shards, test_shards, runs / f"{name}_eval", a)
        from train.config import load_config
        cfg = load_config(out / "checkpoints" / "config.yaml")
        levels = summary["settings"]["levels"]
        level = target_level(a.target_level, levels, summary["settings"]["vector_levels"])
        obj = _target(summary, a, level)
        row = dict(config=METHODS[name], overrides=a.extra, **run, eval_seconds=summary["seconds"]["total"],
                   settings=summary["settings"], results=summary["results"], differences=summary["differences"],
                   target=dict(scope=a.target_scope, level=level, **obj))
        if also:
            row["target"]["also"] = [dict(test_shards=str(d), **_target(
                _probe(out, train_shards, d, runs / f"{name}_eval_also{j}", a), a, level)) for j, d in enumerate(also)]
            every = [obj, *row["target"]["also"]]
            row["target"]["mean_over_samples"] = sum(r["diff"] for r in every) / len(every)
            row["target"]["met_on_samples"] = sum(r["met"] for r in every)
            row["target"]["samples"] = len(every)
        if cfg.get("method") == "mocov2":
            k = int(cfg["model"]["queue_size"])
            row["ln_k_plus_1"] = math.log(k + 1)
            row["loss_below_ln_k_plus_1"] = row["ln_k_plus_1"] - row["final_loss"]
        rows[name] = row
        _write(a, train_shards, test_shards, rows, t_start)   # partial results survive a cut
        print(f"[bench-learn] {name}: {a.target_scope} kNN {level} pretrained - random {obj['diff']:+.3f} "
              f"[{obj['lo']:+.3f}, {obj['hi']:+.3f}] ({'met' if row['target']['met'] else 'NOT met'}), "
              f"{run['steps']} steps, {run['wall_s']:.0f}s wall, {run['cpu_s']:.0f} CPU-s", file=sys.stderr, flush=True)
        if also:
            t = row["target"]
            print(f"[bench-learn] {name}: on {t['samples']} test samples " +
                  ", ".join(f"{r['diff']:+.3f}" for r in [obj, *t["also"]]) +
                  f"; mean {t['mean_over_samples']:+.3f}, >= +{TARGET} on {t['met_on_samples']}/{t['samples']}",
                  file=sys.stderr, flush=True)
    _write(a, train_shards, test_shards, rows, t_start)
    met = sum(r["target"]["met"] for r in rows.values() if "target" in r)
    print(f"[bench-learn] done: target met by {met}/{len(rows)} method(s); {a.out}", file=sys.stderr, flush=True)
    return 0


def _probe(run: Path, train_shards: Path, test: Path, out: Path, a) -> dict:
    """train.evaluate's summary of `run` (pretrained and random init) probed on `test`."""
    from train.evaluate import build_parser, evaluate
    args = [str(run), "--train", str(train_shards), "--test", str(test), "--out", str(out)]
    return evaluate(build_parser().parse_args(args + (["--image-size", str(a.image_size)] if a.image_size else [])))


def _target(summary: dict, a, level: str) -> dict:
    """The target's figure in one probe summary: the kNN difference at `level` and whether it is met."""
    from train.eval.probes import find
    d = find(summary["differences"], scope=a.target_scope, level=level, probe="knn")
    return dict(diff=d["diff"], lo=d["lo"], hi=d["hi"], met=d["diff"] >= TARGET)


def _write(a, train_shards, test_shards, rows: dict, t_start: float) -> None:
    if BASELINE in rows:
        for r in rows.values():
            if "cpu_s" in r:
                r["cpu_ratio_to_mocov2"] = r["cpu_s"] / rows[BASELINE]["cpu_s"]
    doc = dict(bench="learn", target=f"{a.target_scope} kNN top-1 >= random init + {TARGET} at {a.target_level} "
                                      "on a sample made with another seed; MoCo v2 loss well below ln(K+1)",
               train_shards=str(train_shards), test_shards=str(test_shards), extra=a.extra,
               machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                            load_avg_start=os.getloadavg()), seconds=time.perf_counter() - t_start, methods=rows)
    atomic_write_text(Path(a.out), json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())

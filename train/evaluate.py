"""Evaluate a pretraining run against the same architecture at random init.

    python -m train.evaluate work/pretrain/soco_small_cpu [--dataset sample]
        [--train SHARDS --test SHARDS] [--checkpoint [--target]] [--levels res2 res3 res4 res5]
        [--k 20 --temperature 0.07] [--image-size N] [--max-samples N] [--out DIR]
    make eval RUN=work/pretrain/<name> [EVAL_DATASET=sample] [EVAL_ARGS=...]

Weights: the run's exported/backbone_torchvision.pth (default), or with --checkpoint
checkpoints/last.pt (the online backbone; --target the momentum/EMA branch). The
architecture comes from the run's checkpoints/config.yaml. Data: --train/--test shards
folders, else the run config's eval.train/eval.test, else WORK_DIR/<dataset>/shards
(--dataset, default: the run's data.shards) split by key (--test-fraction). Probes: kNN
and linear, image level (pooled maps) and object level (RoIAlign over ground-truth
boxes), at every level, for the pretrained and the random network (--seed), each with a
95% bootstrap CI and the paired CI of the difference. Writes WORK_DIR/eval/<name>/
summary.json and index.html (self-contained: tables and inline SVG plots)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from common.io import atomic_write_text
from common.paths import shards_dir, work_dir

SCHEMA = "regionssl.eval/1"


class EvalError(ValueError):
    """Bad input to the evaluation; the message says what to fix."""


def resolve_run(run: str) -> Path:
    """A run folder: the path itself, or WORK_DIR/pretrain/<run>."""
    for cand in (Path(run), work_dir() / "pretrain" / run):
        if (cand / "checkpoints" / "config.yaml").is_file():
            return cand
    known = sorted(p.name for p in (work_dir() / "pretrain").glob("*/checkpoints/config.yaml")
                   for p in [p.parent.parent])
    hint = f"; runs under {work_dir() / 'pretrain'}: {', '.join(known)}" if known else (
        "; train one first with make pretrain")
    raise EvalError(f"unknown run {run!r}: no {Path(run) / 'checkpoints' / 'config.yaml'} "
                    f"(nor under {work_dir() / 'pretrain'}){hint}")


def load_run_config(run_dir: Path) -> dict:
    from train.config import load_config
    return load_config(run_dir / "checkpoints" / "config.yaml")


def load_backbone(cfg: dict, run_dir: Path, checkpoint: bool = False, target: bool = False):
    """(backbone, description) of the run's trained weights."""
    from train.export import BACKBONE_FILES
    from train.methods import build_method
    if target and not checkpoint:
        raise EvalError("--target needs --checkpoint: the export holds one branch only "
                        "(re-export with python -m train.export --target, or pass --checkpoint --target)")
    if checkpoint:
        path = run_dir / "checkpoints" / "last.pt"
        if not path.is_file():
            raise EvalError(f"{path} not found: the run has no checkpoint yet; train it "
                            "(make pretrain) or evaluate its export without --checkpoint")
        from train import checkpoint as ckpt
        _, method = build_method(cfg)
        method.load_state_dict(ckpt.load(path)["model"])
        try:
            modules = method.export_modules(target=True) if target else method.export_modules()
        except NotImplementedError:
            raise EvalError(f"--target: method {cfg.get('method')!r} has no target network; "
                            "drop --target") from None
        return modules["backbone"], f"{path} ({'target' if target else 'online'})"
    _, method = build_method(cfg)
    backbone = method.export_modules()["backbone"]
    fmt = next((f for f in getattr(backbone, "export_formats", ()) if f in BACKBONE_FILES), "torchvision")
    path = run_dir / "exported" / BACKBONE_FILES[fmt]
    if not path.is_file():
        raise EvalError(f"{path} not found: the run was not exported; run python -m train.export "
                        f"--checkpoint {run_dir / 'checkpoints' / 'last.pt'}, or evaluate the "
                        "checkpoint with --checkpoint (EVAL_ARGS=--checkpoint)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    load = getattr(backbone, f"load_{fmt}_state_dict", backbone.load_state_dict)   # ViT: timm's names
    missing, unexpected = load(state, strict=False)
    if missing or unexpected:
        raise EvalError(f"{path} does not match the architecture in {run_dir / 'checkpoints' / 'config.yaml'} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}); re-export the run")
    return backbone, str(path)


def eval_settings(cfg: dict, args) -> dict:
    """Probe settings: command line, else the run config's eval section, else defaults."""
    from train.eval import knn
    from train.eval.features import crop_size_of, image_size_of
    ev = cfg.get("eval") or {}
    return dict(k=args.k or ev.get("k") or knn.K,
                temperature=args.temperature or ev.get("temperature") or knn.TEMPERATURE,
                levels=list(args.levels) if args.levels else None, image_size=image_size_of(cfg, args.image_size),
                crop_size=crop_size_of(cfg, args.crop_size) or None,
                batch_size=int(args.batch_size or ev.get("batch_size") or 64),
                max_samples=args.max_samples or ev.get("max_samples"),
                test_fraction=float(args.test_fraction or ev.get("test_fraction") or 0.5),
                seed=int(args.seed))


def eval_data(cfg: dict, args, settings: dict):
    """(train, test) LabelledSets and where they came from."""
    from train.eval.data import load_labelled, split_by_key
    ev = cfg.get("eval") or {}
    train_dir = args.train or (shards_dir(args.dataset) if args.dataset else None) or ev.get("train") \
        or cfg.get("data", {}).get("shards")
    test_dir = args.test or (None if (args.train or args.dataset) else ev.get("test"))
    for d in filter(None, (train_dir, test_dir)):
        if not (Path(d) / "manifest.json").is_file():
            raise EvalError(f"{d}: no shards there (manifest.json missing); build them with "
                            "make shards DATASET=<name>, or pass --train/--test shards folders")
    size, cap = settings["image_size"], settings["max_samples"]
    train = load_labelled(train_dir, size, cap)
    if test_dir:
        test = load_labelled(test_dir, size, cap)
        how = "two datasets"
    else:
        train, test = split_by_key(train, settings["test_fraction"])
        how = f"split of {train_dir} by key (test fraction {settings['test_fraction']})"
    return train, test, dict(train=str(train_dir), test=str(test_dir or train_dir), split=how)


def online_curve(run_dir: Path) -> list[dict]:
    """The run's online-eval records (metrics.jsonl `{"event": "eval"}`)."""
    path = run_dir / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("event") == "eval":
                out.append(rec)
    return out


def evaluate(args) -> dict:
    from train.eval.features import all_levels, embedding_levels, resolve_levels
    from train.eval.page import write_page
    from train.eval.probes import random_init_backbone, run_probes
    t0 = time.perf_counter()
    run_dir = resolve_run(args.run)
    cfg = load_run_config(run_dir)
    settings = eval_settings(cfg, args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone, source = load_backbone(cfg, run_dir, args.checkpoint, args.target)
    if settings["levels"] is None:   # every level the backbone has (res2..res5; a ViT's tokens and cls)
        settings["levels"] = all_levels(backbone)
    try:
        names = resolve_levels(backbone, settings["levels"])
    except ValueError as e:
        raise EvalError(str(e)) from None
    settings["vector_levels"] = [lv for lv, real in names.items() if real in embedding_levels(backbone)]
    random = random_init_backbone(cfg, settings["seed"])
    train, test, where = eval_data(cfg, args, settings)
    print(f"[eval] {run_dir.name}: {len(train.keys)} train / {len(test.keys)} test images, "
          f"{len(train.box_labels)} / {len(test.box_labels)} objects, levels {settings['levels']}, "
          f"{settings['image_size']} px, on {device}", file=sys.stderr, flush=True)
    networks = {"pretrained": backbone.to(device), "random": random.to(device)}
    out = run_probes(networks, train, test, settings["levels"], k=settings["k"],
                     temperature=settings["temperature"], batch_size=settings["batch_size"], device=device,
                     crop_size=settings["crop_size"],
                     say=lambda s: print(s, file=sys.stderr, flush=True))
    name = args.name or (run_dir.name + ("_target" if args.target else ""))
    summary = dict(schema=SCHEMA, name=name, run=str(run_dir), method=cfg.get("method"),
                   weights=source, random_seed=settings["seed"], settings=settings, data=where,
                   train=dict(images=len(train.keys), objects=int(len(train.box_labels)), dropped=train.dropped),
                   test=dict(images=len(test.keys), objects=int(len(test.box_labels)), dropped=test.dropped),
                   classes=sorted({int(c) for c in train.box_labels} | {int(c) for c in train.image_labels if c >= 0}),
                   results=out["results"], differences=out["differences"], online=online_curve(run_dir),
                   seconds=dict(out["seconds"], total=time.perf_counter() - t0))
    out_dir = Path(args.out) if args.out else work_dir() / "eval" / name
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    write_page(summary, out_dir / "index.html")
    print(table(summary), flush=True)
    print(f"[eval] done in {summary['seconds']['total']:.1f}s: {out_dir / 'summary.json'}, "
          f"{out_dir / 'index.html'}", file=sys.stderr, flush=True)
    return summary


def table(summary: dict, levels=None) -> str:
    """Plain-text pretrained-vs-random table (what make demo prints)."""
    from train.eval.probes import find
    rows = [f"{'scope':7} {'level':6} {'probe':7} {'pretrained':>10} {'random':>8} {'diff [95% CI]':>24}"]
    for d in summary["differences"]:
        if levels and d["level"] not in levels:
            continue
        key = dict(scope=d["scope"], level=d["level"], probe=d["probe"])
        p, r = find(summary["results"], network=d["network"], **key), find(summary["results"], network="random", **key)
        rows.append(f"{d['scope']:7} {d['level']:6} {d['probe']:7} {p['acc']:10.3f} {r['acc']:8.3f} "
                    f"{d['diff']:+8.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder (work/pretrain/<name>) or its name under WORK_DIR/pretrain")
    p.add_argument("--dataset", help="evaluate on WORK_DIR/<dataset>/shards (split by key)")
    p.add_argument("--train", help="labelled shards folder: the kNN bank / linear training set")
    p.add_argument("--test", help="labelled shards folder of the test items (else a split of --train)")
    p.add_argument("--checkpoint", action="store_true", help="use checkpoints/last.pt, not the export")
    p.add_argument("--target", action="store_true", help="with --checkpoint: the momentum/EMA branch")
    p.add_argument("--levels", nargs="+", help="feature levels (default: every level of the backbone, res2..res5 for a ResNet, "
                   "tokens for a ViT; C4, C5 alias res4, res5)")
    p.add_argument("--k", type=int, help="kNN neighbours (default eval.k or 20)")
    p.add_argument("--temperature", type=float, help="kNN vote temperature (default eval.temperature or 0.07)")
    p.add_argument("--image-size", type=int, help="letterbox side in px (default eval.image_size, data.image_size, 224)")
    p.add_argument("--crop-size", type=int, help="side of the object crops of the crop probe (default "
                   "eval.crop_size, data.image_size, 224; 0 = no crop probe)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default 64)")
    p.add_argument("--max-samples", type=int, help="read at most N samples per dataset")
    p.add_argument("--test-fraction", type=float, help="share of keys in the test split (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init baseline")
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--name", help="output name (default: the run folder's name)")
    p.add_argument("--out", help="output folder (default WORK_DIR/eval/<name>)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    from train.eval.data import EvalDataError
    try:
        evaluate(args)
    except (EvalError, EvalDataError, FileNotFoundError) as e:
        p.exit(2, f"evaluate: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

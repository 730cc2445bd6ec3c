"""The checks of `make gpu-check` that run inside the venv, one subcommand per step:

    python -m bench.gpu.work env|demo|train|compare|timing|nccl --work DIR --result FILE

Each writes its figures to FILE as JSON ({"status": "failed"|"skipped", "error": ...} when
it could not do its job) and is run by bench/gpu_check.py under its own time limit.
`--device cpu` runs the same code on the CPU with small sizes (a smoke test of the script
itself on a machine without a GPU; its figures mean nothing)."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPES = ("soco", "soco_star", "detcon", "maskco", "mocov2")
SMALL_CONFIGS = ("soco_small_cpu", "detcon_b_small_cpu", "detcon_s_small_cpu", "maskco_small_cpu",
                 "mocov2_small_cpu")
QUIET = ["export.enabled=false", "train.tensorboard=false", "train.log_every=1"]


class Args:
    """The parsed command line plus what the device choice implies."""

    def __init__(self, a: argparse.Namespace):
        self.__dict__.update(vars(a))
        self.gpu = a.device == "cuda"
        self.work = Path(a.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.device_id = 0 if self.gpu else None
        self.threads = max(1, min(8, (os.cpu_count() or 2) - 1)) if self.gpu else 1


def fresh(path: Path) -> Path:
    """An empty run folder: the trainer resumes from a checkpoint it finds, a rerun must not."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def sh(cmd: list, timeout: float, env: dict | None = None) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, output, seconds) of a child command, run in its own
    process group, which is ended on timeout (torchrun's ranks, Ray's workers included)."""
    from bench.gpu.steps import stop_group
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        stop_group(proc)
        out, _ = proc.communicate()
        return None, (out or "") + f"\n(stopped after {timeout:.0f} s)", time.perf_counter() - t0


def tail(text: str, n: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def step_records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "step_time" in r]


def photo_shards(a: Args) -> Path:
    """640x480 photo-like shards built with the real shard writer (bench.shards), cached
    in the work folder: the timing shards, and the fallback when the demo failed."""
    from bench.shards import photo_shards as build
    root = a.work / "photo"
    done = root / "shards" / "manifest.json"
    if not done.is_file():
        samples = 512 if a.gpu else 16
        build(root, samples, 32 if a.gpu else 4, per_shard=128, tag="gpu-check")
    return root / "shards"


def loader_backend() -> str:
    from train.loader import dali_available
    return "dali" if dali_available() else "reference (nvidia-dali is not installed)"


def shards_for(a: Args) -> tuple[Path, str]:
    if a.shards and Path(a.shards).is_dir():
        return Path(a.shards), "demo (built-in sample)"
    return photo_shards(a), "photo-like fallback (the demo's shards are missing)"


# ------------------------------------------------------------------ env
def check_env(a: Args) -> dict:
    import numpy as np
    import torch
    out = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count()}
    problems = []
    if torch.cuda.is_available():
        import torch.distributed as dist
        v = torch.cuda.nccl.version() if dist.is_nccl_available() else None
        out["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else v
        out["devices"] = [{"name": torch.cuda.get_device_name(i),
                           "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                           "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                          for i in range(torch.cuda.device_count())]
        x = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
        out["bf16_matmul_finite"] = bool(torch.isfinite((x @ x).float()).all())
    else:
        problems.append(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device: "
                        "a CPU build, or a build for a newer CUDA than the driver supports")
    try:
        import nvidia.dali as dali
        out["dali"] = dali.__version__
    except ImportError as e:
        out["dali"] = None
        problems.append(f"nvidia-dali is not importable ({e}): the loader would fall back to the reference")
    if out["dali"] and out["cuda_available"]:
        import cv2
        from nvidia.dali import fn, pipeline_def, types
        rgb = (np.arange(48 * 64 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)
        jpeg = np.frombuffer(cv2.imencode(".jpg", rgb)[1].tobytes(), np.uint8)

        @pipeline_def(batch_size=1, num_threads=1, device_id=0)
        def decode():
            return fn.decoders.image(fn.external_source(source=lambda: [jpeg], batch=True),
                                     device="mixed", output_type=types.RGB)
        p = decode()
        p.build()
        shape = tuple(p.run()[0].as_cpu().as_array().shape)
        out["dali_mixed_decode"] = "ok" if shape == (1, 48, 64, 3) else f"wrong shape {shape}"
        if out["dali_mixed_decode"] != "ok":
            problems.append(f"DALI mixed decode gave {shape} for a 64x48 JPEG")
        del p
    if problems:
        out.update(status="failed", error="; ".join(problems))
    return out


# ------------------------------------------------------------------ demo
def check_demo(a: Args) -> dict:
    """make demo's first stages on the built-in sample: sample, proposals, shards, verify."""
    work = fresh(a.work / "demo")
    env = {"WORK_DIR": str(work)}
    py = sys.executable
    size = [] if a.gpu else ["--scene", "6", "--object", "2", "--min-side", "128", "--max-side", "192"]
    stages = {
        "sample": [py, "-m", "preprocess.sample", "--out", work / "sample" / "raw", *size],
        "proposals": [py, "-m", "preprocess.job", "--dataset", "sample", "--stats", "off",
                      "--num-cpus", str(max(1, min(16, os.cpu_count() or 1)))],
        "shards": [py, "-m", "shards.write", "--dataset", "sample"],
        "verify": [py, "-m", "shards.verify", "--dataset", "sample"],
    }
    out = {"seconds": {}}
    for name, cmd in stages.items():
        rc, text, s = sh(cmd, a.limit, env)
        out["seconds"][name] = round(s, 2)
        if rc != 0:
            out.update(status="failed", error=f"{name}: exit {rc}: {tail(text)}")
            return out
    shards = work / "sample" / "shards"
    out["shards"] = str(shards)
    out["num_samples"] = json.loads((shards / "manifest.json").read_text())["num_samples"]
    return out


# ------------------------------------------------------------------ train
def train_overrides(a: Args, shards: Path, out: Path) -> list[str]:
    device = ["train.device=cuda", "train.precision=bf16", "train.channels_last=true"] if a.gpu else \
        ["train.device=cpu", "train.precision=bf16"]
    return [f"data.shards={shards}", f"train.out={out}", "data.backend=dali", *device, *QUIET]


def check_train(a: Args) -> dict:
    """One step of every method's small recipe through train/pretrain.py, all configs at
    once (tiny models share the GPU), each under the step's limit: finite losses."""
    from bench.gpu.steps import stop_group
    shards, which = shards_for(a)
    out = {"shards": which, "loader": loader_backend(), "configs": {}}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = {}
    t0 = time.perf_counter()
    for name in SMALL_CONFIGS:
        run_dir = fresh(a.work / "train" / name)
        cmd = [sys.executable, "train/pretrain.py", "--config", f"train/configs/{name}.yaml",
               *train_overrides(a, shards, run_dir), "train.steps=1", "train.checkpoint_every=0"]
        log = open(a.work / f"train_{name}.log", "w+")
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True), log)
    bad = []
    for name, (proc, log) in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, a.limit - 5 - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            stop_group(proc)
            rc = None
        log.seek(0)
        text = log.read()
        log.close()
        recs = step_records(a.work / "train" / name)
        loss = recs[-1]["loss"] if recs else None
        said = [line for line in text.splitlines() if line.startswith("[pretrain]")]
        rec = {"seconds": round(time.perf_counter() - t0, 2), "loss": loss, "said": said[:1]}
        if rc == 0 and loss is not None and math.isfinite(loss):
            rec["status"] = "ok"
        else:
            rec.update(status="timeout" if rc is None else "failed",
                       error=tail(text) if rc != 0 else f"loss {loss} is not finite")
            bad.append(name)
        out["configs"][name] = rec
    if bad:
        out.update(status="failed", error=f"no finite loss from {', '.join(bad)} (see configs.*.error)")
    return out


# ------------------------------------------------------------------ compare
def check_compare(a: Args) -> dict:
    """One batch of every recipe from the GPU graph and the CPU graph with the same plans,
    with DALI's decoder and the feeder's, on the demo's shards (the built-in sample: flat
    synthetic shapes) and on photo-like textured shards (where a misplaced window shows
    most: see bench/gpu/compare.py)."""
    from bench.gpu.compare import PIXEL_TOL, compare_graphs
    sets = {"photo": photo_shards(a)}
    if a.shards and Path(a.shards).is_dir():
        sets = {"sample": Path(a.shards), **sets}
    out = {"shards": sorted(sets), "tolerance": PIXEL_TOL, "recipes": {}}
    problems = []
    for tag, shards in sets.items():
        for recipe in RECIPES:
            for decode in ("dali", "feeder"):
                try:
                    rep = compare_graphs(recipe, shards, 0, a.device_id, None, batch_size=8, decode=decode,
                                         num_threads=a.threads)
                except Exception as e:  # one recipe's crash must not hide the others' figures
                    rep = {"ok": False, "problems": [f"{recipe}: {type(e).__name__}: {e}"]}
                out["recipes"][f"{tag}/{recipe}/{decode}"] = rep
                problems += [f"[{tag} shards, decode={decode}] {p}" for p in rep["problems"]]
    if problems:
        out.update(status="failed", error="; ".join(problems))
    return out


# ------------------------------------------------------------------ timing
def sync(a: Args) -> None:
    if a.gpu:
        import torch
        torch.cuda.synchronize()


def loader_rate(a: Args, recipe: str, shards: Path, batch: int, batches: int, device_id) -> dict:
    """img/s of the loader's DALI graph on `device_id` (None = CPU) after its first batch;
    decode as the loader's default: nvJPEG on a GPU, the feeder's on the CPU."""
    from bench.gpu.compare import graph_batches
    it = graph_batches(recipe, shards, batch, 0, device_id, "auto", num_threads=a.threads,
                       batches=batches + 1)
    t0 = time.perf_counter()
    next(it)  # pipeline start-up + first batch
    sync(a)
    t1 = time.perf_counter()
    n = sum(batch for _ in it)
    sync(a)
    wall = time.perf_counter() - t1
    return {"images_per_s": n / wall, "images": n, "startup_s": round(t1 - t0, 2)}


def time_loaders(a: Args, shards: Path) -> dict:
    """Loader img/s per recipe, decode on the GPU (DALI mixed) with the batch the R50 step
    uses; the SoCo loader on the CPU (feeder decode, same threads) as the in-process baseline."""
    if loader_backend() != "dali":
        return {"status": "skipped", "error": "nvidia-dali is not installed: no GPU loader to time"}
    batch, batches = (64, 6) if a.gpu else (4, 2)
    out = {"batch": batch, "threads": a.threads, "recipes": {}}
    for recipe in RECIPES:
        out["recipes"][recipe] = loader_rate(a, recipe, shards, batch, batches, a.device_id)
    cpu = loader_rate(a, "soco", shards, batch, 2, None)
    out["soco_cpu_baseline"] = cpu
    out["soco_gpu_vs_cpu"] = out["recipes"]["soco"]["images_per_s"] / cpu["images_per_s"]
    return out


def r50_config(a: Args, shards: Path, out: Path, steps: int) -> list[str]:
    size = [] if a.gpu else ["model.backbone=resnet18", "model.width=16", "data.image_size=64",
                             "train.precision=fp32"]
    return [*train_overrides(a, shards, out), f"data.batch_size={64 if a.gpu else 4}",
            f"data.num_workers={a.threads}", f"train.steps={steps}", "train.checkpoint_every=100000",
            *size]


def time_r50_compute(a: Args, overrides: list[str], steps: int) -> dict:
    """The training step alone on one cached batch (in process): img/s and peak memory."""
    import torch
    from train.config import load_config
    from train.loader import build_loader
    from train.methods import build_method, recipe_name
    from train.optim import build_optimizer, build_scheduler
    from train.pretrain import autocast_dtype, to_device, train_step
    cfg = load_config(REPO / "train/configs/soco_r50_fpn.yaml", overrides)
    device = torch.device("cuda", 0) if a.gpu else torch.device("cpu")
    torch.manual_seed(0)
    module, method = build_method(cfg)
    method = method.to(device)
    if a.gpu:
        method = method.to(memory_format=torch.channels_last)
    bs = cfg["data"]["batch_size"]
    loader = build_loader(recipe_name(cfg, module, method), cfg["data"]["shards"], bs, backend="dali", device_id=a.device_id,
                          num_workers=a.threads, image_size=cfg["data"].get("image_size"))
    batch = to_device(next(iter(loader)), device, a.gpu)
    opt = build_optimizer(method, cfg, bs)
    sched = build_scheduler(opt, cfg, 10_000, 10_000)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    dtype = autocast_dtype(cfg, device)
    method.train()
    if a.gpu:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for k in range(steps):
        sync(a)
        t0 = time.perf_counter()
        loss, _ = train_step(method, method, opt, sched, scaler, batch, dtype, k, 10_000)
        sync(a)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    warm = times[min(3, steps - 1):]
    out = {"images_per_s": bs / statistics.median(warm), "median_step_s": statistics.median(warm),
           "steps_timed": len(warm), "losses_finite": all(map(math.isfinite, losses))}
    if a.gpu:
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return out


def time_r50(a: Args, shards: Path) -> dict:
    """ResNet-50 SoCo FPN at batch 64, 224 px, bf16, channels_last: the real trainer
    (train/pretrain.py: DALI on the GPU, background prefetch) for img/s and data-wait
    share, and the compute-only step on a cached batch for peak memory and the ratio."""
    steps, warmup = (15, 3) if a.gpu else (4, 1)
    run_dir = fresh(a.work / "r50")
    overrides = r50_config(a, shards, run_dir, steps)
    out = {"config": "train/configs/soco_r50_fpn.yaml", "overrides": overrides, "loader": loader_backend()}
    rc, text, s = sh([sys.executable, "train/pretrain.py", "--config", "train/configs/soco_r50_fpn.yaml",
                      *overrides], a.limit / 2)
    recs = step_records(run_dir)[warmup:]
    if rc != 0 or not recs:
        out["trainer"] = {"status": "failed" if rc is not None else "timeout", "error": tail(text)}
    else:
        bs = 64 if a.gpu else 4
        out["trainer"] = {"status": "ok", "seconds": round(s, 2), "steps_timed": len(recs),
                          "images_per_s": bs / statistics.median(r["step_time"] for r in recs),
                          "data_wait_share": sum(r["data_wait"] for r in recs) / sum(r["step_time"] for r in recs),
                          "losses_finite": all(math.isfinite(r["loss"]) for r in recs)}
    out["compute_only"] = time_r50_compute(a, overrides, steps - warmup + 3)
    if out["trainer"]["status"] == "ok":
        out["trainer_vs_compute_only"] = out["trainer"]["images_per_s"] / out["compute_only"]["images_per_s"]
    return out


def time_stats_forward(a: Args) -> dict:
    """make stats's ResNet-50 forward (FeatureDistance.embed: uint8 views in, unit vectors
    out, host copies included) at batch 256, 224 px."""
    import numpy as np
    from preprocess.audit.backbones import weights_available
    from preprocess.audit.distance import FeatureDistance
    real = weights_available()
    model = FeatureDistance(random_weights=not real, device="cuda" if a.gpu else "cpu")
    batch, rounds = (256, 5) if a.gpu else (4, 1)
    views = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    for _ in range(2):
        model.embed(views)
    t0 = time.perf_counter()
    for _ in range(rounds):
        y = model.embed(views)
    wall = time.perf_counter() - t0
    return {"batch": batch, "images_per_s": batch * rounds / wall, "weights": "real" if real else "random",
            "finite": bool(np.isfinite(y).all())}


def check_timing(a: Args) -> dict:
    shards = photo_shards(a)
    out = {"shards": "photo-like 640x480 (bench.shards.photo_shards)"}
    failed = []
    for name, fn in (("loader", lambda: time_loaders(a, shards)), ("r50_soco_fpn", lambda: time_r50(a, shards)),
                     ("stats_forward", lambda: time_stats_forward(a))):
        t0 = time.perf_counter()
        try:
            out[name] = fn()
        except Exception as e:  # one failed figure must not hide the others
            import traceback
            out[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                         "where": tail(traceback.format_exc(), 1200)}
            failed.append(name)
        out[name]["seconds"] = round(time.perf_counter() - t0, 2)
    if out.get("r50_soco_fpn", {}).get("trainer", {}).get("status") not in (None, "ok"):
        failed.append("r50_soco_fpn trainer")
    if failed:
        out.update(status="failed", error=f"failed: {', '.join(failed)} (see their error fields)")
    return out


# ------------------------------------------------------------------ nccl
def flat_weights(state: dict, keys: list[str]):
    import torch
    return torch.cat([state[k].double().flatten() for k in keys])


def check_nccl(a: Args) -> dict:
    """2 ranks (NCCL, SyncBN) against 1 rank on the same global batch of 16, SoCo small,
    fp32, 3 steps: the final online weights must agree, as |w2 - w1| / |w1 - w0| <= 0.05
    (the runs' difference against how far training moved the weights; TF32 convolutions
    and other reduction orders stay far below it, while per-rank BN statistics or gradients
    left unaveraged move it to the order of 1: 0.65 measured on CPU, where BN is not
    synced). Losses are recorded, not compared: rank 0 logs the loss of its own half."""
    import torch
    if a.gpu and torch.cuda.device_count() < 2:
        return {"status": "skipped", "error": f"{torch.cuda.device_count()} GPU: needs 2 or more"}
    from train.config import load_config
    from train.methods import build_method
    from train.pretrain import seed_all
    shards, which = shards_for(a)
    config = "train/configs/soco_small_cpu.yaml"
    common = [f"data.shards={shards}", "data.batch_size=16", "train.steps=3", "train.precision=fp32",
              f"train.device={'cuda' if a.gpu else 'cpu'}", "data.backend=dali", "train.checkpoint_every=0",
              *QUIET]
    out = {"shards": which, "config": config, "overrides": common, "runs": {}}
    per = a.limit / 2.5
    launch = {"one": [sys.executable, "train/pretrain.py"],
              "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      "train/pretrain.py"]}
    for name, head in launch.items():
        fresh(a.work / "nccl" / name)
        rc, text, s = sh([*head, "--config", config, *common, f"train.out={a.work / 'nccl' / name}"], per)
        out["runs"][name] = {"seconds": round(s, 2), "status": "ok" if rc == 0 else "failed",
                             **({} if rc == 0 else {"error": tail(text)})}
        if rc != 0:
            out.update(status="failed", error=f"the {name}-rank run failed: {tail(text, 600)}")
            return out
    l1 = [r["loss"] for r in step_records(a.work / "nccl" / "one")]
    l2 = [r["loss"] for r in step_records(a.work / "nccl" / "two")]
    seed_all(0)
    _, init = build_method(load_config(REPO / config, common))
    w0 = init.state_dict()
    s1 = torch.load(a.work / "nccl" / "one" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]
    s2 = torch.load(a.work / "nccl" / "two" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]
    keys = [k for k, v in w0.items() if v.is_floating_point() and not k.split(".")[0].startswith("target")
            and "running_" not in k]
    w0f, w1f, w2f = (flat_weights(s, keys) for s in (w0, s1, s2))
    moved = float((w1f - w0f).norm())
    rel = float((w2f - w1f).norm()) / moved if moved > 0 else float("inf")
    out.update(losses_one=l1, losses_two_rank0=l2, weights_rel_diff=rel, tolerance={"weights_rel_diff": 0.05})
    if not rel <= 0.05:
        out.update(status="failed", error=f"2 ranks differ from 1 rank on the same global batch: weights "
                                          f"|w2-w1|/|w1-w0| = {rel:.4f} (allowed 0.05)")
    return out


CHECKS = {"env": check_env, "demo": check_demo, "train": check_train, "compare": check_compare,
          "timing": check_timing, "nccl": check_nccl}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("check", choices=sorted(CHECKS))
    ap.add_argument("--result", required=True)
    ap.add_argument("--work", default=os.environ.get("GPU_CHECK_WORK", "work/gpu-check"))
    ap.add_argument("--shards", default=None, help="the demo's shards folder (else photo-like shards)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--limit", type=float, default=120.0, help="this step's time limit (for its children)")
    a = Args(ap.parse_args(argv))
    result = CHECKS[a.check](a)
    Path(a.result).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The trainer end to end: DDP over gloo equals one process, torchrun restarts and
multi-node rendezvous, resume equals an uninterrupted run, non-finite loss stops
cleanly, exports load back. Tiny SoCo (ResNet-18 width 16, 64-px views, random
init) on the built-in sample's shards with the real loader, on CPU."""
from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = "train/configs/soco_small_cpu.yaml"
torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], out: Path, shards: Path, *overrides: str, torchrun: list[str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable] + (["-m", "torch.distributed.run", *torchrun] if torchrun else []) + [
        "train/pretrain.py", "--config", CONFIG, f"train.out={out}", f"data.shards={shards}",
        "data.batch_size=4", "train.log_every=1", "train.tensorboard=false", *overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


# --------------------------------------------------------------------- DDP == 1 process
def _ddp_steps(rank: int, world: int, port: int, out: str) -> None:
    """Two optimiser steps of the real train_step on a fixed global batch of 4 split
    over `world` ranks. BN runs in eval mode (fixed running statistics): in train mode
    each rank normalises with its own half-batch statistics (no SyncBN on CPU), which
    would make the runs legitimately differ. With per-sample computation, DDP's
    gradient average over equal halves equals the full-batch mean gradient."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.test_soco import TINY, synthetic_batch
    from train import distributed
    from train.methods import get
    from train.optim import build_optimizer, build_scheduler
    from train.pretrain import train_step

    info = distributed.init("cpu")
    torch.manual_seed(0)
    method = get("soco").build({"model": dict(TINY)})
    method.eval()
    cfg = {"optim": {"base_lr": 1.0, "warmup_steps": 0}}
    opt = build_optimizer(method, cfg, global_batch=4)
    sched = build_scheduler(opt, cfg, total_steps=4, steps_per_epoch=2)
    model = DDP(method, find_unused_parameters=True) if world > 1 else method
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    per = 4 // world
    step_losses = []
    for step in range(2):
        batch = synthetic_batch(B=4, seed=step)
        local = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
        loss, _ = train_step(model, method, opt, sched, scaler, local, None, step, 4)
        step_losses.append(distributed.all_reduce_mean(torch.tensor([loss])).item())
    if info.rank == 0:
        torch.save({"state": method.state_dict(), "losses": step_losses}, out)
    distributed.shutdown()


def test_two_process_gloo_equals_one_process(tmp_path):
    import torch.multiprocessing as mp
    _ddp_steps(0, 1, 0, str(tmp_path / "one.pt"))
    mp.spawn(_ddp_steps, args=(2, free_port(), str(tmp_path / "two.pt")), nprocs=2, join=True)
    one, two = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("one", "two"))
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-5, abs=1e-6)
    for k, v in one["state"].items():  # every tensor, online and EMA target
        torch.testing.assert_close(two["state"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    from tests.test_soco import TINY
    from train.methods import get
    torch.manual_seed(0)
    fresh = get("soco").build({"model": dict(TINY)}).state_dict()
    changed = [k for k, v in fresh.items() if v.is_floating_point() and not torch.equal(v, one["state"][k])]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("target.") for k in changed)


# --------------------------------------------------------------------- single process runs
def test_resume_matches_uninterrupted_run_and_exports_load(sample_shards, tmp_path):
    steps = ["train.steps=6", "train.checkpoint_every=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run([], straight, sample_shards, *steps)
    killed = run([], resumed, sample_shards, *steps, "debug.kill_at_step=3", check=False)
    assert killed.returncode != 0 and "killing rank 0 at step 3" in killed.stderr
    ckpt = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["loader"]["position"] == 2  # mid-epoch: the loader resumes at its 3rd batch
    again = run([], resumed, sample_shards, *steps)
    assert "resumed from step 2" in again.stderr and "done: step 6/6" in again.stderr
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]  # the killed attempt's step 3 was dropped
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    last = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    ref = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    for k in ("backbone.conv1.weight", "target.0.layer4.1.conv2.weight"):
        torch.testing.assert_close(last["model"][k], ref["model"][k], rtol=1e-4, atol=1e-6)

    # exports: torchvision strict load, and the CLI re-export from the checkpoint
    sd = torch.load(resumed / "exported" / "backbone_torchvision.pth", weights_only=True)
    torch.testing.assert_close(sd["conv1.weight"], last["model"]["backbone.conv1.weight"])
    from train.models.backbone import build_backbone
    net = build_backbone("resnet18", width=16)
    net.load_state_dict(sd, strict=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cli = subprocess.run([sys.executable, "-m", "train.export", "--checkpoint", str(resumed / "checkpoints" / "last.pt"),
                          "--out", str(tmp_path / "cli"), "--target"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    d2 = pickle.loads((tmp_path / "cli" / "detectron2.pkl").read_bytes())["model"]
    torch.testing.assert_close(torch.from_numpy(d2["stem.conv1.weight"]), last["model"]["target.0.conv1.weight"])
    torch.testing.assert_close(torch.from_numpy(d2["box_head.fc1.weight"]), last["model"]["target.2.fc1.weight"])


def test_non_finite_loss_stops_and_keeps_last_checkpoint(sample_shards, tmp_path):
    out = tmp_path / "nan"
    proc = run([], out, sample_shards, "train.steps=4", "train.checkpoint_every=2", "debug.nan_at_step=3",
               check=False)
    assert proc.returncode != 0
    assert "non-finite loss (nan) at step 3" in proc.stderr and "last good checkpoint" in proc.stderr
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "exported").exists()


# --------------------------------------------------------------------- torchrun
def test_torchrun_restart_after_killed_rank_continues_steps(sample_shards, tmp_path):
    out = tmp_path / "elastic"
    proc = run([], out, sample_shards, "train.steps=5", "train.checkpoint_every=2", "debug.kill_at_step=3",
               "debug.kill_rank=1", torchrun=["--standalone", "--nproc-per-node", "2", "--max-restarts", "1"])
    assert "killing rank 1 at step 3" in proc.stderr
    recs = records(out)
    starts = [r for r in recs if r.get("event") == "start"]
    assert [(s["restart_count"], s["step"], s["world_size"]) for s in starts] == [(0, 0, 2), (1, 2, 2)]
    assert sorted(losses(out)) == [1, 2, 3, 4, 5]  # continuous: 1-2, then resumed 3-5
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 5 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


def test_two_nodes_on_localhost_with_c10d_rendezvous_resume_one_process_run(sample_shards, tmp_path):
    """Two torchrun "nodes" (one process each) meet through c10d and resume a run that one
    plain process started: the world size changes from 1 to 2 mid-epoch (elastic resize)."""
    out, port = tmp_path / "nodes", free_port()
    first = run([], out, sample_shards, "train.steps=4", "train.checkpoint_every=2", "debug.kill_at_step=2",
                check=False)
    assert first.returncode != 0 and torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    cmd_tail = ["train/pretrain.py", "--config", CONFIG, f"train.out={out}", f"data.shards={sample_shards}",
                "data.batch_size=4", "train.steps=4", "train.checkpoint_every=2", "train.log_every=1",
                "train.tensorboard=false", "export.enabled=false"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "twonodes",
                               *cmd_tail], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [n.communicate(timeout=400) for n in nodes]
    for n, (_, err) in zip(nodes, results):
        assert n.returncode == 0, err[-3000:]
    assert "continuing epoch 0 at global batch 2" in "".join(err for _, err in results)
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    starts = [(r["world_size"], r["step"]) for r in records(out) if r.get("event") == "start"]
    assert starts == [(1, 0), (2, 2)] and sorted(losses(out)) == [1, 2, 3, 4]

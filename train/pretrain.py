"""Pretraining entry point, one process or many:

    python train/pretrain.py --config train/configs/soco_small_cpu.yaml train.steps=20
    torchrun --nproc-per-node 8 train/pretrain.py --config train/configs/soco_r50_fpn.yaml
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \
        --max-restarts 3 train/pretrain.py --config ...

Method-agnostic: the config names the method (train/methods/<name>.py) and the
loader recipe; everything method-specific lives in the method. A run writes to
`train.out`: checkpoints/last.pt (+ config.yaml), metrics.jsonl, tb/, exported/.
It resumes from checkpoints/last.pt whenever that exists (torchrun restarts included),
after comparing the checkpoint's resolved config with this one (see `check_resume`):
  refused (one message listing the keys): method, model.*, data.shards/recipe/image_size/
    batch_size/options, optim.name, train.seed, train.accum_steps; train.resume=force loads
    the checkpoint anyway.
  honoured: train.steps/epochs, optim.base_lr/min_lr/warmup_*: the lr schedule is rebuilt
    from the new config and positioned at the resumed step, so every step from there on has
    the lr an uninterrupted run with the new config has at that step (the warm-up is the new
    config's; past it, the cosine runs over the new total to optim.min_lr). Where that lr
    differs from the checkpoint's by more than 1%, the lr does not jump: it ramps linearly
    from the checkpoint's value to the new schedule over optim.resume_warmup_steps (default:
    the warm-up length, else 1/20 of the steps left; 0 = jump), then follows it exactly (the
    console line gives both lrs; the ramp is kept in checkpoints, so a resume inside it goes
    on with it). An unchanged config resumes on the identical schedule.
    optim.weight_decay/momentum/trust/betas/eps/clip_grad apply from the resumed step, with
    the optimiser state (momentum buffers, Adam moments) kept. Runtime keys (device,
    precision, logging, checkpoint interval, workers, backend, export, eval, debug) freely.
The global batch `data.batch_size` is the effective batch of one optimiser step: each of W
ranks loads batch_size / (W x train.accum_steps) samples per micro-step."""
from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python/torchrun train/pretrain.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from common.io import DiskFullError
from common.progress import format_duration
from train import checkpoint, distributed
from train.callbacks import TrainContext, build_callbacks
from train.config import ConfigError, check_recipe_options, load_config, resolve
from train.loader.prefetch import Prefetch
from train.methods import build_method, check_recipe, recipe_name
from train.loader import ShardReadError
from train.metrics import Metrics
from train.optim import (apply_ramp, build_optimizer, build_scheduler, clip_gradients,
                         load_state_keeping_hyperparameters, resume_ramp_steps,
                         position)


class NonFiniteLoss(RuntimeError):
    pass


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(cfg: dict, device: torch.device) -> torch.dtype | None:
    """train.precision: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32."""
    precision = (cfg.get("train") or {}).get("precision", "auto")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if precision not in table:
        raise ConfigError(f"train.precision={precision!r}: use auto, bf16, fp16 or fp32")
    return table[precision]


def to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if channels_last and v.ndim == 4 and v.is_floating_point():
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def train_step(model, method, optimizer, scheduler, scaler, batch: dict | list[dict], dtype, step: int,
               total_steps: int, clip_grad: float | None = None) -> tuple[float, dict]:
    """One optimiser step over one batch or a list of micro-batches (gradient accumulation:
    each micro-batch's loss is divided by their number, so equal micro-batches give the
    gradient of the mean loss; DDP syncs gradients on the last one only). Per micro-batch:
    forward (autocast), finite check agreed by all ranks, backward; then optional
    gradient clipping, optimiser, scheduler, and the method's target update. Returns the
    mean loss and the method's mean logs. Raises NonFiniteLoss before touching the weights."""
    micro = batch if isinstance(batch, list) else [batch]
    device = next(method.parameters()).device
    optimizer.zero_grad(set_to_none=True)
    losses, logs = [], {}
    for i, mb in enumerate(micro):
        last = i == len(micro) - 1
        sync = model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(mb)
            loss = out["loss"]
            bad = distributed.all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1))
            if bad.item() > 0:
                raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at step {step + 1}")
            scaler.scale(loss / len(micro)).backward()
        losses.append(float(loss.detach()))
        for k, v in out.items():
            if k != "loss" and isinstance(v, (int, float)):
                logs[k] = logs.get(k, 0.0) + float(v) / len(micro)
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        logs["grad_norm"] = clip_gradients(method.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    method.momentum_update(step + 1, total_steps)
    return sum(losses) / len(losses), logs


def make_loader(cfg: dict, recipe: str, per_rank_batch: int, info):
    from train.loader import build_loader
    data = cfg["data"]
    shards = Path(data["shards"])
    if not shards.is_dir():
        raise FileNotFoundError(f"shards folder {shards} not found (data.shards): build it with "
                                "`make shards DATASET=...` or pass data.shards=PATH")
    return build_loader(recipe, str(shards), per_rank_batch, rank=info.rank, world_size=info.world_size,
                        num_workers=data["num_workers"], seed=cfg["train"]["seed"], backend=data["backend"],
                        image_size=data["image_size"], max_bad_samples=data["max_bad_samples"],
                        **data["options"])


def resume_loader(loader, saved: dict) -> None:
    """Put the loader at the saved (epoch, position). A state saved with another world
    size (elastic restart) is refused by the loader as is; then the position, counted in
    global batches, is carried over to this world size's state."""
    try:
        loader.load_state_dict(saved)
    except ValueError as e:
        adapted = {**loader.state_dict(), "epoch": saved["epoch"], "position": saved["position"]}
        loader.load_state_dict(adapted)
        print(f"[pretrain] warning: {str(e).split(';')[0]}; continuing epoch {saved['epoch']} at global batch "
              f"{saved['position']} with this run's split, so the rest of this epoch's samples go "
              "to ranks differently than in an uninterrupted run", file=sys.stderr, flush=True)


def check_resume(cfg: dict, out: Path, step: int) -> dict:
    """Compare the checkpoint's saved config with this run's: refuse (ConfigError, one message)
    what a resumed run cannot honour unless train.resume=force; return the honoured changes."""
    saved = checkpoint.saved_config(out)
    if saved is None:
        return {}
    try:
        saved = resolve(saved, f"the saved {checkpoint.checkpoint_dir(out) / 'config.yaml'}")
    except ConfigError:
        pass  # a config from an older schema: compare what it has
    refused, honoured = checkpoint.config_changes(saved, cfg)
    if refused and cfg["train"]["resume"] != "force":
        raise ConfigError(checkpoint.refusal_message(out, step, refused))
    return {**refused, **honoured}


def train(cfg: dict) -> dict:
    cfg = resolve(cfg)  # idempotent on a loaded config; fills defaults in a hand-made one
    t, data = cfg["train"], cfg["data"]
    info = distributed.init(t["device"])
    out = Path(t["out"])
    seed, accum = t["seed"], t["accum_steps"]
    global_batch = data["batch_size"]
    if global_batch % (info.world_size * accum):
        raise ConfigError(f"data.batch_size={global_batch} (global, per optimiser step) must be divisible by "
                          f"the world size {info.world_size} x train.accum_steps {accum}")
    per_rank = global_batch // (info.world_size * accum)

    seed_all(seed)  # same initial weights on every rank
    module, method = build_method(cfg)
    if getattr(method, "sync_bn", True):  # a method may keep per-rank BN (MoCo v2 shuffles BN instead)
        method = distributed.convert_sync_bn(method, info)
    method = method.to(info.device)
    channels_last = info.device.type == "cuda" and t["channels_last"]
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    seed_all(seed + 1000 * info.rank)

    recipe = recipe_name(cfg, module, method)
    check_recipe_options(recipe, data["options"], f"data.recipe={recipe}")
    loader = make_loader(cfg, recipe, per_rank, info)
    check_recipe(method, cfg["method"], recipe, loader.recipe.batch_keys)
    num_samples = int(loader.state_dict()["num_samples"])
    if global_batch > num_samples:
        raise ConfigError(f"data.batch_size={global_batch} is larger than the {num_samples} samples in "
                          f"{data['shards']}: every sample would appear more than once in a batch; lower "
                          f"data.batch_size to at most {num_samples} or add data")
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch < 1:
        raise ValueError(f"the loader yields no full batch from {data['shards']} at "
                         f"batch {per_rank} per rank x {accum} micro-steps: lower data.batch_size or add data")
    total = int(t["steps"] or round(t["epochs"] * steps_per_epoch))
    optimizer = build_optimizer(method, cfg, global_batch)
    scheduler = build_scheduler(optimizer, cfg, total, steps_per_epoch)
    dtype = autocast_dtype(cfg, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=dtype == torch.float16)

    step, state = 0, checkpoint.load_latest(out)
    changes: dict = {}
    lr_ramp = None
    if state is not None:
        step = int(state["step"])
        changes = check_resume(cfg, out, step)
        saved_lrs = [g["lr"] for g in state["optimizer"]["param_groups"]]  # the checkpoint's next lrs
        try:
            method.load_state_dict(state["model"])
            load_state_keeping_hyperparameters(optimizer, state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"the checkpoint {checkpoint.checkpoint_dir(out) / checkpoint.LAST} does not fit "
                              f"this model/optimiser ({str(e).splitlines()[0][:300]}); start fresh with a new "
                              "train.out") from None
        position(scheduler, step)  # the new config's schedule, at the resumed step
        lr_ramp = state.get("lr_ramp")  # a ramp still running from an earlier resume goes on
        new_lrs = [g["lr"] for g in optimizer.param_groups]
        if any(k in checkpoint.SCHEDULE_KEYS for k in changes) and len(saved_lrs) == len(new_lrs) and any(
                abs(a - b) > 0.01 * max(abs(a), abs(b)) for a, b in zip(saved_lrs, new_lrs)):
            n = resume_ramp_steps(cfg, total, step, steps_per_epoch)  # no jump: ramp to the new schedule
            lr_ramp = dict(start=step, steps=n, start_lrs=saved_lrs) if n > 0 else None
        if lr_ramp is not None and step < lr_ramp["start"] + lr_ramp["steps"]:
            apply_ramp(scheduler, lr_ramp)
            position(scheduler, step)  # the ramp's lr at the resumed step
        scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        if len(rngs) == info.world_size:
            checkpoint.set_rng_state(rngs[info.rank])
        if step % steps_per_epoch and state.get("loader") is not None:
            resume_loader(loader, state["loader"])
    model = method
    if info.distributed:
        model = DDP(method, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
                    find_unused_parameters=getattr(method, "find_unused_parameters", False),
                    forward_sync_buffers=False)  # per-rank BN statistics, as SoCo (methods.md 1.8)

    metrics = Metrics(out, total, global_batch, start_step=step, enabled=info.is_main,
                      log_every=t["log_every"], tensorboard=t["tensorboard"])
    if info.is_main:
        what = f"resumed from step {step}" if state is not None else "fresh start"
        metrics.say(f"[pretrain] {cfg['method']} ({recipe}), {info.world_size} process(es) on "
                    f"{info.device.type}, global batch {global_batch}"
                    + (f" ({accum} micro-steps of {per_rank} a rank)" if accum > 1 else "")
                    + f", {steps_per_epoch} steps/epoch, {total} steps, {what}; writing {out}")
        if changes:
            listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
            metrics.say(f"[pretrain] resuming with a changed config ({listed}); lr at step {step + 1}: "
                        f"{optimizer.param_groups[0]['lr']:.4g} (the checkpoint's schedule: {saved_lrs[0]:.4g})")
        metrics.event("start", step=step, world_size=info.world_size,
                      restart_count=info.restart_count, resumed=state is not None,
                      changed=sorted(changes))

    every = t["checkpoint_every"] or steps_per_epoch

    def save(loader_state) -> None:
        rngs = distributed.all_gather_object(checkpoint.rng_state())
        if info.is_main:
            checkpoint.save(out, dict(step=step, model=method.state_dict(), optimizer=optimizer.state_dict(),
                                      scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                                      rng=rngs, loader=loader_state, world_size=info.world_size,
                                      epoch=step // steps_per_epoch, lr_ramp=lr_ramp), cfg)
        distributed.barrier()

    callbacks = build_callbacks(cfg)
    ctx = TrainContext(cfg=cfg, method=method, step=step, total=total, steps_per_epoch=steps_per_epoch,
                       out=out, info=info, metrics=metrics)
    for cb in callbacks:
        cb.on_train_start(ctx)
    model.train()
    batches = Prefetch(loader, data["prefetch"], first_epoch=step // steps_per_epoch,
                       reset_first=state is None or step % steps_per_epoch == 0)
    dropped = 0  # micro-batches left at an epoch's end (fewer than accum_steps)
    try:
        while step < total:
            t0 = time.perf_counter()
            group, group_epoch = [], None
            while len(group) < accum:
                batch, loader_state, epoch = batches.next()
                if group and epoch != group_epoch:
                    dropped, group = dropped + len(group), []
                group_epoch = epoch
                group.append(batch)
            if group_epoch != step // steps_per_epoch:  # len(loader) promised more: never drift
                raise RuntimeError(f"the loader ended epoch {step // steps_per_epoch} after "
                                   f"{step % steps_per_epoch} of {steps_per_epoch} steps (len(loader)); "
                                   f"check the shards in {data['shards']} with `make verify`")
            group = [to_device(b, info.device, channels_last) for b in group]
            t_data = time.perf_counter() - t0
            for cb in callbacks:
                group = [cb.on_batch(ctx, b) for b in group]
            lr = optimizer.param_groups[0]["lr"]  # the lr this step uses
            loss, logs = train_step(model, method, optimizer, scheduler, scaler, group if accum > 1 else group[0],
                                    dtype, step, total, clip_grad=cfg["optim"]["clip_grad"])
            step += 1
            metrics.step(step, loss, lr, time.perf_counter() - t0, t_data, logs)
            ctx.step = step
            if step % every == 0 or step == total:
                save(loader_state)
            for cb in callbacks:
                cb.on_step_end(ctx)
    except NonFiniteLoss as e:
        last = checkpoint.checkpoint_dir(out) / checkpoint.LAST
        kept = f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint was written yet"
        message = (f"[pretrain] stopped: {e} on rank {info.rank}; {kept}. Lower optim.base_lr, raise "
                   "optim.warmup_epochs, set optim.clip_grad, or use train.precision=fp32, then rerun "
                   "(it resumes from the checkpoint).")
        metrics.event("non_finite_loss", step=step + 1)
        metrics.say(message)  # rank 0: stderr and train.log
        metrics.close()
        raise SystemExit(1 if info.is_main else message) from None
    finally:
        batches.close()

    for cb in callbacks:
        cb.on_train_end(ctx)
    summary = metrics.summary()
    bad = [b for rank_bad in distributed.all_gather_object(loader.bad_samples) for b in rank_bad]
    summary["bad_samples"] = len(bad)
    exported = None
    if info.is_main and cfg["export"]["enabled"]:
        from train.export import export_method
        exported = export_method(method, out / "exported", target=cfg["export"]["target"], cfg=cfg,
                                 formats=cfg["export"]["formats"])
    if info.is_main:
        metrics.event("end", step=step, dropped_micro_batches=dropped, **summary)
        metrics.say(f"[pretrain] done: step {step}/{total}, {summary['steps']} steps this run in "
                    f"{format_duration(summary['seconds'])}, {summary['images_per_s']:.1f} img/s, data-wait "
                    f"{100 * summary['data_wait_share']:.1f}%"
                    + (f", {dropped} trailing micro-batches of epochs skipped (not a multiple of "
                       f"train.accum_steps)" if dropped else "")
                    + (f", {len(bad)} bad sample(s) skipped (data.max_bad_samples): "
                       + "; ".join(f"{k}: {why}" for k, why in bad[:5]) + (" ..." if len(bad) > 5 else "")
                       if bad else "")
                    + f"; checkpoint {checkpoint.checkpoint_dir(out) / checkpoint.LAST}"
                    + (f"; exported {', '.join(str(p) for p in exported.values())}" if exported else ""))
    metrics.close()
    distributed.shutdown()
    return dict(step=step, total=total, **summary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. train/configs/soco_small_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.base_lr=0.5")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    try:
        train(cfg)
    except (ConfigError, FileNotFoundError, ShardReadError, DiskFullError) as e:
        # bad input, corrupt shards, a full disk: one line naming the file and the fix
        parser.exit(2, f"pretrain.py: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

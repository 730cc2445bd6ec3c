"""Pretraining entry point, one process or many:

    python train/pretrain.py --config train/configs/soco_small_cpu.yaml train.steps=20
    torchrun --nproc-per-node 8 train/pretrain.py --config train/configs/soco_r50_fpn.yaml
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \
        --max-restarts 3 train/pretrain.py --config ...

Method-agnostic: the config names the method (train/methods/<name>.py) and the
loader recipe; everything method-specific lives in the method. A run writes to
`train.out`: checkpoints/last.pt (+ config.yaml), metrics.jsonl, tb/, exported/.
It resumes from checkpoints/last.pt whenever that exists (torchrun restarts included)."""
from __future__ import annotations

import argparse
import os
import queue
import random
import signal
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python/torchrun train/pretrain.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from common.progress import format_duration
from train import checkpoint, distributed
from train.callbacks import TrainContext, build_callbacks
from train.config import ConfigError, get, load_config
from train.methods import build_method
from train.metrics import Metrics
from train.optim import build_optimizer, build_scheduler


class NonFiniteLoss(RuntimeError):
    pass


class Prefetch:
    """Stream batches across epochs, pulled `depth` ahead on a background thread so
    decoding and collation overlap the step (torch and DALI release the GIL), the next
    epoch's pipeline start included. Items are (batch, loader state right after it,
    epoch): a checkpoint then records the position of the batches actually trained
    on, not of those waiting in the queue. `depth` 0 pulls inline."""

    def __init__(self, loader, depth: int, first_epoch: int, reset_first: bool):
        self.loader, self.first_epoch, self.reset_first = loader, first_epoch, reset_first
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stream = self._batches()
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._fill, name="prefetch", daemon=True)
            self._thread.start()

    def _batches(self):
        epoch, reset = self.first_epoch, self.reset_first
        while not self._stop.is_set():
            if reset:  # else a resumed loader state already points inside this epoch
                self.loader.set_epoch(epoch)
            reset, n = True, 0
            for batch in self.loader:
                n += 1
                yield batch, self.loader.state_dict(), epoch
            if n == 0:
                raise RuntimeError(f"the loader yielded no batch for epoch {epoch}")
            epoch += 1

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for item in self._stream:
                if not self._put(item):
                    return
        except BaseException as e:  # re-raised in the training thread
            self._put(e)

    def next(self):
        if self._thread is None:
            return next(self._stream)
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(cfg: dict, device: torch.device) -> torch.dtype | None:
    """train.precision: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32."""
    precision = get(cfg, "train.precision", "auto")
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


def train_step(model, method, optimizer, scheduler, scaler, batch: dict, dtype, step: int,
               total_steps: int) -> tuple[float, dict]:
    """One optimiser step: forward (autocast), finite check agreed by all ranks,
    backward, optimiser, scheduler, then the method's target update. Returns the
    loss and the method's logs. Raises NonFiniteLoss before touching the weights."""
    device = next(method.parameters()).device
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(batch)
    loss = out["loss"]
    bad = distributed.all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1))
    if bad.item() > 0:
        raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at step {step + 1}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    method.momentum_update(step + 1, total_steps)
    logs = {k: float(v) for k, v in out.items() if k != "loss" and isinstance(v, (int, float))}
    return float(loss.detach()), logs


def make_loader(cfg: dict, recipe: str, per_rank_batch: int, info):
    from train.loader import build_loader
    shards = Path(get(cfg, "data.shards", ""))
    if not shards.is_dir():
        raise FileNotFoundError(f"shards folder {shards} not found (data.shards): build it with "
                                "`make shards DATASET=...` or pass data.shards=PATH")
    return build_loader(recipe, str(shards), per_rank_batch, rank=info.rank,
                        world_size=info.world_size, num_workers=int(get(cfg, "data.num_workers", 1)),
                        seed=int(get(cfg, "train.seed", 0)), backend=get(cfg, "data.backend", "dali"),
                        image_size=get(cfg, "data.image_size"), **(get(cfg, "data.options") or {}))


def maybe_fault(cfg: dict, info, step: int) -> None:
    """Test hook (debug.kill_rank / debug.kill_at_step): SIGKILL one rank on the first
    attempt only, to exercise torchrun restarts. Off unless set."""
    at = get(cfg, "debug.kill_at_step")
    if at is not None and step == int(at) and info.rank == int(get(cfg, "debug.kill_rank", 0)) \
            and info.restart_count == 0:
        print(f"[pretrain] debug.kill_at_step: killing rank {info.rank} at step {step}",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


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


def train(cfg: dict) -> dict:
    info = distributed.init(get(cfg, "train.device", "auto"))
    out = Path(get(cfg, "train.out", "work/pretrain"))
    seed = int(get(cfg, "train.seed", 0))
    global_batch = int(get(cfg, "data.batch_size"))
    if global_batch % info.world_size:
        raise ConfigError(f"data.batch_size={global_batch} (global) must be divisible by the "
                          f"world size {info.world_size}")
    per_rank = global_batch // info.world_size

    seed_all(seed)  # same initial weights on every rank
    module, method = build_method(cfg)
    if getattr(method, "sync_bn", True):  # a method may keep per-rank BN (MoCo v2 shuffles BN instead)
        method = distributed.convert_sync_bn(method, info)
    method = method.to(info.device)
    channels_last = info.device.type == "cuda" and bool(get(cfg, "train.channels_last", True))
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    seed_all(seed + 1000 * info.rank)

    recipe = get(cfg, "data.recipe") or module.RECIPE
    loader = make_loader(cfg, recipe, per_rank, info)
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise ValueError(f"the loader yields no full batch from {get(cfg, 'data.shards')} at "
                         f"batch {per_rank} per rank: lower data.batch_size or add data")
    total = int(get(cfg, "train.steps") or round(float(get(cfg, "train.epochs", 1)) * steps_per_epoch))
    optimizer = build_optimizer(method, cfg, global_batch)
    scheduler = build_scheduler(optimizer, cfg, total, steps_per_epoch)
    dtype = autocast_dtype(cfg, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=dtype == torch.float16)

    step, state = 0, checkpoint.load_latest(out)
    if state is not None:
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
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
                      log_every=int(get(cfg, "train.log_every", 10)),
                      tensorboard=bool(get(cfg, "train.tensorboard", True)))
    if info.is_main:
        what = f"resumed from step {step}" if state is not None else "fresh start"
        metrics.say(f"[pretrain] {get(cfg, 'method')} ({recipe}), {info.world_size} process(es) on "
                    f"{info.device.type}, global batch {global_batch}, {steps_per_epoch} steps/epoch, "
                    f"{total} steps, {what}; writing {out}")
        metrics.event("start", step=step, world_size=info.world_size,
                      restart_count=info.restart_count, resumed=state is not None)

    every = int(get(cfg, "train.checkpoint_every", 0)) or steps_per_epoch

    def save(loader_state) -> None:
        rngs = distributed.all_gather_object(checkpoint.rng_state())
        if info.is_main:
            checkpoint.save(out, dict(step=step, model=method.state_dict(), optimizer=optimizer.state_dict(),
                                      scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                                      rng=rngs, loader=loader_state, world_size=info.world_size,
                                      epoch=step // steps_per_epoch), cfg)
        distributed.barrier()

    callbacks = build_callbacks(cfg)
    ctx = TrainContext(cfg=cfg, method=method, step=step, total=total, steps_per_epoch=steps_per_epoch,
                       out=out, info=info, metrics=metrics)
    for cb in callbacks:
        cb.on_train_start(ctx)
    model.train()
    batches = Prefetch(loader, int(get(cfg, "data.prefetch", 2)), first_epoch=step // steps_per_epoch,
                       reset_first=state is None or step % steps_per_epoch == 0)
    try:
        while step < total:
            t0 = time.perf_counter()
            batch, loader_state, epoch = batches.next()
            if epoch != step // steps_per_epoch:  # len(loader) promised more: never drift
                raise RuntimeError(f"the loader ended epoch {step // steps_per_epoch} after "
                                   f"{step % steps_per_epoch} of {steps_per_epoch} batches (len(loader)); "
                                   f"check the shards in {get(cfg, 'data.shards')} with `make verify`")
            batch = to_device(batch, info.device, channels_last)
            t_data = time.perf_counter() - t0
            if get(cfg, "debug.nan_at_step") == step + 1:  # test hook: corrupt this batch's pixels
                batch = {k: v.new_full(v.shape, float("nan")) if v.is_floating_point() and v.ndim == 4
                         else v for k, v in batch.items()}
            lr = optimizer.param_groups[0]["lr"]  # the lr this step uses
            loss, logs = train_step(model, method, optimizer, scheduler, scaler, batch, dtype, step, total)
            step += 1
            metrics.step(step, loss, lr, time.perf_counter() - t0, t_data, logs)
            ctx.step = step
            for cb in callbacks:
                cb.on_step_end(ctx)
            if step % every == 0 or step == total:
                save(loader_state)
            maybe_fault(cfg, info, step)
    except NonFiniteLoss as e:
        last = checkpoint.checkpoint_dir(out) / checkpoint.LAST
        kept = f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint was written yet"
        message = (f"[pretrain] stopped: {e} on rank {info.rank}; {kept}. Lower optim.base_lr, raise "
                   "optim.warmup_epochs, or use train.precision=fp32, then rerun (it resumes from the checkpoint).")
        metrics.event("non_finite_loss", step=step + 1)
        metrics.say(message)  # rank 0: stderr and train.log
        metrics.close()
        raise SystemExit(1 if info.is_main else message) from None
    finally:
        batches.close()

    for cb in callbacks:
        cb.on_train_end(ctx)
    summary = metrics.summary()
    exported = None
    if info.is_main and get(cfg, "export.enabled", True):
        from train.export import export_method
        exported = export_method(method, out / "exported", target=bool(get(cfg, "export.target", False)))
    if info.is_main:
        metrics.event("end", step=step, **summary)
        metrics.say(f"[pretrain] done: step {step}/{total}, {summary['steps']} steps this run in "
                    f"{format_duration(summary['seconds'])}, {summary['images_per_s']:.1f} img/s, data-wait "
                    f"{100 * summary['data_wait_share']:.1f}%; checkpoint "
                    f"{checkpoint.checkpoint_dir(out) / checkpoint.LAST}"
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
    except (ConfigError, FileNotFoundError) as e:  # bad input: the message says what to fix
        parser.exit(2, f"pretrain.py: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

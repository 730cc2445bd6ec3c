"""Trainer callbacks: work that runs beside the step loop (online evaluation, debug
hooks) without the loop knowing what it is.

`train/pretrain.py` builds `build_callbacks(cfg)` once and calls, on every rank:
  on_train_start(ctx)        after the method, loader and resume are set up
  on_batch(ctx, batch)       each (micro-)batch on the device before the step; returns the
                             batch to train on (`ctx.step` = steps done so far)
  on_step_end(ctx)           after each optimiser step and its checkpoint, if one was due
                             (`ctx.step` = steps done)
  on_train_end(ctx)          after the last step, before export
A callback that should run on one rank only checks `ctx.is_main`; one that needs the
other ranks to wait calls `train.distributed.barrier()` itself. Logging goes through
`ctx.metrics` (`.record(step, group, **values)` writes metrics.jsonl and TensorBoard,
`.say(line)` the console and train.log; both are no-ops off rank 0)."""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class TrainContext:
    cfg: dict              # the resolved config
    method: nn.Module      # the unwrapped train.methods.Method (not the DDP wrapper)
    step: int              # optimiser steps done so far
    total: int             # steps of the whole run
    steps_per_epoch: int
    out: Path              # train.out (the run folder)
    info: Any              # train.distributed.DistInfo: rank, world_size, device, is_main
    metrics: Any           # train.metrics.Metrics

    @property
    def is_main(self) -> bool:
        return bool(self.info.is_main)


class Callback:
    """Base class: every hook is optional."""

    def on_train_start(self, ctx: TrainContext) -> None:
        return None

    def on_batch(self, ctx: TrainContext, batch: dict) -> dict:
        return batch

    def on_step_end(self, ctx: TrainContext) -> None:
        return None

    def on_train_end(self, ctx: TrainContext) -> None:
        return None


def maybe_fault(cfg: dict, info, step: int) -> None:
    """Test hook (debug.kill_rank / debug.kill_at_step): SIGKILL one rank on the first
    attempt only, to exercise torchrun restarts. Off unless set."""
    debug = cfg.get("debug") or {}
    at = debug.get("kill_at_step")
    if at is not None and step == int(at) and info.rank == int(debug.get("kill_rank") or 0) \
            and info.restart_count == 0:
        print(f"[pretrain] debug.kill_at_step: killing rank {info.rank} at step {step}",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


class DebugFaults(Callback):
    """The `debug:` test hooks: NaN pixels fed at debug.nan_at_step, a SIGKILL after the step
    (and its checkpoint) debug.kill_at_step (`maybe_fault`)."""

    def on_batch(self, ctx: TrainContext, batch: dict) -> dict:
        if (ctx.cfg.get("debug") or {}).get("nan_at_step") == ctx.step + 1:  # corrupt this step's pixels
            return {k: v.new_full(v.shape, float("nan")) if v.is_floating_point() and v.ndim == 4 else v
                    for k, v in batch.items()}
        return batch

    def on_step_end(self, ctx: TrainContext) -> None:
        maybe_fault(ctx.cfg, ctx.info, ctx.step)


def build_callbacks(cfg: dict) -> list[Callback]:
    """The callbacks a config asks for, in call order (the debug hooks last)."""
    callbacks: list[Callback] = []
    every = (cfg.get("eval") or {}).get("every") or 0
    if int(every) > 0:  # online kNN of the backbone (issue 11)
        from train.eval.online import OnlineEval
        callbacks.append(OnlineEval(cfg))
    callbacks.append(DebugFaults())
    return callbacks

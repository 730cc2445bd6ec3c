"""Trainer callbacks: work that runs beside the step loop (online evaluation, debug
hooks) without the loop knowing what it is.

`train/pretrain.py` builds `build_callbacks(cfg)` once and calls, on every rank:
  on_train_start(ctx)        after the method, loader and resume are set up
  on_step_end(ctx)           after each optimiser step (`ctx.step` = steps done)
  on_train_end(ctx)          after the last step, before export
A callback that should run on one rank only checks `ctx.is_main`; one that needs the
other ranks to wait calls `train.distributed.barrier()` itself. Logging goes through
`ctx.metrics` (`.record(step, group, **values)` writes metrics.jsonl and TensorBoard,
`.say(line)` the console and train.log; both are no-ops off rank 0)."""
from __future__ import annotations

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

    def on_step_end(self, ctx: TrainContext) -> None:
        return None

    def on_train_end(self, ctx: TrainContext) -> None:
        return None


def build_callbacks(cfg: dict) -> list[Callback]:
    """The callbacks a config asks for, in call order."""
    callbacks: list[Callback] = []
    every = (cfg.get("eval") or {}).get("every") or 0
    if int(every) > 0:  # online kNN of the backbone (issue 11)
        from train.eval.online import OnlineEval
        callbacks.append(OnlineEval(cfg))
    return callbacks

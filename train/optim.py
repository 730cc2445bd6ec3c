"""Optimisers (LARS exactly as SoCo uses it, SGD, AdamW), the lr scaling rule, the warm-up +
cosine schedule (methods.md 1.8) and global gradient-norm clipping. Parameter groups come
from the method (`Method.param_groups`: which parameters decay, which LARS adapts).

The schedule is a pure function of the step (`WarmupCosine`), so a resume rebuilds it from the
new config and positions it at the resumed step (`position`): see train/pretrain.py
`resume` for what a changed total or base_lr does.

LARS step for a group with `lars=True` (the ndim >= 2 parameters):
    g <- g + wd * w
    g <- g * trust * ||w|| / (||g|| + 1e-8)      (skipped if ||w|| or ||g|| is 0)
then SGD momentum (buf <- mu * buf + g, w <- w - lr * buf; first buf = g).
Groups with `lars=False` (biases, norms) get neither decay nor scaling."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from train.schema import ConfigError, OptimConfig, section


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust: float = 0.001, eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust=trust, eps=eps, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"] and group["lars"]:
                    d = d.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = group["trust"] * w_norm / (d_norm + group["eps"])
                    d = d * torch.where((w_norm > 0) & (d_norm > 0), ratio, torch.ones_like(ratio))
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """lr = base_lr x global_batch / 256 (the linear scaling rule SoCo uses)."""
    return base_lr * global_batch / 256.0


class WarmupCosine:
    """lr multiplier for LambdaLR: linear warmup from 1/warmup_div to 1 over
    `warmup` steps, then cosine to min_lr/lr over the rest. A callable object (not a
    lambda) so LambdaLR can save and restore it."""

    def __init__(self, total: int, warmup: int, lr: float, min_lr: float, warmup_div: float = 100.0):
        self.total, self.warmup, self.lr, self.min_lr, self.warmup_div = total, warmup, lr, min_lr, warmup_div

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            start = 1.0 / self.warmup_div
            return start + (1.0 - start) * step / self.warmup
        span = max(self.total - self.warmup, 1)
        t = min(step - self.warmup, span) / span
        floor = self.min_lr / self.lr if self.lr else 0.0
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_optimizer(method, cfg: dict, global_batch: int) -> torch.optim.Optimizer:
    """The method chooses LARS, SGD or AdamW (`Method.optimizer`, overridable by optim.name)
    and which parameters skip decay/LARS (`Method.param_groups`). `global_batch` is the
    effective batch of one optimiser step (all ranks, all accumulation micro-steps)."""
    o = section(cfg, OptimConfig)
    name = method.optimizer if o.name == "auto" else o.name
    lr = scaled_lr(o.base_lr, global_batch)
    groups = [g for g in method.param_groups(o.weight_decay) if g["params"]]
    if name == "lars":
        return LARS(groups, lr=lr, momentum=o.momentum, trust=o.trust)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), eps=o.eps)
    raise ConfigError(f"unknown optimiser {name!r} (optim.name): use lars, sgd, adamw or auto")


def build_scheduler(optimizer, cfg: dict, total_steps: int, steps_per_epoch: int) -> LambdaLR:
    """Linear warm-up (optim.warmup_steps, else warmup_epochs x steps/epoch) from lr/100, then
    cosine to optim.min_lr at `total_steps`."""
    o = section(cfg, OptimConfig)
    warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_epochs * steps_per_epoch)
    warmup = min(int(warmup), total_steps)
    lr = optimizer.param_groups[0]["lr"]
    return LambdaLR(optimizer, WarmupCosine(total_steps, warmup, lr, o.min_lr))


def position(scheduler: LambdaLR, step: int) -> None:
    """Put a fresh scheduler at `step` optimiser steps done: the lrs become exactly what
    `step` calls of scheduler.step() would give (the schedule is a function of the step)."""
    scheduler.last_epoch = step
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(step)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


class Ramp:
    """lr multiplier: linear from `start` at step `s0` to `schedule(s0 + n)` at step s0 + n,
    then `schedule` itself. A resumed run whose schedule changed gets one, so its lr never
    jumps (e.g. a finished run at the cosine floor that is given more steps re-warms to the
    new schedule instead of leaping to it or staying at the floor). `schedule` is a slot, not
    in `__dict__`, so LambdaLR's state_dict holds plain numbers (weights-only loadable)."""

    __slots__ = ("schedule", "__dict__")

    def __init__(self, schedule, s0: int, n: int, start: float):
        self.schedule, self.s0, self.n, self.start = schedule, s0, n, start

    def __call__(self, step: int) -> float:
        if self.n <= 0 or not self.s0 <= step < self.s0 + self.n:
            return self.schedule(step)
        end = self.schedule(self.s0 + self.n)
        return self.start + (end - self.start) * (step - self.s0) / self.n


def resume_ramp_steps(cfg: dict, total_steps: int, step: int, steps_per_epoch: int) -> int:
    """optim.resume_warmup_steps, or (null) the config's warm-up length, else 1/20 of the
    steps left (at least 1)."""
    o = section(cfg, OptimConfig)
    if o.resume_warmup_steps is not None:
        return max(int(o.resume_warmup_steps), 0)
    warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_epochs * steps_per_epoch)
    return int(warmup) if warmup > 0 else max(1, (total_steps - step) // 20)


def apply_ramp(scheduler: LambdaLR, ramp: dict) -> None:
    """Wrap the scheduler's schedule in `Ramp`s from ramp = {start, steps, start_lrs} (the
    lrs of the checkpoint at step `start`); the caller positions it (`position`). Kept in
    checkpoints (`lr_ramp`) so a later resume inside the ramp continues it."""
    scheduler.lr_lambdas = [Ramp(getattr(fn, "schedule", fn), ramp["start"], ramp["steps"],
                                 lr0 / base if base else 0.0)
                            for fn, base, lr0 in zip(scheduler.lr_lambdas, scheduler.base_lrs,
                                                     ramp["start_lrs"], strict=True)]


def load_state_keeping_hyperparameters(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimiser state (momentum buffers, Adam moments) but keep this
    optimiser's hyperparameters (lr, weight decay, momentum, betas, ...) as the new config
    sets them; torch's load_state_dict would restore the saved ones."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, hyper in zip(optimizer.param_groups, fresh, strict=True):
        group.update(hyper)


def clip_gradients(parameters, max_norm: float | None) -> float | None:
    """Clip the global L2 norm of the gradients to `max_norm` (optim.clip_grad); returns the
    norm before clipping, or None when clipping is off."""
    if max_norm is None:
        return None
    grads = [p for p in parameters if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))

"""LARS exactly as SoCo uses it, the lr scaling rule, and warmup + cosine schedule
(methods.md 1.8).

LARS step for a group with `lars=True` (the ndim >= 2 parameters):
    g <- g + wd * w
    g <- g * trust * ||w|| / (||g|| + 1e-8)      (skipped if ||w|| or ||g|| is 0)
then SGD momentum (buf <- mu * buf + g, w <- w - lr * buf; first buf = g).
Groups with `lars=False` (biases, norms) get neither decay nor scaling."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from train.config import get


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
    """The method chooses LARS or SGD (`Method.optimizer`, overridable by optim.name)
    and which parameters skip decay/LARS (`Method.param_groups`)."""
    name = get(cfg, "optim.name", "auto")
    name = method.optimizer if name in (None, "auto") else name
    lr = scaled_lr(float(get(cfg, "optim.base_lr", 1.0)), global_batch)
    groups = method.param_groups(float(get(cfg, "optim.weight_decay", 1e-5)))
    groups = [g for g in groups if g["params"]]
    momentum = float(get(cfg, "optim.momentum", 0.9))
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, trust=float(get(cfg, "optim.trust", 0.001)))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimiser {name!r} (optim.name): use lars, sgd or auto")


def build_scheduler(optimizer, cfg: dict, total_steps: int, steps_per_epoch: int) -> LambdaLR:
    warmup = get(cfg, "optim.warmup_steps")
    if warmup is None:
        warmup = round(float(get(cfg, "optim.warmup_epochs", 0)) * steps_per_epoch)
    warmup = min(int(warmup), total_steps)
    lr = optimizer.param_groups[0]["lr"]
    return LambdaLR(optimizer, WarmupCosine(total_steps, warmup, lr, float(get(cfg, "optim.min_lr", 1e-6))))

"""Method registry and the interface every pretraining method implements.

A method is one file `train/methods/<name>.py` that defines
  RECIPE: str              the loader recipe it consumes (train.loader.build_loader)
  build(cfg) -> Method     cfg is the resolved config dict (see train/config.py)
Everything method-specific lives there: heads, loss, target network and its EMA
schedule, which parameters LARS/weight decay skip, and the optimiser kind. The
trainer (train/pretrain.py) only calls what `Method` defines below."""
from __future__ import annotations

import importlib
import math
from types import ModuleType

import torch
from torch import nn

KNOWN = ("soco", "detcon", "maskco", "mocov2")


class Method(nn.Module):
    """Base class. Subclasses set `self.backbone` (train.models.backbone.ResNet) and
    implement `forward(batch) -> {"loss": Tensor, **float logs}`.

    Optional overrides:
      momentum_update(step, total_steps)  update target networks after each optimiser
                                          step (no-op here)
      param_groups(weight_decay)          optimiser groups, see below
      optimizer: "lars" | "sgd"           which optimiser train/optim.py builds
      export_modules(target=False)        {"backbone": m, "fpn": m?, "head": m?} for
                                          train/export.py (detectron2 format); target=True
                                          gives the EMA target network's modules
      find_unused_parameters: bool        passed to DDP (True when some heads may get
                                          no gradient in a step)
    """

    optimizer: str = "lars"
    find_unused_parameters: bool = False

    def momentum_update(self, step: int, total_steps: int) -> None:
        return None

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Trainable parameters split as SoCo/BYOL do (methods.md 1.8): ndim >= 2 get
        weight decay and LARS scaling; 1-D (biases, norms) get neither. Frozen
        parameters (target networks) are left out. Each group carries `lars: bool`."""
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        return [dict(params=decay, weight_decay=weight_decay, lars=True),
                dict(params=no_decay, weight_decay=0.0, lars=False)]

    def export_modules(self, target: bool = False) -> dict[str, nn.Module]:
        if target:
            raise NotImplementedError(f"{type(self).__name__} has no target network to export")
        return {"backbone": self.backbone}


class MomentumEncoderMethod(Method):
    """A query encoder with a momentum key encoder (MoCo v2, MaskCo): plain SGD decaying every
    trainable parameter (biases and BN included, as MoCo and OpenSelfSup do), a constant
    momentum update of the key backbone and head, and export of either backbone.
    Subclasses set backbone, head, key_backbone, key_head and momentum."""

    def param_groups(self, weight_decay: float) -> list[dict]:
        return [dict(params=[p for p in self.parameters() if p.requires_grad],
                     weight_decay=weight_decay, lars=False)]

    def export_modules(self, target: bool = False) -> dict[str, nn.Module]:
        """`target`: the momentum key encoder's backbone instead of the query one."""
        return {"backbone": self.key_backbone if target else self.backbone}

    def momentum_update(self, step: int, total_steps: int) -> None:
        ema_update(self.backbone, self.key_backbone, self.momentum)               # constant m
        ema_update(self.head, self.key_head, self.momentum)


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL/SoCo target momentum: tau_k = 1 - (1 - base) * (cos(pi k / K) + 1) / 2,
    rising from `base` at k=0 to 1 at k=K (methods.md 1.7)."""
    k = min(max(step, 0), max(total_steps, 1))
    return 1.0 - (1.0 - base) * (math.cos(math.pi * k / max(total_steps, 1)) + 1.0) / 2.0


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """target <- m * target + (1 - m) * online over parameters only; buffers (BN
    running statistics) are not averaged, as in SoCo."""
    for p_t, p_o in zip(target.parameters(), online.parameters(), strict=True):
        p_t.mul_(momentum).add_(p_o.detach(), alpha=1.0 - momentum)


def make_target(online: nn.Module) -> nn.Module:
    """A frozen copy of `online` to be updated by `ema_update`."""
    import copy
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def get(name: str) -> ModuleType:
    """The method module `train.methods.<name>` (has RECIPE and build)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"bad method name {name!r}: use one of {KNOWN} (config key `method`)")
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise ValueError(f"unknown method {name!r}: no train/methods/{name}.py; "
                         f"known methods: {', '.join(KNOWN)} (config key `method`)") from None
    for attr in ("RECIPE", "build"):
        if not hasattr(module, attr):
            raise TypeError(f"train/methods/{name}.py must define {attr} (see train/methods/__init__.py)")
    return module


def build_method(cfg: dict) -> tuple[ModuleType, Method]:
    """(method module, Method) for the config's `method` key, built from its `model:` keys."""
    name = cfg.get("method") if isinstance(cfg, dict) else None
    if not name:
        from train.config import ConfigError
        raise ConfigError("the config has no `method` key (e.g. method: soco)")
    module = get(name)
    return module, module.build(cfg)


def build_on_backbone(cls: type, cfg: dict, name: str, defaults: dict,
                      zero_init_residual: bool) -> Method:
    """`cls(backbone, **options)` from the config's `model:` keys over `defaults`.

    The backbone keys (backbone, width, zero_init_residual) are shared by every method built
    on one ResNet; any other unknown key is refused by name, so a typo never trains silently
    with a default."""
    from train.models.backbone import build_backbone
    backbone_keys = dict(backbone="resnet50", width=64, zero_init_residual=zero_init_residual)
    opts = {**backbone_keys, **defaults, **(cfg.get("model") or {})}
    unknown = set(opts) - set(defaults) - set(backbone_keys)
    if unknown:
        raise ValueError(f"unknown {name} model keys {sorted(unknown)}: allowed "
                         f"{sorted(set(defaults) | set(backbone_keys))}")
    backbone = build_backbone(opts.pop("backbone"), width=opts.pop("width"),
                              zero_init_residual=opts.pop("zero_init_residual"))
    return cls(backbone, **opts)

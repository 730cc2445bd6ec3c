"""Method registry and the interface every pretraining method implements.

A method is one module (`train/methods/<name>.py`, or any importable `package.module` named in
the config's `method:` key) that defines
  ModelConfig              dataclass: its `model:` schema (inherit train.schema.BackboneFields)
  RECIPE: str              the loader recipe it consumes by default (data.recipe overrides)
  a train.loader.recipes.Recipe subclass per recipe it declares (registered by name when the
                           module is imported; views, box sets, mask views, plan, batch hooks)
  build(cfg) -> Method     cfg is the (possibly partial) config dict; use build_on_backbone
Everything method-specific lives there: heads, loss, target network and its EMA
schedule, which parameters LARS/weight decay skip, and the optimiser kind. The
trainer (train/pretrain.py) only calls what `Method` defines below."""
from __future__ import annotations

import importlib
import math
import pkgutil
from types import ModuleType

import torch
from torch import nn



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
      recipe: str | None                  the loader recipe this instance consumes when
                                          data.recipe is null (None = the module's RECIPE;
                                          e.g. SoCo's c4 variant: soco_c4)
      batch_keys() -> tuple[str, ...]     the batch keys its forward reads; the trainer
                                          refuses a recipe whose batches lack one before the
                                          first step (`check_recipe`)
    """

    optimizer: str = "lars"
    find_unused_parameters: bool = False
    recipe: str | None = None

    def batch_keys(self) -> tuple[str, ...]:
        return ()

    def momentum_update(self, step: int, total_steps: int) -> None:
        return None

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Trainable parameters split as SoCo/BYOL do (methods.md 1.8): ndim >= 2 get
        weight decay and LARS scaling; 1-D (biases, norms) get neither. Frozen
        parameters (target networks) are left out. Each group carries `lars: bool`."""
        skip = self.no_weight_decay()
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 and name not in skip else no_decay).append(p)
        return [dict(params=decay, weight_decay=weight_decay, lars=True),
                dict(params=no_decay, weight_decay=0.0, lars=False)]

    def no_weight_decay(self) -> set[str]:
        """Parameter names (of this module) that never take weight decay: the backbone's
        `no_weight_decay()` names (ViT: pos_embed, cls_token, norms, biases), prefixed."""
        backbone = getattr(self, "backbone", None)
        names = backbone.no_weight_decay() if backbone is not None and hasattr(backbone, "no_weight_decay") else ()
        prefix = next((n for n, m in self.named_modules() if m is backbone), "backbone")
        return {f"{prefix}.{n}" for n in names}

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
        """Every trainable parameter decays (as MoCo), except the backbone's no_weight_decay names."""
        skip = self.no_weight_decay()
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [dict(params=[p for n, p in params if n not in skip], weight_decay=weight_decay, lars=False)]
        exempt = [p for n, p in params if n in skip]
        return groups + ([dict(params=exempt, weight_decay=0.0, lars=False)] if exempt else [])

    def export_modules(self, target: bool = False) -> dict[str, nn.Module]:
        """`target`: the momentum key encoder's backbone instead of the query one."""
        return {"backbone": self.key_backbone if target else self.backbone}

    def momentum_update(self, step: int, total_steps: int) -> None:
        ema_update(self.backbone, self.key_backbone, self.momentum)               # constant m
        ema_update(self.head, self.key_head, self.momentum)


def recipe_name(cfg: dict, module: ModuleType, method: Method) -> str:
    """The loader recipe a run of `method` consumes: data.recipe, else the instance's own
    (`method.recipe`), else the module's RECIPE."""
    return ((cfg or {}).get("data") or {}).get("recipe") or method.recipe or module.RECIPE


def check_recipe(method: Method, method_name: str, recipe: str, recipe_keys) -> None:
    """Refuse (ConfigError, naming data.recipe and the recipe to use) a loader recipe whose
    batches lack a key `method.batch_keys()` names."""
    have = set(recipe_keys)
    missing = [k for k in method.batch_keys() if k not in have]
    if missing:
        from train.schema import ConfigError
        own = recipe_name({}, get(method_name), method)
        raise ConfigError(f"data.recipe={recipe}: its batches carry no {', '.join(missing)}, which method "
                          f"{method_name} reads here; set data.recipe={own} (or null: this method's own)")


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


def known() -> list[str]:
    """The built-in methods: the modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str) -> ModuleType:
    """The method module for a config's `method:`: `train.methods.<name>` for a built-in
    name, else the importable module path itself (e.g. `mylab.methods.toy`)."""
    if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
        raise ValueError(f"bad method name {name!r}: use one of {known()} or a module path "
                         "(config key `method`)")
    candidates = [name] if "." in name else [f"{__name__}.{name}", name]   # built-in first, then importable
    module = None
    for path in candidates:
        try:
            module = importlib.import_module(path)
            break
        except ModuleNotFoundError as e:
            if e.name is None or not path.startswith(e.name):
                raise   # the module exists but one of its imports is missing
    if module is None:
        raise ValueError(f"unknown method {name!r}: no train/methods/{name}.py and no importable module "
                         f"{name}; known methods: {', '.join(known())} (config key `method`)")
    for attr in ("RECIPE", "build", "ModelConfig"):
        if not hasattr(module, attr):
            raise TypeError(f"method module {path} must define {attr} (see train/methods/__init__.py)")
    return module


def model_schema(module: ModuleType) -> type:
    """The method's `model:` dataclass."""
    return module.ModelConfig


def build_method(cfg: dict) -> tuple[ModuleType, Method]:
    """(method module, Method) for the config's `method` key, built from its `model:` keys."""
    name = cfg.get("method") if isinstance(cfg, dict) else None
    if not name:
        from train.schema import ConfigError
        raise ConfigError("the config has no `method` key (e.g. method: soco)")
    module = get(name)
    return module, module.build(cfg)


def model_options(cfg: dict, schema: type, label: str) -> dict:
    """The config's `model:` keys checked against `schema` (defaults filled). An unknown key is
    refused by name, so a typo never trains silently with a default."""
    from train.schema import ConfigError, check_section
    try:
        return check_section(schema, (cfg or {}).get("model"), "model")
    except ConfigError as e:
        if "unknown key" in str(e):
            raise ConfigError(f"unknown {label} model keys: {e}") from None
        raise


def build_on_backbone(cls: type, cfg: dict, schema: type, label: str) -> Method:
    """`cls(backbone, **options)`: the backbone from the registry (train.models) by the
    schema's BackboneFields, every other `model:` key passed to `cls`."""
    from train.models import backbone_from_options
    opts = model_options(cfg, schema, label)
    return cls(backbone_from_options(opts), **opts)

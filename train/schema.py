"""The typed configuration schema: one dataclass per section, every default in one place.

Why dataclasses (and not OmegaConf structured configs): they need no dependency (omegaconf is
not in our pinned environment), a method's `model:` schema is a plain class next to its code,
and the checker below gives the messages we want (did-you-mean for unknown keys in files and
overrides alike, type errors naming the key, the expected type and where the value came from).
The trainer keeps passing plain dicts (the resolved config, every key present) so checkpoints,
config.yaml and the callbacks see one format; `section(cfg, Cls)` gives a typed view.

Supported field types: bool, int, float, str, `X | None`, `A | B`, `Literal[...]`, `list[X]`,
`tuple[X, ...]`, `dict` (free-form, e.g. `data.options`, checked by its owner) and a nested
dataclass."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """Bad configuration: the message names the key, the source and the fix."""


# ----------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    shards: str = "work/sample/shards"
    recipe: str | None = None            # null = the method's own recipe (its RECIPE)
    backend: Literal["dali", "reference"] = "dali"
    image_size: int | None = None        # null = the recipe's sizes
    batch_size: int = 256                # global and effective: per optimiser step, all ranks, all micro-steps
    num_workers: int = 1
    options: dict = field(default_factory=dict)   # recipe parameters, checked against the recipe's defaults
    prefetch: int = 2                    # batches pulled ahead on a background thread (0 = inline)
    max_bad_samples: int = 0             # TODO(merge): passed to build_loader once issue 12 lands it


@dataclass
class OptimConfig:
    name: Literal["auto", "lars", "sgd", "adamw"] = "auto"   # auto = the method's choice
    base_lr: float = 1.0                 # lr = base_lr x effective batch / 256
    weight_decay: float = 1.0e-5
    momentum: float = 0.9                # LARS / SGD
    trust: float = 0.001                 # LARS trust coefficient
    betas: tuple[float, float] = (0.9, 0.999)   # AdamW
    eps: float = 1.0e-8                  # AdamW
    clip_grad: float | None = None       # max global gradient L2 norm; null = no clipping
    warmup_epochs: float = 0.0           # linear warm-up from lr/100
    warmup_steps: int | None = None      # overrides warmup_epochs when set
    min_lr: float = 1.0e-6               # cosine floor
    resume_warmup_steps: int | None = None  # resumed with a changed schedule: steps to ramp from the
                                            # checkpoint's lr to the new schedule (null = the warm-up
                                            # length, else 1/20 of the steps left; 0 = jump at once)


@dataclass
class TrainConfig:
    out: str = "work/pretrain"
    epochs: float = 1.0
    steps: int | None = None             # overrides epochs when set
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    channels_last: bool = True           # CUDA only
    checkpoint_every: int = 0            # steps; 0 = once per epoch; always at the end
    log_every: int = 10
    tensorboard: bool = True
    accum_steps: int = 1                 # micro-batches per optimiser step (gradient accumulation)
    resume: Literal["auto", "force"] = "auto"   # force = resume despite changes resume refuses


@dataclass
class ExportConfig:
    enabled: bool = True
    target: bool = False                 # export the EMA/momentum target network instead
    formats: list[str] | None = None     # null = every format the backbone family supports


@dataclass
class EvalConfig:                        # online evaluation (issue 11 reads it; docs/interfaces.md)
    every: int = 0                       # steps; 0 = off
    train: str | None = None             # labelled shards folder: the kNN memory bank
    test: str | None = None              # queries; null = a deterministic split of `train` by key
    test_fraction: float = 0.5
    k: int = 20
    temperature: float = 0.07
    levels: list[str] = field(default_factory=lambda: ["res5"])
    target: bool = True                  # also evaluate the target/momentum branch
    max_samples: int | None = None       # null = all
    image_size: int | None = None        # null = data.image_size or 224
    crop_size: int | None = None         # object crops' side (crop probe); null = data.image_size, 0 = off
    scope: str = "crop"                  # what the online kNN classifies: crop | object (RoIAlign)
    batch_size: int = 64


@dataclass
class DebugConfig:                       # test hooks (train/callbacks.py DebugFaults)
    kill_at_step: int | None = None      # SIGKILL rank kill_rank at this step (first attempt only)
    kill_rank: int = 0
    nan_at_step: int | None = None       # feed NaN pixels at this step


SECTIONS: dict[str, type] = {"data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
                             "export": ExportConfig, "eval": EvalConfig, "debug": DebugConfig}
TOP_LEVEL = ("method", "model", *SECTIONS)


@dataclass
class BackboneFields:
    """The backbone keys every method's `model:` schema inherits (train/models registry)."""
    backbone: str = "resnet50"           # a name in train.models.BACKBONES (resnet*, vit_* via timm)
    width: int = 64                      # ResNet base width (64 = torchvision's network)
    zero_init_residual: bool = True      # ResNet: last BN gamma of each block starts at 0
    backbone_options: dict = field(default_factory=dict)   # family-specific, e.g. ViT img_size, patch_size, depth


# ----------------------------------------------------------------------------- checking
def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(tp, value, key: str, where) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _coerce(a, value, key, where)
            except (_Mismatch, ConfigError):
                continue
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        inner = [a for a in args if a is not Ellipsis]
        if origin is tuple and Ellipsis not in args and len(inner) != len(value):
            raise _Mismatch
        items = [_coerce(inner[i if origin is tuple and Ellipsis not in args else 0], v, key, where)
                 for i, v in enumerate(value)] if inner else list(value)
        return items
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise _Mismatch
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return check_section(tp, value, key, where)
    raise TypeError(f"schema type {tp!r} of {key} is not supported by train/schema.py")


def _source(where, key: str) -> str:
    return where(key) if callable(where) else where


def check_section(cls: type, raw: dict | None, prefix: str, where="the config") -> dict:
    """`raw` (a mapping, may be partial) checked against dataclass `cls`: unknown keys refused
    with did-you-mean, values coerced to the field types, missing keys filled from the
    defaults. Returns a plain dict in field order. `where` names the source of a key (a
    string, or a callable key -> string, e.g. which override set it)."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{_source(where, prefix)}: `{prefix}` must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for k in raw:
        if k not in fields:
            full = f"{prefix}.{k}" if prefix else str(k)
            near = difflib.get_close_matches(str(k), list(fields), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(f'{prefix}.{n}' if prefix else n for n in near)}?" if near else \
                f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{_source(where, full)}: unknown key {full!r}{hint}")
    for name, f in fields.items():
        full = f"{prefix}.{name}" if prefix else name
        if name in raw:
            try:
                out[name] = _coerce(hints[name], raw[name], full, where)
            except _Mismatch:
                raise ConfigError(f"{_source(where, full)}: {full}={raw[name]!r} ({type(raw[name]).__name__}): "
                                  f"expected {_type_name(hints[name])}") from None
        elif f.default is not dataclasses.MISSING:
            out[name] = list(f.default) if isinstance(f.default, tuple) else f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[name] = f.default_factory()
        else:
            raise ConfigError(f"{_source(where, full)}: required key {full!r} is missing")
    return out


def section(cfg: dict, cls: type, name: str | None = None):
    """A typed (dataclass) view of one section of a config dict, defaults filled; `cfg` may be
    partial (tests pass `{"optim": {...}}`). `name` defaults to the SECTIONS key of `cls`."""
    if name is None:
        name = next(k for k, v in SECTIONS.items() if v is cls)
    values = check_section(cls, (cfg or {}).get(name), name)
    return cls(**values)


def schema_keys(cls: type, prefix: str) -> list[str]:
    """Every dotted key of a section (for did-you-mean across sections)."""
    return [f"{prefix}.{f.name}" for f in dataclasses.fields(cls)]

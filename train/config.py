"""Training configuration: one YAML recipe plus dotted `key=value` overrides.

    python train/pretrain.py --config train/configs/soco_small_cpu.yaml optim.base_lr=0.5 train.out=runs/x

Values are parsed as YAML (`3`, `1e-5`, `true`, `[1, 2]`, `null`). Overriding a key
the recipe does not have is an error (typos would otherwise be ignored silently);
prefix it with `+` to add a new key on purpose. A recipe may start from another with
`_base_: other.yaml` (path relative to the recipe). The resolved config is written
beside every checkpoint so a run can be reproduced and resumed from it alone."""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from common.io import atomic_write_text


class ConfigError(ValueError):
    pass


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found: pass an existing recipe, e.g. "
                          "--config train/configs/soco_small_cpu.yaml")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `_base_` chain loops back on itself ({' -> '.join(map(str, seen))})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, got {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    return _merge(_read_yaml(path.parent / base, seen + (path.resolve(),)), data)


def _flat_keys(cfg: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys += _flat_keys(v, prefix + k + ".")
    return keys


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_value(raw: str, item: str = "") -> Any:
    """YAML value, except that `1e-5` is a float (YAML 1.1 would keep it a string)."""
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
    return float(value) if isinstance(value, str) and _FLOAT.fullmatch(value) else value


def apply_override(cfg: dict, item: str) -> None:
    """Apply one `a.b.c=value` (or `+a.b.c=value` for a new key) in place."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.base_lr=0.5)")
    key, raw = item.split("=", 1)
    add = key.startswith("+")
    parts = key.lstrip("+").split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key part")
    node = cfg
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part not in node and not add:
            near = difflib.get_close_matches(".".join(parts), _flat_keys(cfg), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ConfigError(f"override {item!r}: unknown key {'.'.join(parts[:i + 1])!r}{hint} "
                              f"(prefix with + to add a new key)")
        if last:
            node[part] = parse_value(raw, item)
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is a value, not a section")


def load_config(path: str | Path, overrides: list[str] = ()) -> dict:
    cfg = _read_yaml(Path(path))
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def get(cfg: dict, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def save_config(cfg: dict, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))

"""Training configuration: one YAML recipe plus dotted `key=value` overrides, both checked
against the typed schema (train/schema.py and each method's `ModelConfig`).

    python train/pretrain.py --config train/configs/soco_small_cpu.yaml optim.base_lr=0.5 train.out=runs/x

Values are parsed as YAML (`3`, `1e-5`, `true`, `[1, 2]`, `null`). A key the schema does not
know is an error wherever it is written (recipe file or override), with a did-you-mean; a
value of the wrong type names the key and the expected type. An override may set any key of
the schema, present in the recipe or not (a leading `+` is accepted and ignored). A recipe may
start from another with `_base_: other.yaml` (path relative to the recipe). `load_config`
returns the resolved config: every section, every key, defaults filled; it is written beside
every checkpoint so a run can be reproduced and resumed from it alone."""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from common.io import atomic_write_text
from train.schema import SECTIONS, TOP_LEVEL, ConfigError, check_section

__all__ = ["ConfigError", "load_config", "resolve", "apply_override", "parse_value", "get", "save_config"]


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


def apply_override(cfg: dict, item: str) -> str:
    """Apply one `a.b.c=value` in place; returns the dotted key. Whether the key exists is
    the schema's call (`resolve`), so a key absent from the recipe can still be set."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.base_lr=0.5)")
    key, raw = item.split("=", 1)
    parts = key.lstrip("+").split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key part")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
    node[parts[-1]] = parse_value(raw, item)
    return ".".join(parts)


def _recipe_defaults(recipe: str) -> dict:
    from train.loader.recipes import recipe_class
    return recipe_class(recipe).DEFAULTS


def resolve(raw: dict, where: Any = "the config") -> dict:
    """The resolved config of a raw mapping: every section checked (unknown keys, types) and
    filled with defaults, `model` by the method's own `ModelConfig`, `data.options` against
    the recipe's parameters. `where` names the source in messages (string or key -> string)."""
    from train import methods
    src = where if callable(where) else (lambda _key: where)
    if not isinstance(raw, dict):
        raise ConfigError(f"{src('')}: a config must be a mapping of sections")
    for key in raw:
        if key not in TOP_LEVEL:
            near = difflib.get_close_matches(str(key), TOP_LEVEL, n=2, cutoff=0.5)
            hint = f"did you mean {', '.join(near)}?" if near else f"sections are {', '.join(TOP_LEVEL)}"
            raise ConfigError(f"{src(key)}: unknown section {key!r}; {hint}")
    name = raw.get("method")
    if not name:
        raise ConfigError(f"{src('method')}: the config has no `method` key (e.g. method: soco)")
    try:
        module = methods.get(name)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{src('method')}: {e}") from None
    out = {"method": name, "model": check_section(methods.model_schema(module), raw.get("model"), "model", where)}
    for key, cls in SECTIONS.items():
        out[key] = check_section(cls, raw.get(key), key, where)
    data, train = out["data"], out["train"]
    for key, value in (("data.batch_size", data["batch_size"]), ("train.accum_steps", train["accum_steps"]),
                       ("train.log_every", train["log_every"])):
        if value < 1:
            raise ConfigError(f"{src(key)}: {key}={value} must be >= 1")
    # the module's RECIPE when data.recipe is null: a variant's own recipe (Method.recipe) is
    # known once the method is built, and the trainer checks the options against it then
    check_recipe_options(data["recipe"] or module.RECIPE, data["options"], src)
    return out


def check_recipe_options(recipe: str, options: dict, where: Any = "the config") -> None:
    """Refuse (ConfigError) an unknown recipe or a `data.options` key that `recipe` does not
    take, naming the key and the near ones."""
    src = where if callable(where) else (lambda _key: where)
    try:
        known = _recipe_defaults(recipe)
    except ValueError as e:
        raise ConfigError(f"{src('data.recipe')}: {e}") from None
    for key in options or {}:
        if key not in known:
            near = difflib.get_close_matches(str(key), list(known), n=3)
            hint = f"; did you mean {', '.join('data.options.' + n for n in near)}?" if near else \
                f"; recipe {recipe!r} takes {', '.join(sorted(known))}"
            raise ConfigError(f"{src('data.options.' + key)}: unknown key 'data.options.{key}'{hint}")


def load_config(path: str | Path, overrides: list[str] = ()) -> dict:
    """The resolved config of a recipe file plus overrides (see the module docstring)."""
    path = Path(path)
    cfg = _read_yaml(path)
    set_by: dict[str, str] = {}
    for item in overrides:
        set_by[apply_override(cfg, item)] = item

    def where(key: str) -> str:
        for k, item in set_by.items():
            if key == k or key.startswith(k + ".") or k.startswith(key + "."):
                return f"override {item!r}"
        return f"config {path}"
    return resolve(cfg, where)


def get(cfg: dict, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def save_config(cfg: dict, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))

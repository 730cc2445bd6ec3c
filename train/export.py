"""Export pretrained weights for fine-tuning, in the formats the backbone family supports
(`backbone.export_formats`; `export.formats` picks a subset, null = all of them; asking a
family for a format it cannot honour is an error naming the ones it can, never a wrong file):

  backbone_torchvision.pth   (ResNet) torchvision ResNet state_dict (no `fc`: pretraining never
                             trains a classifier). Load with
                             `m = torchvision.models.resnet50(); m.fc = nn.Identity();
                             m.load_state_dict(sd)`.
  detectron2.pkl             (ResNet) backbone (+ FPN + 4conv1fc box head for SoCo FPN) renamed as
                             SoCo's converter does (methods.md 1.9), numpy arrays in
                             {"model", "__author__", "matching_heuristics": True}; use as
                             detectron2 MODEL.WEIGHTS.
  backbone_timm.pth          (ViT) the timm model's state_dict, with backbone_timm.json beside it
   + backbone_timm.json      ({"name", "kwargs"}): `m = timm.create_model(name, num_classes=0,
                             **kwargs); m.load_state_dict(sd)`.

    python -m train.export --checkpoint work/pretrain/soco_small/checkpoints/last.pt [--target]
"""
from __future__ import annotations

import argparse
import io
import json
import pickle
import re
import sys
from pathlib import Path

import torch
from torch import nn

from common.io import atomic_write_bytes, atomic_write_text

AUTHOR = "regionssl"


class ExportError(ValueError):
    """A format the backbone family does not support."""


def torchvision_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}


def detectron2_backbone_key(key: str) -> str:
    """torchvision ResNet name -> detectron2 ResNet name (stem., resN, convK.norm, shortcut)."""
    if not key.startswith("layer"):
        return "stem." + key.replace("bn1", "conv1.norm")
    key = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", key)
    key = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", key)
    return key.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")


def detectron2_fpn_key(key: str) -> str:
    """lateral_convs.i.{conv,bn} -> fpn_lateral{2+i}[.norm]; fpn_convs.i -> fpn_output{2+i}."""
    m = re.match(r"^(lateral_convs|fpn_convs)\.(\d+)\.(conv|bn)\.(.+)$", key)
    if not m:
        raise KeyError(f"unexpected FPN parameter {key!r}")
    kind, i, layer, rest = m.groups()
    name = f"fpn_{'lateral' if kind == 'lateral_convs' else 'output'}{2 + int(i)}"
    return f"{name}.{'norm.' if layer == 'bn' else ''}{rest}"


def detectron2_head_key(key: str) -> str:
    """4conv1fc head: bnK -> convK.norm, fc1 kept, prefix box_head."""
    return "box_head." + re.sub(r"^bn(\d)\.", r"conv\1.norm.", key)


def detectron2_state(modules: dict[str, nn.Module]) -> dict:
    """{name: numpy} for detectron2 from {"backbone": ..., "fpn"?: ..., "head"?: ...}."""
    mappers = {"backbone": detectron2_backbone_key, "fpn": detectron2_fpn_key, "head": detectron2_head_key}
    model = {}
    for part, module in modules.items():
        for k, v in module.state_dict().items():
            if k.endswith("num_batches_tracked"):
                continue  # a counter, not a weight; detectron2 does not use it
            model[mappers[part](k)] = v.detach().cpu().float().numpy()
    return {"model": model, "__author__": AUTHOR, "matching_heuristics": True}


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# the backbone weight file of each format (train/evaluate.py reads them back)
BACKBONE_FILES = {"torchvision": "backbone_torchvision.pth", "timm": "backbone_timm.pth"}


def _write_torchvision(modules: dict, out_dir: Path) -> Path:
    path = out_dir / BACKBONE_FILES["torchvision"]
    atomic_write_bytes(path, _torch_bytes(torchvision_state_dict(modules["backbone"])))
    return path


def _write_detectron2(modules: dict, out_dir: Path) -> Path:
    path = out_dir / "detectron2.pkl"
    atomic_write_bytes(path, pickle.dumps(detectron2_state(modules), protocol=4))
    return path


def _write_timm(modules: dict, out_dir: Path) -> Path:
    backbone = modules["backbone"]
    path = out_dir / BACKBONE_FILES["timm"]
    atomic_write_bytes(path, _torch_bytes(backbone.timm_state_dict()))
    atomic_write_text(out_dir / "backbone_timm.json", json.dumps(
        {"name": backbone.timm_name, "kwargs": backbone.timm_options, "num_classes": 0,
         "load": "timm.create_model(name, num_classes=0, **kwargs).load_state_dict(torch.load(pth))"}, indent=1))
    return path


WRITERS = {"torchvision": _write_torchvision, "detectron2": _write_detectron2, "timm": _write_timm}


def export_method(method, out_dir: str | Path, target: bool = False,
                  formats: list[str] | None = None, cfg: dict | None = None) -> dict[str, Path]:
    """Write `formats` (default: every format of the backbone's family) for a method's online
    (or EMA target) network; {format: path}. With the run's `cfg`, a detectron2 export also
    gets `detectron2_config.yaml` beside the pkl (train/detectron2_config.py): the config that
    fine-tunes exactly these weights."""
    out_dir = Path(out_dir)
    modules = method.export_modules(target=target) if target else method.export_modules()
    backbone = modules["backbone"]
    supported = tuple(getattr(backbone, "export_formats", ()))
    formats = list(supported if formats is None else formats)
    for fmt in formats:
        if fmt not in WRITERS:
            raise ExportError(f"unknown export format {fmt!r} (export.formats): known {sorted(WRITERS)}")
        if fmt not in supported:
            raise ExportError(f"a {getattr(backbone, 'family', type(backbone).__name__)} backbone cannot be "
                              f"exported as {fmt!r}: it supports {', '.join(supported) or 'nothing'} "
                              f"(set export.formats to a subset of those, or null for all)")
    paths = {fmt: WRITERS[fmt](modules, out_dir) for fmt in formats}
    if cfg is not None and "detectron2" in paths:
        from train.detectron2_config import write_detectron2_config
        paths["detectron2_config"] = write_detectron2_config(cfg, modules, out_dir)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoints/last.pt of train/pretrain.py")
    parser.add_argument("--out", help="output folder (default: <run>/exported)")
    parser.add_argument("--target", action="store_true", help="export the EMA target network instead")
    parser.add_argument("--formats", help="comma-separated subset of the backbone's formats (default: all)")
    args = parser.parse_args(argv)
    from train import checkpoint
    from train.methods import build_method
    ckpt = Path(args.checkpoint)
    config = ckpt.parent / "config.yaml"
    if not config.is_file():
        parser.error(f"{config} not found: export needs the config.yaml saved beside the checkpoint")
    from train.config import load_config
    cfg = load_config(config)
    _, method = build_method(cfg)
    method.load_state_dict(checkpoint.load(ckpt)["model"])
    formats = args.formats.split(",") if args.formats else cfg["export"]["formats"]
    try:
        paths = export_method(method, Path(args.out) if args.out else ckpt.parent.parent / "exported", args.target,
                              formats, cfg=cfg)
    except NotImplementedError as e:   # --target on a method without a target network
        parser.error(f"--target: {e}; drop --target")
    for kind, p in paths.items():
        print(f"[export] {kind}: {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

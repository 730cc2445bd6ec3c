"""Export pretrained weights for fine-tuning:

  backbone_torchvision.pth   torchvision ResNet state_dict (no `fc`: pretraining never
                             trains a classifier). Load with
                             `m = torchvision.models.resnet50(); m.fc = nn.Identity();
                             m.load_state_dict(sd)`.
  detectron2.pkl             backbone (+ FPN + 4conv1fc box head for SoCo FPN) renamed as
                             SoCo's converter does (methods.md 1.9), numpy arrays in
                             {"model", "__author__", "matching_heuristics": True}; use as
                             detectron2 MODEL.WEIGHTS.

    python -m train.export --checkpoint work/pretrain/soco_small/checkpoints/last.pt [--target]
"""
from __future__ import annotations

import argparse
import io
import pickle
import re
import sys
from pathlib import Path

import torch
from torch import nn

from common.io import atomic_write_bytes

AUTHOR = "regionssl"


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


def export_method(method, out_dir: str | Path, target: bool = False) -> dict[str, Path]:
    """Write both formats for a method's online (or EMA target) network."""
    out_dir = Path(out_dir)
    modules = method.export_modules(target=target) if target else method.export_modules()
    buf = io.BytesIO()
    torch.save(torchvision_state_dict(modules["backbone"]), buf)
    paths = {"torchvision": out_dir / "backbone_torchvision.pth", "detectron2": out_dir / "detectron2.pkl"}
    atomic_write_bytes(paths["torchvision"], buf.getvalue())
    atomic_write_bytes(paths["detectron2"], pickle.dumps(detectron2_state(modules), protocol=4))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoints/last.pt of train/pretrain.py")
    parser.add_argument("--out", help="output folder (default: <run>/exported)")
    parser.add_argument("--target", action="store_true", help="export the EMA target network instead")
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
    paths = export_method(method, Path(args.out) if args.out else ckpt.parent.parent / "exported", args.target)
    for kind, p in paths.items():
        print(f"[export] {kind}: {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The detectron2 config that fine-tunes an exported backbone, written beside detectron2.pkl.

    write_detectron2_config(cfg, modules, out_dir) -> out_dir/detectron2_config.yaml

`modules` is `Method.export_modules(...)` ({"backbone", "fpn"?, "head"?}: the same dict
train/export.py renames into detectron2.pkl). Two layouts, as the papers fine-tune:
  - with an FPN (SoCo FPN, methods.md 1.9): Mask R-CNN R-FPN, SyncBN in backbone, FPN,
    4conv1fc box head and mask head, the pretrained FPN and box head loaded too;
  - otherwise C4 (SoCo C4, and MoCo-style for MoCo v2, MaskCo, DetCon): Mask R-CNN R-C4
    with SyncBN and MoCo's `Res5ROIHeadsExtraNorm` (register it from MoCo's
    detection/train_net.py, or set ROI_HEADS.NAME: Res5ROIHeads with vanilla detectron2).
Both: RGB input with ImageNet mean/std in 0-255 pixels, STRIDE_IN_1X1 false (torchvision
ResNets stride in the 3x3), FREEZE_AT 0, PRECISE_BN, the COCO 1x schedule (90k iterations,
16 images, lr 0.02, steps 60k/80k), weight decay 2.5e-5 (SoCo) or 1e-4 (MoCo style).
Channel counts come from the weights, so a narrow CPU network gets a config that matches.

Fine-tune (detectron2 installed, COCO registered as coco_2017_train/val):
    python tools/train_net.py --num-gpus 8 --config-file <run>/exported/detectron2_config.yaml
"""
from __future__ import annotations

from pathlib import Path

import yaml
from torch import nn

from common.io import atomic_write_text

FILE = "detectron2_config.yaml"
PIXEL_MEAN = [123.675, 116.28, 103.53]   # ImageNet mean/std in RGB 0-255 (the loader's, x255)
PIXEL_STD = [58.395, 57.12, 57.375]
DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}


def _out_channels(module: nn.Module, name: str) -> int:
    return int(dict(module.named_parameters())[name].shape[0])


def detectron2_config(cfg: dict, modules: dict[str, nn.Module], weights: str = "detectron2.pkl") -> dict:
    """The config as a nested dict (see the module docstring)."""
    arch = (cfg.get("model") or {}).get("backbone", "resnet50")
    if arch not in DEPTHS:
        raise ValueError(f"no detectron2 ResNet for backbone {arch!r}: known {sorted(DEPTHS)}")
    depth = DEPTHS[arch]
    backbone = modules["backbone"]
    stem = _out_channels(backbone, "conv1.weight")
    res2 = int(backbone.feature_info[0]["channels"])
    resnets = dict(DEPTH=depth, NORM="SyncBN", STRIDE_IN_1X1=False, STEM_OUT_CHANNELS=stem,
                   RES2_OUT_CHANNELS=res2, NUM_GROUPS=1,
                   WIDTH_PER_GROUP=res2 // 4 if depth >= 50 else res2)
    model = dict(META_ARCHITECTURE="GeneralizedRCNN", WEIGHTS=str(weights), MASK_ON=True,
                 PIXEL_MEAN=PIXEL_MEAN, PIXEL_STD=PIXEL_STD, BACKBONE=dict(FREEZE_AT=0))
    fpn = "fpn" in modules
    if fpn:
        fpn_out = _out_channels(modules["fpn"], "lateral_convs.0.conv.weight")
        head = modules.get("head")
        levels = ["res2", "res3", "res4", "res5"]
        model["BACKBONE"]["NAME"] = "build_resnet_fpn_backbone"
        model["RESNETS"] = dict(resnets, OUT_FEATURES=levels)
        model["FPN"] = dict(IN_FEATURES=levels, OUT_CHANNELS=fpn_out, NORM="SyncBN")
        model["ANCHOR_GENERATOR"] = dict(SIZES=[[32], [64], [128], [256], [512]], ASPECT_RATIOS=[[0.5, 1.0, 2.0]])
        model["RPN"] = dict(IN_FEATURES=["p2", "p3", "p4", "p5", "p6"], PRE_NMS_TOPK_TRAIN=2000,
                            PRE_NMS_TOPK_TEST=1000, POST_NMS_TOPK_TRAIN=1000, POST_NMS_TOPK_TEST=1000)
        model["ROI_HEADS"] = dict(NAME="StandardROIHeads", IN_FEATURES=["p2", "p3", "p4", "p5"])
        box = dict(NAME="FastRCNNConvFCHead", NUM_CONV=4, NUM_FC=1, NORM="SyncBN", POOLER_RESOLUTION=7,
                   CONV_DIM=fpn_out, FC_DIM=1024)
        if head is not None:  # the pretrained 4conv1fc head sets the sizes
            convs = sorted(n for n, _ in head.named_children() if n.startswith("conv"))
            box.update(NUM_CONV=len(convs), CONV_DIM=_out_channels(head, "conv1.weight"),
                       FC_DIM=_out_channels(head, "fc1.weight"))
        model["ROI_BOX_HEAD"] = box
        model["ROI_MASK_HEAD"] = dict(NAME="MaskRCNNConvUpsampleHead", NUM_CONV=4, POOLER_RESOLUTION=14,
                                      NORM="SyncBN", CONV_DIM=fpn_out)
        weight_decay = 2.5e-5
    else:
        model["BACKBONE"]["NAME"] = "build_resnet_backbone"
        model["RESNETS"] = dict(resnets, OUT_FEATURES=["res4"])
        model["RPN"] = dict(IN_FEATURES=["res4"], PRE_NMS_TOPK_TEST=6000, POST_NMS_TOPK_TEST=1000)
        model["ROI_HEADS"] = dict(NAME="Res5ROIHeadsExtraNorm", IN_FEATURES=["res4"])
        model["ROI_BOX_HEAD"] = dict(POOLER_RESOLUTION=14)
        model["ROI_MASK_HEAD"] = dict(NORM="SyncBN")
        weight_decay = 2.5e-5 if cfg.get("method") == "soco" else 1e-4
    return dict(
        MODEL=model,
        DATASETS=dict(TRAIN=["coco_2017_train"], TEST=["coco_2017_val"]),
        SOLVER=dict(IMS_PER_BATCH=16, BASE_LR=0.02, STEPS=[60000, 80000], MAX_ITER=90000,
                    WEIGHT_DECAY=weight_decay, WARMUP_ITERS=1000),
        INPUT=dict(FORMAT="RGB", MIN_SIZE_TRAIN=list(range(640, 801, 32)), MIN_SIZE_TRAIN_SAMPLING="choice",
                   MIN_SIZE_TEST=800, MAX_SIZE_TRAIN=1333, MAX_SIZE_TEST=1333),
        TEST=dict(PRECISE_BN=dict(ENABLED=True), EVAL_PERIOD=0),
        VERSION=2,
    )


def write_detectron2_config(cfg: dict, modules: dict[str, nn.Module], out_dir) -> Path:
    """Write out_dir/detectron2_config.yaml (MODEL.WEIGHTS = the detectron2.pkl beside it)."""
    out_dir = Path(out_dir)
    doc = detectron2_config(cfg, modules, weights=str((out_dir / "detectron2.pkl").resolve()))
    head = ("# detectron2 fine-tuning config written by regionssl (train/detectron2_config.py)\n"
            f"# method {cfg.get('method')}, {'R-FPN' if 'fpn' in modules else 'R-C4'}; run:\n"
            f"#   python tools/train_net.py --num-gpus 8 --config-file {out_dir.resolve() / FILE}\n")
    if "fpn" not in modules:
        head += ("# Res5ROIHeadsExtraNorm is MoCo's (detection/train_net.py); with vanilla detectron2 "
                 "set MODEL.ROI_HEADS.NAME Res5ROIHeads\n")
    path = out_dir / FILE
    atomic_write_text(path, head + yaml.safe_dump(doc, sort_keys=False))
    return path

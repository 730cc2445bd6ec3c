"""One backbone registry for every method. A backbone, whatever its family, offers:

  feature_info               [{name, channels, stride}] shallow to deep (ResNet: res2..res5,
                             strides 4..32; ViT: one entry "tokens", channels D, stride = patch)
  forward_features(x)        {name: NCHW map} as in feature_info (a ViT adds "cls": [B, D])
  backbone(x)                [B, D] pooled features (ResNet: global average; ViT: the CLS token)
  out_channels               channels per feature_info entry (shallow to deep)
  no_weight_decay()          parameter names (relative to the backbone) that take no weight decay
  family                     "resnet" | "vit"
  export_formats             the formats train/export.py may write for it (ResNet: torchvision,
                             detectron2; ViT: timm); any other format is refused by name

Families by name: resnet18/34/50/101 (train/models/backbone.py, `width` scales them) and any
timm ViT name `vit_*` (train/models/vit.py, options in `model.backbone_options`, random weights:
pretrained is never downloaded)."""
from __future__ import annotations

import torch
from torch import nn

from train.models.backbone import ARCHS, build_backbone

BACKBONE_KEYS = ("backbone", "width", "zero_init_residual", "backbone_options")   # train.schema.BackboneFields
FAMILIES = {"resnet": f"{', '.join(sorted(ARCHS))}", "vit": "vit_* (timm names, e.g. vit_tiny_patch16_224)"}


def family_of(name: str) -> str:
    if name in ARCHS:
        return "resnet"
    if isinstance(name, str) and name.startswith("vit_"):
        return "vit"
    raise ValueError(f"unknown backbone {name!r}: choose one of "
                     f"{'; '.join(f'{f}: {n}' for f, n in FAMILIES.items())} (set model.backbone in the config)")


def create_backbone(name: str, width: int = 64, zero_init_residual: bool = True,
                    options: dict | None = None) -> nn.Module:
    """A backbone by name with random weights. `width` and `zero_init_residual` apply to the
    ResNet family; `options` are family-specific (ViT: timm.create_model keyword arguments such
    as img_size, patch_size, embed_dim, depth, num_heads)."""
    options = dict(options or {})
    family = family_of(name)
    if family == "resnet":
        if options:
            raise ValueError(f"model.backbone_options {sorted(options)} do not apply to {name}: ResNets take "
                             "model.width and model.zero_init_residual")
        return build_backbone(name, width=width, zero_init_residual=zero_init_residual)
    if width != 64:
        raise ValueError(f"model.width={width} scales ResNets only; size a ViT with model.backbone_options "
                         "(embed_dim, depth, num_heads, patch_size, img_size)")
    from train.models.vit import ViT
    return ViT(name, **options)


def backbone_from_options(opts: dict) -> nn.Module:
    """Pop the backbone keys (BACKBONE_KEYS) from a method's resolved `model:` options and
    build the backbone; the rest stays in `opts` for the method."""
    name = opts.pop("backbone")
    return create_backbone(name, width=opts.pop("width"), zero_init_residual=opts.pop("zero_init_residual"),
                           options=opts.pop("backbone_options"))


def deepest_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The deepest NCHW feature map of any backbone (ResNet: C5; ViT: the token grid)."""
    return backbone.forward_features(x)[backbone.feature_info[-1]["name"]]

"""Vision Transformers through timm (pinned in requirements.txt), behind the backbone protocol
of train/models/registry.py. `self.vit` is exactly `timm.create_model(name, num_classes=0,
**options)`, so its state_dict is the export (train/export.py writes it with the name and
options beside it). Weights are random: pretrained weights are never downloaded."""
from __future__ import annotations

import torch
from torch import nn


class ViT(nn.Module):
    family = "vit"
    export_formats = ("timm",)

    def __init__(self, name: str, **options):
        super().__init__()
        import timm
        if options.pop("pretrained", False):
            raise ValueError("model.backbone_options.pretrained: pretraining starts from random weights here")
        self.timm_name, self.timm_options = name, dict(options)
        try:
            self.vit = timm.create_model(name, pretrained=False, num_classes=0, **options)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"timm cannot build {name!r} with model.backbone_options {options}: {e}") from None
        self.patch = int(self.vit.patch_embed.patch_size[0])
        self.out_channels = [int(self.vit.embed_dim)]
        self.strides = [self.patch]

    @property
    def feature_info(self) -> list[dict]:
        return [dict(name="tokens", channels=self.out_channels[0], stride=self.patch)]

    @property
    def embedding_info(self) -> list[dict]:
        """Outputs of `forward_features` that are one vector an image, not a map: the CLS
        embedding (what `self(x)` returns). The eval probes it like a level, at image and crop
        scope (a box has no CLS of its own, so it has no object-scope feature)."""
        return [dict(name="cls", channels=self.out_channels[0])]

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS [B, D], token grid [B, D, H/patch, W/patch]) after the final norm."""
        t = self.vit.forward_features(x)
        n = self.vit.num_prefix_tokens
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        grid = t[:, n:].transpose(1, 2).reshape(t.shape[0], t.shape[-1], h, w)
        return t[:, 0], grid

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cls, grid = self.tokens(x)
        return {"tokens": grid, "cls": cls}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[0]

    def no_weight_decay(self) -> set[str]:
        """timm's no-decay tokens (pos_embed, cls_token, ...) plus every norm and bias (1-D)."""
        tokens = set(self.vit.no_weight_decay())
        return {f"vit.{n}" for n, p in self.vit.named_parameters() if n in tokens or p.ndim <= 1}

    def load_timm_state_dict(self, state: dict, strict: bool = False):
        """Load an export written by `timm_state_dict` (train/evaluate.py reads exports back)."""
        return self.vit.load_state_dict(state, strict=strict)

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.vit.state_dict().items()}

"""Feature pyramid (P2..P5 from C2..C5), mmdet-style as SoCo uses it: 1x1 lateral conv
+ BN, nearest top-down upsampling, 3x3 output conv + BN, no activation, no P6.
Module names (lateral_convs.i.conv/bn, fpn_convs.i.conv/bn) are what the detectron2
export maps to fpn_lateral{2+i}/fpn_output{2+i} (methods.md 1.9)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: int = 256):
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvBN(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvBN(out_channels, out_channels, 3) for _ in in_channels)
        self.out_channels = out_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=True)]

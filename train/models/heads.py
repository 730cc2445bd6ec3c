"""Heads shared by the methods: BYOL-style MLP projector/predictor and the 4conv1fc
R-CNN box head (detectron2's FastRCNNConvFCHead with BN, as SoCo uses)."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Sequential):
    """Linear -> BN1d -> ReLU -> Linear (SoCo/BYOL projector and predictor).
    `bn=False` gives MoCo v2's Linear -> ReLU -> Linear."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, bn: bool = True):
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
        if bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
        super().__init__(*layers)


class ConvFCHead(nn.Module):
    """`num_conv` x [conv3x3 no bias, BN, ReLU] -> flatten -> fc1 -> ReLU.

    Names (conv1..4, bn1..4, fc1) follow SoCo's head so the detectron2 export maps
    bnK -> convK.norm and keeps fc1 (methods.md 1.9)."""

    def __init__(self, in_channels: int, conv_channels: int = 256, fc_dim: int = 1024,
                 num_conv: int = 4, roi_size: int = 7):
        super().__init__()
        self.num_conv = num_conv
        c = in_channels
        for k in range(1, num_conv + 1):
            setattr(self, f"conv{k}", nn.Conv2d(c, conv_channels, 3, padding=1, bias=False))
            setattr(self, f"bn{k}", nn.BatchNorm2d(conv_channels))
            c = conv_channels
        self.fc1 = nn.Linear(c * roi_size * roi_size, fc_dim)
        self.out_dim = fc_dim
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(1, self.num_conv + 1):
            x = torch.relu(getattr(self, f"bn{k}")(getattr(self, f"conv{k}")(x)))
        return torch.relu(self.fc1(torch.flatten(x, 1)))

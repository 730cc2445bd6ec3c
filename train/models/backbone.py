"""ResNet backbones in torchvision's layout, so an exported state_dict loads into
`torchvision.models.resnetXX()` unchanged, plus narrow variants for CPU runs.

`width=64` gives exactly torchvision's network; a smaller `width` scales every stage
(stem width, then 1x, 2x, 4x, 8x) so tests and `make demo` stay cheap. The classifier
`fc` is replaced by Identity: pretraining never trains it, and shipping a random fc
would look like a trained one."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet as tvr

ARCHS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (tvr.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tvr.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (tvr.Bottleneck, [3, 4, 6, 3]),
    "resnet101": (tvr.Bottleneck, [3, 4, 23, 3]),
}


class ResNet(tvr.ResNet):
    """torchvision's ResNet with a configurable base width; same module names, same
    `_make_layer` and block classes (inherited), so keys match torchvision. Implements the
    backbone protocol of train/models/registry.py."""

    family = "resnet"
    export_formats = ("torchvision", "detectron2")

    def __init__(self, block, layers, width: int = 64,
                 norm_layer: Callable[[int], nn.Module] | None = None,
                 zero_init_residual: bool = True):
        nn.Module.__init__(self)
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.out_channels = [width * m * block.expansion for m in (1, 2, 4, 8)]
        self.strides = [4, 8, 16, 32]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He-normal, as SoCo and torchvision do
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # last BN gamma of each residual block starts at 0 (SoCo 1.5)
            for m in self.modules():
                if isinstance(m, tvr.Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, tvr.BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def features(self, x: torch.Tensor, upto: int = 5) -> list[torch.Tensor]:
        """C2..C`upto` feature maps (strides 4, 8, 16, 32)."""
        x = self.stem(x)
        out = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4)[: upto - 1]:
            x = layer(x)
            out.append(x)
        return out

    @property
    def feature_info(self) -> list[dict]:
        """One entry per feature map of `forward_features`, shallow to deep: name, channels,
        stride (timm's `feature_info` idea: callers never ask which family they hold)."""
        return [dict(name=f"res{i + 2}", channels=c, stride=s)
                for i, (c, s) in enumerate(zip(self.out_channels, self.strides))]

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"res2": C2, ..., "res5": C5} feature maps (NCHW), names as in `feature_info`."""
        return {info["name"]: f for info, f in zip(self.feature_info, self.features(x))}

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay by name (none for a ResNet: its
        norms and biases are 1-D, which the methods' groups already exempt)."""
        return set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (the `fc` input of torchvision's classifier)."""
        return torch.flatten(self.avgpool(self.features(x)[-1]), 1)


def build_backbone(name: str, width: int = 64, zero_init_residual: bool = True,
                   norm_layer: Callable[[int], nn.Module] | None = None) -> ResNet:
    """`name` in ARCHS; `width` 64 is the standard network, 8..32 are CPU-sized."""
    if name not in ARCHS:
        raise ValueError(f"unknown backbone {name!r}: choose one of {sorted(ARCHS)} "
                         "(set model.backbone in the config)")
    if width < 1:
        raise ValueError(f"backbone width must be >= 1, got {width} (model.width)")
    block, layers = ARCHS[name]
    return ResNet(block, layers, width=width, norm_layer=norm_layer,
                  zero_init_residual=zero_init_residual)

"""Networks shared by the pretraining methods: the backbone registry (ResNet family in
torchvision's layout, ViT through timm) behind one protocol, FPN, R-CNN head, MLPs.
See train/models/registry.py for the protocol."""
from train.models.registry import (BACKBONE_KEYS, backbone_from_options, create_backbone, deepest_map,
                                   family_of)

__all__ = ["BACKBONE_KEYS", "backbone_from_options", "create_backbone", "deepest_map", "family_of"]

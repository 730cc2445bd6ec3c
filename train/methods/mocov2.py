"""MoCo v2 (Chen et al. 2020), the image-level baseline the region methods compare
against (methods.md 6): query encoder + MLP head, momentum key encoder (m = 0.999,
constant), a FIFO queue of 65536 keys as negatives, InfoNCE at temperature 0.2,
SGD lr 0.03 momentum 0.9 weight decay 1e-4 with a cosine schedule.

Shuffled BN (keys shuffled across ranks before the key encoder so BN statistics
cannot leak the positive) needs several CUDA ranks; on CPU/gloo or one rank it is
skipped and the run says so once."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from train.distributed import all_gather_with_grad
from train.loader.recipes import Plan, Recipe, ViewSpec, two_crops
from train.methods import MomentumEncoderMethod, build_on_backbone, make_target
from train.models.heads import MLP
from train.schema import BackboneFields

RECIPE = "mocov2"
VIEWS = ("query", "key")


class MoCoV2Recipe(Recipe):
    """Two aug-plus views (methods.md 6): random-resized crops at scale 0.2-1, MoCo colour."""
    name = "mocov2"
    DEFAULTS = dict(size=224, scale=(0.2, 1.0), colour=True)

    def view_specs(self) -> list[ViewSpec]:
        return [ViewSpec(v, self.cfg["size"], "moco") for v in VIEWS]

    def plan(self, W, H, boxes, draw, rng) -> Plan:
        return two_crops(self, W, H, draw, VIEWS)


class KeyQueue(nn.Module):
    """MoCo's dictionary: a ring buffer of the `size` most recent keys.

    Keys enter at `ptr` and the oldest are overwritten first; a batch that runs past
    the end wraps to the start (the original asserts size % batch == 0 instead).
    Stored as buffers so checkpoints carry it and resume continues the same queue."""

    def __init__(self, dim: int, size: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size} (model.queue_size)")
        self.size = size
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        n = len(keys)
        skip = max(n - self.size, 0)                   # a batch larger than the queue keeps its newest
        slots = (self.ptr + skip + torch.arange(n - skip, device=keys.device)) % self.size
        self.keys[slots] = keys.detach()[skip:].to(self.keys.dtype)
        self.ptr.copy_((self.ptr + n) % self.size)

    def oldest_first(self) -> torch.Tensor:
        """The queue in dequeue order (next to be overwritten first)."""
        return torch.roll(self.keys, -int(self.ptr), dims=0)


def infonce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo loss: logits [q.k+, q.negatives] / T, label 0. q, k [N,D]; negatives [K,D].
    Returns (loss, top-1 accuracy of the positive)."""
    with torch.autocast(q.device.type, enabled=False):
        q, k, negatives = q.float(), k.float(), negatives.float()
        l_pos = (q * k).sum(dim=1, keepdim=True)
        logits = torch.cat([l_pos, q @ negatives.t()], dim=1) / temperature
        labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels), (logits.argmax(dim=1) == 0).float().mean()


# --- across ranks ------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


@torch.no_grad()
def shuffle_across_ranks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give each rank a random slice of the global batch (permutation from rank 0)
    so the key encoder's BN statistics mix images from every rank. Returns the
    local shuffled batch and the inverse permutation for `unshuffle_across_ranks`."""
    rank, world = _world()
    x_all = all_gather_with_grad(x)
    perm = torch.randperm(len(x_all), device=x.device)
    dist.broadcast(perm, src=0)
    return x_all[perm.view(world, -1)[rank]], torch.argsort(perm)


@torch.no_grad()
def unshuffle_across_ranks(y: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    rank, world = _world()
    return all_gather_with_grad(y)[inverse.view(world, -1)[rank]]


def shuffle_bn_mode(setting: str | bool, device: torch.device) -> bool:
    """Whether to shuffle BN: `auto` = several ranks on CUDA (where MoCo needs it);
    `true` forces it (tests exercise it on gloo), `false` skips it."""
    _, world = _world()
    if setting in (True, "true", "on"):
        return world > 1
    if setting in (False, "false", "off"):
        return False
    if setting != "auto":
        raise ValueError(f"model.shuffle_bn must be auto, true or false, got {setting!r}")
    return world > 1 and device.type == "cuda"


# --- the method --------------------------------------------------------------------------
@dataclass
class ModelConfig(BackboneFields):
    zero_init_residual: bool = False
    dim: int = 128
    hidden_dim: int | None = None        # null = backbone channels
    queue_size: int = 65536
    momentum: float = 0.999
    temperature: float = 0.2
    shuffle_bn: str | bool = "auto"      # auto | true | false


class MoCoV2(MomentumEncoderMethod):
    optimizer = "sgd"
    sync_bn = False   # per-rank BN with shuffled keys, as MoCo; SyncBN would make the shuffle moot

    def __init__(self, backbone: nn.Module, dim: int, hidden_dim: int | None, queue_size: int,
                 momentum: float, temperature: float, shuffle_bn: str | bool):
        super().__init__()
        channels = backbone.feature_info[-1]["channels"]
        self.backbone = backbone
        self.head = MLP(channels, hidden_dim or channels, dim, bn=False)       # fc-ReLU-fc, no BN
        self.key_backbone, self.key_head = make_target(backbone), make_target(self.head)
        self.queue = KeyQueue(dim, queue_size)
        self.momentum, self.temperature, self.shuffle_bn = momentum, temperature, shuffle_bn
        self._said_shuffle = False


    def _keys(self, images: torch.Tensor) -> torch.Tensor:
        shuffle = shuffle_bn_mode(self.shuffle_bn, images.device)
        if not self._said_shuffle:
            self._said_shuffle = True
            if not shuffle and _world()[1] > 1 and _world()[0] == 0:
                print("[mocov2] shuffled BN off (needs several CUDA ranks; set model.shuffle_bn=true "
                      "to force it): key BN statistics come from each rank's own batch", flush=True)
        with torch.no_grad():
            if shuffle:
                images, inverse = shuffle_across_ranks(images)
            k = F.normalize(self.key_head(self.key_backbone(images)), dim=1)
            return unshuffle_across_ranks(k, inverse) if shuffle else k

    def forward(self, batch: dict) -> dict:
        q = F.normalize(self.head(self.backbone(batch[VIEWS[0]])), dim=1)
        k = self._keys(batch[VIEWS[1]])
        loss, acc = infonce(q, k, self.queue.keys.clone(), self.temperature)
        with torch.no_grad():
            self.queue.enqueue(all_gather_with_grad(k))
        return dict(loss=loss, acc=acc.item())



def build(cfg: dict) -> MoCoV2:
    """Options live under `model:` (ModelConfig: the backbone keys plus MoCo v2's)."""
    return build_on_backbone(MoCoV2, cfg, ModelConfig, "mocov2")

"""ccMIM (Zhang, Zhu, Zhao, Yan, ICLR 2023; methods.md 5, from the official code): masked image
modelling on a ViT where the masked patches are the ones the CLS token attends to most, the
visible rest reconstructs them MAE-style, and the CLS of the visible set is aligned with the
CLS of the masked set.

One step, for images [B, 3, H, W] with L = (H/p)(W/p) patches:
  1. Importance (`cls_attention`, no gradient): CLS + all L patches (fixed 2-D sin-cos
     position embedding added) through every encoder block; each block's CLS-to-patch attention
     averaged over heads, summed over blocks: a[b, l].
  2. Scores s = softmax_l(a) / softmax_l(u), u ~ U(0, 1) per patch (`model.masking: attention`),
     or s = u (`random`: MAE's masking, the ablation). Sorted ascending (`split_patches`): the
     lowest int(L (1 - r)) are visible, the rest (the most attended) masked; r = 0.75.
  3. Encoder on CLS + visible patches and on CLS + masked patches (same weights); each CLS taken
     after the final LayerNorm.
  4. Alignment (`alignment_loss`): projector Linear(D, D, no bias) -> BN -> ReLU ->
     Linear(D, 256, no bias) -> BN(affine=False) on both CLS, L2-normalised; InfoNCE of the
     visible CLS (queries) against the masked CLS of every rank (keys, gathered without
     gradient), labels = this rank's rows, T = 0.5, times 2T.
  5. Reconstruction: MAE decoder on the visible branch's tokens, MSE on the masked patches'
     normalised pixels (train/models/mae.py). Loss = 0.1 L_align + L_rec.

Because the keys reach the loss only through a gradient-free gather (as in the official code),
no gradient ever reaches the masked-branch encoder pass; it runs under no_grad here, which gives
the same gradients without keeping its activations. The projector's BN uses per-rank batch
statistics (the official code does not convert it to SyncBN): `sync_bn = False`.

Weights start from MAE's initialisation (xavier-uniform Linear, CLS and mask token N(0, 0.02));
the encoder's `pos_embed` holds the sin-cos table and is frozen, so the timm export carries it.
Weight decay: none on 1-D parameters, the position and CLS tokens (timm's `no_weight_decay`) and
the decoder's mask token; the official code (MAE's add_weight_decay) skips only 1-D parameters
and biases, so it does decay its 3-D CLS and mask tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from train.distributed import all_gather_with_grad
from train.loader import geometry as G
from train.loader.recipes import Plan, Recipe, ViewSpec
from train.methods import Method, build_on_backbone
from train.models.mae import MAEDecoder, mae_init_, patchify, reconstruction_loss, sincos_2d
from train.schema import BackboneFields

RECIPE = "ccmim"
VIEW = "image"


class CCMIMRecipe(Recipe):
    """One view: RandomResizedCrop `size` at `scale` (0.2, 1) of the area, aspect 3/4-4/3,
    bicubic, horizontal flip with probability 0.5; no colour augmentation (methods.md 5).
    `colour: true` adds MoCo v2's colour jitter (not in the paper)."""
    name = "ccmim"
    DEFAULTS = dict(size=224, scale=(0.2, 1.0), colour=False)

    def view_specs(self) -> list[ViewSpec]:
        return [ViewSpec(VIEW, self.cfg["size"], "moco", "cubic")]

    def plan(self, W, H, boxes, draw, rng) -> Plan:
        s = self.cfg["size"]
        return Plan({VIEW: G.View(*draw.crop(W, H, self.cfg["scale"]), s, s, draw.coin(0.5))})


# --- the pieces, as functions (tests check each against a direct computation) -------------
@torch.no_grad()
def cls_attention(vit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """a [B, L] float32: the CLS row of each block's attention (softmax over CLS + patches),
    averaged over heads, its patch columns summed over blocks. `tokens` [B, 1+L, D] (CLS first,
    position embedding added) runs through `vit.norm_pre` and every block of a timm ViT, which
    keeps its fused attention; the CLS row is recomputed from each block's qkv output (caught by
    a hook): softmax(scale q_cls k^T), q and k through the block's q_norm / k_norm as timm does."""
    B, N, _ = tokens.shape
    total = torch.zeros(B, N - 1, device=tokens.device, dtype=torch.float32)
    attns = [block.attn for block in vit.blocks]
    needed = ("qkv", "q_norm", "k_norm", "num_heads", "head_dim", "scale")
    if not all(hasattr(a, n) for a in attns for n in needed):
        raise TypeError("ccMIM reads the CLS attention from timm's Attention (qkv, q_norm, k_norm, num_heads, "
                        "head_dim, scale); this ViT's blocks lack some: use the pinned timm (requirements.txt)")

    def hook(attn: nn.Module):
        def add(_module, _inputs, qkv):
            nonlocal total
            qkv = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim)
            q = attn.q_norm(qkv[:, :1, 0].transpose(1, 2))           # [B, H, 1, hd]: the CLS query
            k = attn.k_norm(qkv[:, :, 1].transpose(1, 2))            # [B, H, N, hd]
            prob = ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)
            total = total + prob[:, :, 0, 1:].mean(dim=1)
        return add

    hooks = [a.qkv.register_forward_hook(hook(a)) for a in attns]
    try:
        x = vit.norm_pre(tokens)
        for block in vit.blocks:
            x = block(x)
    finally:
        for h in hooks:
            h.remove()
    return total


def importance_scores(attention: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """s = softmax(a) / softmax(u) over the patches of each image."""
    return F.softmax(attention.float(), dim=1) / F.softmax(noise.float(), dim=1)


def split_patches(scores: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort each row of `scores` [B, L] ascending: the first int(L (1 - ratio)) patches are
    visible, the others masked. Returns (ids_visible [B, K], ids_masked [B, L-K], mask [B, L]
    with 1 = masked, ids_restore [B, L]: each grid position's place in the visible-first order)."""
    B, L = scores.shape
    keep = int(L * (1 - ratio))
    if not 0 < keep < L:
        raise ValueError(f"model.mask_ratio={ratio} leaves {keep} of {L} patches visible: "
                         "choose a ratio that keeps at least one patch visible and one masked")
    order = torch.argsort(scores, dim=1, stable=True)
    ids_restore = torch.argsort(order, dim=1)
    mask = (ids_restore >= keep).to(scores.dtype)
    return order[:, :keep], order[:, keep:], mask, ids_restore


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def alignment_loss(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of this rank's L2-normalised queries [N, C] against the keys of every rank
    (gathered in rank order, without gradient), the positive of row i being this rank's key i:
    CE(q k_all^T / T, i + rank N) x 2T. Returns (loss, top-1 accuracy). At least float32."""
    rank, _ = _world()
    dtype = torch.promote_types(queries.dtype, torch.float32)
    with torch.autocast(queries.device.type, enabled=False):
        q = queries.to(dtype)
        with torch.no_grad():
            k = all_gather_with_grad(keys.detach().to(dtype).contiguous())
        logits = q @ k.t() / temperature
        labels = torch.arange(len(q), device=q.device) + rank * len(q)
        loss = F.cross_entropy(logits, labels) * (2 * temperature)
        return loss, (logits.argmax(dim=1) == labels).float().mean()


def projector(dim: int, out: int) -> nn.Sequential:
    """Linear(D, D, no bias) -> BN -> ReLU -> Linear(D, out, no bias) -> BN(affine=False)."""
    return nn.Sequential(nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, out, bias=False), nn.BatchNorm1d(out, affine=False))


# --- the method ------------------------------------------------------------------------------
@dataclass
class ModelConfig(BackboneFields):
    backbone: str = "vit_base_patch16_224"
    masking: Literal["attention", "random"] = "attention"    # random = MAE (the ablation)
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    proj_dim: int = 256
    temperature: float = 0.5
    align_weight: float = 0.1                                 # 0 = MAE's loss only


class CCMIM(Method):
    optimizer = "adamw"
    sync_bn = False   # the projector's BN keeps per-rank statistics, as the official code

    def __init__(self, backbone: nn.Module, masking: str, mask_ratio: float, decoder_dim: int,
                 decoder_depth: int, decoder_heads: int, norm_pix_loss: bool, proj_dim: int,
                 temperature: float, align_weight: float):
        super().__init__()
        if getattr(backbone, "family", None) != "vit":
            raise ValueError(f"ccMIM masks ViT patches: model.backbone must be a vit_* name, got a "
                             f"{getattr(backbone, 'family', type(backbone).__name__)} backbone")
        vit = backbone.vit
        if vit.num_prefix_tokens != 1 or vit.cls_token is None or getattr(vit, "no_embed_class", False):
            raise ValueError("ccMIM needs a ViT with one CLS token and a position embedding over CLS + patches "
                             "(timm defaults: class_token=True, reg_tokens=0, no_embed_class=False)")
        self.backbone = backbone
        self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        split_patches(torch.zeros(1, self.grid[0] * self.grid[1]), mask_ratio)   # refuses a ratio now, by name
        self.patch = backbone.patch
        dim = backbone.out_channels[0]
        mae_init_(vit)
        with torch.no_grad():
            nn.init.normal_(vit.cls_token, std=0.02)
            vit.pos_embed.copy_(sincos_2d(dim, *self.grid, cls_token=True))
        vit.pos_embed.requires_grad_(False)                       # fixed, as MAE
        self.decoder = MAEDecoder(dim, self.grid, self.patch, decoder_dim, decoder_depth, decoder_heads)
        self.projector = projector(dim, proj_dim)
        mae_init_(self.projector)
        self.masking, self.mask_ratio, self.norm_pix_loss = masking, mask_ratio, norm_pix_loss
        self.temperature, self.align_weight = temperature, align_weight
        self.find_unused_parameters = align_weight == 0          # the projector then gets no gradient
        # the noise u: its own generator, reseeded each forward from (train.seed, rank, forwards so
        # far); the counter is a buffer, so a resumed run draws the masks the straight run would,
        # whatever else used torch's global RNG (loader threads included)
        self.seed = 0                                              # build() sets train.seed
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        self._noise_rng: dict[str, torch.Generator] = {}

    def draw_noise(self, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        """u ~ U(0, 1) [B, L] for this forward; advances the `draws` counter."""
        g = self._noise_rng.setdefault(str(device), torch.Generator(device))
        g.manual_seed(((self.seed * 1_000_003 + _world()[0]) * 1_000_003 + int(self.draws)) % 2 ** 63)
        self.draws += 1
        return torch.rand(shape, device=device, generator=g)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"decoder.mask_token"}

    # encoder pieces
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS [B, 1, D], patches [B, L, D]), each with its position embedding."""
        vit = self.backbone.vit
        size = tuple(int(s) for s in vit.patch_embed.img_size)
        if tuple(images.shape[-2:]) != size:
            raise ValueError(f"images are {tuple(images.shape[-2:])} but the ViT was built for {size}: "
                             "set model.backbone_options.img_size to data.image_size")
        patches = vit.patch_embed(images)
        if patches.ndim == 4:   # timm's dynamic_img_size keeps the grid: [B, H, W, D] -> [B, L, D]
            patches = patches.flatten(1, 2)
        patches = patches + vit.pos_embed[:, 1:]
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(len(images), -1, -1)
        return cls, patches

    def encode(self, cls: torch.Tensor, patches: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """CLS + the patches at `ids` [B, K] through the blocks and the final norm: [B, 1+K, D]."""
        vit = self.backbone.vit
        chosen = torch.gather(patches, 1, ids[..., None].expand(-1, -1, patches.shape[-1]))
        return vit.norm(vit.blocks(vit.norm_pre(torch.cat([cls, chosen], dim=1))))

    def choose(self, cls: torch.Tensor, patches: torch.Tensor, noise: torch.Tensor | None = None):
        """split_patches of this step's scores; `noise` [B, L] = u (U(0, 1) when None)."""
        if noise is None:
            noise = self.draw_noise(patches.shape[:2], patches.device)
        if self.masking == "random":
            return split_patches(noise, self.mask_ratio)
        a = cls_attention(self.backbone.vit, torch.cat([cls, patches], dim=1))
        return split_patches(importance_scores(a, noise), self.mask_ratio)

    def forward(self, batch: dict, noise: torch.Tensor | None = None) -> dict:
        images = batch[VIEW]
        cls, patches = self.embed(images)
        ids_vis, ids_mask, mask, ids_restore = self.choose(cls, patches, noise)
        visible = self.encode(cls, patches, ids_vis)
        pred = self.decoder(visible, ids_restore)
        l_rec = reconstruction_loss(pred, patchify(images, self.patch), mask, self.norm_pix_loss)
        logs = dict(rec=l_rec.detach())
        loss = l_rec
        if self.align_weight:
            with torch.no_grad():                                   # keys carry no gradient (see above)
                masked = self.encode(cls, patches, ids_mask)
                k = F.normalize(self.projector(masked[:, 0]).float(), dim=1)
            q = F.normalize(self.projector(visible[:, 0]).float(), dim=1)
            l_align, acc = alignment_loss(q, k, self.temperature)
            loss = loss + self.align_weight * l_align
            logs.update(align=l_align.detach(), acc=acc.detach())
        logs = dict(zip(logs, torch.stack(list(logs.values())).float().tolist()))   # one device sync
        return dict(loss=loss, **logs)


def build(cfg: dict) -> CCMIM:
    """Options live under `model:` (ModelConfig: the backbone keys plus ccMIM's). The ViT's
    patch grid is fixed (sin-cos table, masks), so data.image_size must equal its img_size."""
    method = build_on_backbone(CCMIM, cfg, ModelConfig, "ccmim")
    method.seed = int(((cfg or {}).get("train") or {}).get("seed") or 0)
    if "data" not in (cfg or {}):          # a model-only config (tests, tools): nothing to compare
        return method
    side = cfg["data"].get("image_size") or CCMIMRecipe.DEFAULTS["size"]
    built = tuple(int(s) for s in method.backbone.vit.patch_embed.img_size)
    if built != (side, side):
        from train.schema import ConfigError
        raise ConfigError(f"data.image_size={side} but the ViT was built for {built[0]}x{built[1]} images: set "
                          f"model.backbone_options.img_size={side} (or data.image_size={built[0]})")
    return method

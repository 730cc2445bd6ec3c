"""Masked-autoencoder pieces for masked image modelling on a ViT (ccMIM, methods.md 5; MAE):
fixed 2-D sine-cosine position embeddings, patchify, the MAE decoder and its loss, MAE's
weight initialisation.

Conventions (MAE's): a patch's pixels are flattened row by row, channel last
(`[p_row, p_col, c]` -> p*p*3 values); patches are in row-major grid order, the order of a
timm ViT's tokens; a mask is 1 where the patch is hidden, 0 where it is visible."""
from __future__ import annotations

import torch
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[len(positions), dim]: sin(pos * w_i) in the first half, cos(pos * w_i) in the second,
    w_i = 10000^(-i / (dim/2)), i = 0..dim/2-1 (float64, as MAE computes it in numpy)."""
    if dim % 2:
        raise ValueError(f"a sin-cos embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angle = positions.to(torch.float64).reshape(-1, 1) * omega
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def sincos_2d(dim: int, rows: int, cols: int, cls_token: bool = True) -> torch.Tensor:
    """[1, (1 +) rows*cols, dim] float32: the first dim/2 channels embed the patch's column,
    the last dim/2 its row (MAE's layout); with `cls_token` a leading zero row for the CLS."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, col.flatten()), sincos_1d(dim // 2, row.flatten())], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb])
    return emb.float()[None]


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, (H/p)(W/p), p*p*3], patches row-major, pixels (row, col, channel)."""
    B, C, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"image {H}x{W} is not a whole number of {patch}-pixel patches")
    h, w = H // patch, W // patch
    x = images.reshape(B, C, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, h * w, patch * patch * C)


def normalise_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's norm_pix_loss target: each patch minus its mean over its values, divided by
    sqrt(unbiased variance + eps)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                        norm_pix: bool = True) -> torch.Tensor:
    """MAE's loss: per-patch mean squared error, averaged over the hidden patches (mask 1).
    pred, target [B, L, P]; mask [B, L] in {0, 1}. Computed in float32."""
    with torch.autocast(pred.device.type, enabled=False):
        target = target.float()
        if norm_pix:
            target = normalise_patches(target)
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum()


@torch.no_grad()
def mae_init_(module: nn.Module) -> None:
    """MAE's initialisation (JAX ViT's): xavier-uniform Linear weights, zero biases, LayerNorm
    weight 1 and bias 0; a patch-embedding convolution like a Linear on its flattened weight."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d) and m.kernel_size == m.stride:   # patch embedding
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def restore_order(kept: torch.Tensor, fill: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Put the kept tokens [B, K, D] back at their grid places, `fill` [1, 1, D] everywhere
    else: [B, L, D] with row j = the token of grid position j (ids_restore [B, L] = rank of
    each grid position in the kept-first order)."""
    B, K, D = kept.shape
    L = ids_restore.shape[1]
    seq = torch.cat([kept, fill.to(kept.dtype).expand(B, L - K, D)], dim=1)
    return torch.gather(seq, 1, ids_restore[..., None].expand(B, L, D))


class MAEDecoder(nn.Module):
    """MAE's decoder: Linear(D -> width), mask tokens at the hidden places, fixed 2-D sin-cos
    position embedding, `depth` pre-norm Transformer blocks (timm's Block: qkv bias, MLP x4,
    LayerNorm eps 1e-6), LayerNorm, Linear(width -> p*p*3). The CLS token travels along and is
    dropped from the prediction."""

    def __init__(self, embed_dim: int, grid: tuple[int, int], patch: int, width: int = 512,
                 depth: int = 8, heads: int = 16, mlp_ratio: float = 4.0):
        super().__init__()
        from functools import partial

        from timm.models.vision_transformer import Block
        if width % heads:
            raise ValueError(f"model.decoder_dim={width} is not divisible by model.decoder_heads={heads}")
        self.embed = nn.Linear(embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", sincos_2d(width, *grid, cls_token=True), persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                                    for _ in range(depth))
        self.norm = norm(width)
        self.pred = nn.Linear(width, patch * patch * 3)
        mae_init_(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1+K, D] (CLS then the K visible patches in kept order) -> [B, L, p*p*3]."""
        x = self.embed(tokens)
        x = torch.cat([x[:, :1], restore_order(x[:, 1:], self.mask_token, ids_restore)], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]

"""Slide encoder ViT_WSI (paper §3.3): f_WSI = ViT_WSI({r_i}_{i=1..n_r}).

A small pre-norm transformer over the region tokens of one slide with a learnable CLS token; the normed CLS
output is f_WSI. Optional 2-D position: each region's grid position ((x, y) - min) / region_size_level0 gets a
fixed 2-D sinusoidal embedding (half the channels for x, half for y) added after the input projection. Padded
regions are masked as attention keys. ``pooling="mean"`` is the ablation of the released code (masked mean of the
projected region tokens, then the final norm; no transformer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hwsi.config import NonNegInt, PositiveFloat, PositiveInt
from hwsi.errors import ConfigError
from hwsi.nn.transformer import Block, init_vit_weights


@dataclass
class SlideViTConfig:
    in_dim: NonNegInt = 192  # region token width (ViT-4K out)
    dim: PositiveInt = 192
    depth: PositiveInt = 2
    n_heads: PositiveInt = 4
    mlp_ratio: PositiveFloat = 4.0
    use_pos: bool = True  # 2-D sinusoidal region positions from region coords
    pooling: Literal["cls", "mean"] = "cls"  # "cls" (paper's ViT) | "mean" (ablation)

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")


def sincos_2d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """pos (..., 2) float grid positions -> (..., dim) [sin/cos of x | sin/cos of y], frequencies 1/10000^(i/q)."""
    if dim % 4:
        raise ValueError(f"dim {dim} must be divisible by 4 for 2-D sin-cos positions")
    q = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(q, dtype=torch.float32, device=pos.device) / q))
    parts = []
    for axis in range(2):
        a = pos[..., axis : axis + 1].float() * freq
        parts += [a.sin(), a.cos()]
    return torch.cat(parts, dim=-1)


class SlideViT(nn.Module):
    """(B, R, Din) region tokens + (B, R) mask (+ coords) -> (B, dim) slide token."""

    def __init__(self, cfg: SlideViTConfig) -> None:
        super().__init__()
        if cfg.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {cfg.pooling!r}")
        self.cfg = cfg
        self.embed = nn.Linear(cfg.in_dim, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.blocks = nn.ModuleList([Block(cfg.dim, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.apply(init_vit_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def out_dim(self) -> int:
        return self.cfg.dim

    def forward(
        self,
        regions: torch.Tensor,
        mask: torch.Tensor,
        coords: torch.Tensor | None = None,
        region_size: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embed(regions)
        mask = mask.to(torch.bool)
        if self.cfg.use_pos and coords is not None:
            c = coords.to(x.dtype)
            big = torch.finfo(x.dtype).max
            cmin = torch.where(mask[..., None], c, torch.full_like(c, big)).amin(dim=1, keepdim=True)
            size = region_size.to(x.dtype)[:, None, None] if region_size is not None else 1.0
            x = x + sincos_2d((c - cmin) / size, self.cfg.dim).to(x.dtype) * mask[..., None]
        if self.cfg.pooling == "mean":
            w = mask[..., None].to(x.dtype)
            return self.norm((x * w).sum(1) / w.sum(1).clamp_min(1.0))
        tok = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        key_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        for blk in self.blocks:
            tok = blk(tok, key_mask)
        return self.norm(tok[:, 0])

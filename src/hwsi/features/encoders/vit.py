"""A plain-torch Vision Transformer whose state-dict keys follow the timm / DINO layout.

Keys: ``cls_token`` (1,1,D), ``pos_embed`` (1,1+g*g,D), ``patch_embed.proj.{weight,bias}``,
``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``, ``blocks.{i}.norm2``,
``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2``, ``norm``. Pre-norm blocks, exact-erf GELU, LayerNorm ``eps``.

Position embeddings are stored for the pre-training grid ``g = pos_grid`` and resampled to the input's patch grid:

* ``pos_interp="dino"`` — DINO's ``interpolate_pos_encoding``: bicubic, no antialias, ``scale_factor =
  (grid + 0.1) / g`` (the +0.1 guards against floating-point rounding of the output size);
* ``pos_interp="timm"`` — timm's ``resample_abs_pos_embed`` (dynamic image size): bicubic to ``size=grid``,
  antialias on.

Both leave the table untouched when the grid matches.

:class:`Block` (with :class:`Attention` / :class:`Mlp`) is also the transformer block of :mod:`hwsi.model` (CCAF,
ViT-4K, ViT_WSI, via :mod:`hwsi.model.blocks`), whose HIPT ``vit4k_xs_dino.pth`` keys are the same layout. Masking:
``key_mask`` (B, N) bool, True = a real token; False tokens are excluded as attention KEYS (they still produce
outputs, which callers ignore). ``key_mask=None`` is plain unmasked attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution to ``width`` channels."""

    def __init__(self, patch_size: int, width: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, gh, gw, D)."""
        return self.proj(x).permute(0, 2, 3, 1)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); ``key_mask`` (B, N) bool, True = a valid attention key."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


def _interp_dtype(t: torch.Tensor) -> torch.Tensor:
    """Bicubic interpolation needs float32 or float64: half precision tables are upcast (and cast back after)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _resample_pos(
    pos_embed: torch.Tensor, grid_h: int, grid_w: int, resize: Callable[[torch.Tensor, int], torch.Tensor]
) -> torch.Tensor:
    """Split a (1, 1+N, D) table into CLS + a g x g patch grid, ``resize((1, D, g, g), g)`` the grid (float32/64),
    and put it back together in the table's dtype; the table itself when the grid already matches."""
    n = pos_embed.shape[1] - 1
    if n == grid_h * grid_w and grid_h == grid_w:
        return pos_embed
    g = int(math.sqrt(n))
    dim = pos_embed.shape[-1]
    cls_pos, patch_pos = pos_embed[:, :1], _interp_dtype(pos_embed[:, 1:])
    patch_pos = resize(patch_pos.reshape(1, g, g, dim).permute(0, 3, 1, 2), g)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat((cls_pos, patch_pos), dim=1)


def interpolate_pos_dino(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """DINO's interpolate_pos_encoding of a (1, 1+N, D) table to a ``grid_h x grid_w`` patch grid."""

    def resize(grid: torch.Tensor, g: int) -> torch.Tensor:
        out = F.interpolate(grid, scale_factor=((grid_h + 0.1) / g, (grid_w + 0.1) / g), mode="bicubic")
        if out.shape[-2:] != (grid_h, grid_w):  # pragma: no cover - guarded by the +0.1
            raise RuntimeError(f"pos-embed interpolation gave {tuple(out.shape[-2:])}, wanted {(grid_h, grid_w)}")
        return out

    return _resample_pos(pos_embed, grid_h, grid_w, resize)


def interpolate_pos_timm(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """timm's resample_abs_pos_embed (bicubic, antialias) of a (1, 1+N, D) table to ``grid_h x grid_w``."""

    def resize(grid: torch.Tensor, g: int) -> torch.Tensor:
        return F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", antialias=True)

    return _resample_pos(pos_embed, grid_h, grid_w, resize)


class VisionTransformer(nn.Module):
    """ViT trunk returning all normalised tokens (CLS first); keys in the timm/DINO layout."""

    def __init__(
        self,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        pos_grid: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        pos_interp: str = "dino",
    ) -> None:
        super().__init__()
        if pos_interp not in ("dino", "timm"):
            raise ValueError(f"pos_interp must be 'dino' or 'timm', got {pos_interp!r}")
        self.pos_interp = pos_interp
        self.patch_embed = PatchEmbed(patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, width))
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, qkv_bias, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=eps)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: Any, pos_interp: str) -> VisionTransformer:
        """Trunk from an encoder config with ``patch_size, width, depth, heads, pos_grid, mlp_ratio, ln_eps``
        (qkv bias on, as in DINO/HIPT and CONCH)."""
        return cls(
            patch_size=config.patch_size,
            width=config.width,
            depth=config.depth,
            heads=config.heads,
            pos_grid=config.pos_grid,
            mlp_ratio=config.mlp_ratio,
            qkv_bias=True,
            eps=config.ln_eps,
            pos_interp=pos_interp,
        )

    def reset_parameters(self) -> None:
        """timm/DINO-style init: trunc-normal 0.02 for tokens and Linear weights, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + gh*gw, D), after the final LayerNorm."""
        x = self.patch_embed(x)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        interp = interpolate_pos_dino if self.pos_interp == "dino" else interpolate_pos_timm
        x = x + interp(self.pos_embed, gh, gw)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """CLS embedding (B, D)."""
        return self.forward_tokens(x)[:, 0]

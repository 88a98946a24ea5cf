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

The blocks (:class:`hwsi.nn.transformer.Block`, with its attention and MLP) and the position-table resampling
(:mod:`hwsi.nn.pos_embed`) are shared with :mod:`hwsi.model` (CCAF, ViT-4K, ViT_WSI), whose HIPT
``vit4k_xs_dino.pth`` keys are the same layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hwsi.nn.pos_embed import interpolate_pos_dino, interpolate_pos_timm
from hwsi.nn.transformer import Attention, Block, Mlp, PatchEmbed

__all__ = ["Attention", "Block", "Mlp", "PatchEmbed", "VisionTransformer", "interpolate_pos_dino",
           "interpolate_pos_timm"]


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

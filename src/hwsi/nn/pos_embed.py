"""Absolute position-embedding tables resampled to another patch grid, the two ways checkpoints expect
(:class:`hwsi.features.encoders.vit.VisionTransformer`'s ``pos_interp``):

* :func:`interpolate_pos_dino` — DINO's ``interpolate_pos_encoding``: bicubic, no antialias, ``scale_factor =
  (grid + 0.1) / g`` (the +0.1 guards against floating-point rounding of the output size);
* :func:`interpolate_pos_timm` — timm's ``resample_abs_pos_embed`` (dynamic image size): bicubic to ``size=grid``,
  antialias on.

Both leave the table untouched when the grid matches.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["interpolate_pos_dino", "interpolate_pos_timm"]


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

"""V→L projectors (paper §3.4) and the learned scale-boundary markers.

    z_c = A_c(c_ij),  z_p = A_p(f_ij),  z_r = A_r(r_i),  z_WSI = A_WSI(f_WSI)

Each A_s is Linear(in_dim → hidden) → GELU → Linear(hidden → llm_dim) (hidden 1024 in the released code; llm_dim
3584 for Qwen2.5-7B). The markers are learned vectors of shape (2, llm_dim) per scale — [begin, end] — owned by
this module (new rows in a frozen LLM vocabulary would never train), placed around each scale's segment:
``<cells> z_c… </cells> <patches> z_p… </patches> <regions> z_r… </regions> <slide> z_WSI </slide>``.
Markers start at N(0, 0.02²), the usual scale of LLM input embeddings.

Region identity (``region_embed`` > 0; docs/design.md §5, a reading of Eq. 5's nesting {{c_ij, f_ij}_j, r_i}_i): a
learned vector per kept-region position (raster order of the kept regions, 0 … region_embed−1; positions past the
table share its last row) is added to the projected cell, patch and region tokens of that region, so the LLM can
group evidence by region and tell regions apart (which region is lesional, how many are). The order stays
Z = [z_c, z_p, z_r, z_WSI]; the slide token gets none.

Region position (``region_position: slide``; docs/design.md §5): the region scale carries the slide's layout. Each
z_r gets a learned linear map of its region's centre on the slide, (x, y) in [-1, 1] from
:func:`hwsi.model.hierarchy.region_positions`, through low-frequency Fourier features
[x, y, sin(πx·f/2), cos(πx·f/2), sin(πy·f/2), cos(πy·f/2) for f = 1, 2] — the same kind of 2-D position ViT_WSI
gives its region inputs, kept on the tokens the LLM sees, so "where is the lesion" can be read from the regions.
Cell and patch tokens get no position: they point to their region through the region identity above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hwsi.config import NonNegInt, PositiveInt


@dataclass
class ProjectorConfig:
    hidden: PositiveInt = 1024
    llm_dim: NonNegInt = 3584  # Qwen2.5-7B hidden size
    markers: bool = True
    region_embed: int = 0  # size of the learned region-index table (0 = off; e.g. model.max_regions)
    region_position: Literal["none", "slide"] = "none"  # z_r + a learned map of the region's place on the slide


POSITION_FREQS = (1.0, 2.0)
N_POSITION_FEATURES = 2 + 4 * len(POSITION_FREQS)


def position_features(pos: torch.Tensor) -> torch.Tensor:
    """(..., 2) positions in [-1, 1] -> (..., N_POSITION_FEATURES) Fourier features (module docstring)."""
    feats = [pos]
    for f in POSITION_FREQS:
        a = pos * (math.pi * f / 2)
        feats += [torch.sin(a), torch.cos(a)]
    return torch.cat(feats, dim=-1)


class Projectors(nn.Module):
    """Four 2-layer MLP projectors (one per active scale) plus begin/end markers."""

    def __init__(self, in_dims: dict[str, int], cfg: ProjectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mlps = nn.ModuleDict({
            s: nn.Sequential(nn.Linear(d, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.llm_dim))
            for s, d in in_dims.items()
        })
        self.markers = nn.ParameterDict({
            s: nn.Parameter(torch.randn(2, cfg.llm_dim) * 0.02) for s in in_dims
        }) if cfg.markers else None
        self.region_embed = (nn.Parameter(torch.randn(cfg.region_embed, cfg.llm_dim) * 0.02)
                             if cfg.region_embed > 0 else None)
        self.region_position = (nn.Parameter(torch.randn(N_POSITION_FEATURES, cfg.llm_dim) * 0.02)
                                if cfg.region_position == "slide" and "regions" in in_dims else None)

    @property
    def scales(self) -> tuple[str, ...]:
        return tuple(self.mlps.keys())

    def forward(self, scale: str, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` (..., in_dim) of ``scale`` to (..., llm_dim)."""
        return self.mlps[scale](x)

    def add_region_identity(self, tokens: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """(n, llm_dim) projected tokens + the embedding of each token's region position ``region`` (n,) long."""
        if self.region_embed is None:
            return tokens
        idx = region.clamp(0, self.region_embed.shape[0] - 1).to(self.region_embed.device)
        return tokens + self.region_embed[idx].to(tokens.dtype)

    def add_region_position(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(n, llm_dim) projected region tokens + the learned map of their (n, 2) slide positions in [-1, 1]."""
        if self.region_position is None:
            return tokens
        w = self.region_position
        return tokens + (position_features(pos.to(device=w.device, dtype=w.dtype)) @ w).to(tokens.dtype)

    def wrap(self, scale: str, tokens: torch.Tensor) -> torch.Tensor:
        """(n, llm_dim) -> (n + 2, llm_dim) with the scale's begin/end markers (unchanged if markers are off)."""
        if self.markers is None:
            return tokens
        m = self.markers[scale].to(tokens.dtype)
        return torch.cat([m[:1], tokens, m[1:]], dim=0)

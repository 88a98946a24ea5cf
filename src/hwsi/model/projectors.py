"""V→L projectors (paper §3.4) and the learned scale-boundary markers.

    z_c = A_c(c_ij),  z_p = A_p(f_ij),  z_r = A_r(r_i),  z_WSI = A_WSI(f_WSI)

Each A_s is Linear(in_dim → hidden) → GELU → Linear(hidden → llm_dim) (hidden 1024 in the released code; llm_dim
3584 for Qwen2.5-7B). The markers are learned vectors of shape (2, llm_dim) per scale — [begin, end] — owned by
this module (new rows in a frozen LLM vocabulary would never train), placed around each scale's segment:
``<cells> z_c… </cells> <patches> z_p… </patches> <regions> z_r… </regions> <slide> z_WSI </slide>``.
Markers start at N(0, 0.02²), the usual scale of LLM input embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hwsi.config import NonNegInt, PositiveInt


@dataclass
class ProjectorConfig:
    hidden: PositiveInt = 1024
    llm_dim: NonNegInt = 3584  # Qwen2.5-7B hidden size
    markers: bool = True


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

    @property
    def scales(self) -> tuple[str, ...]:
        return tuple(self.mlps.keys())

    def forward(self, scale: str, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` (..., in_dim) of ``scale`` to (..., llm_dim)."""
        return self.mlps[scale](x)

    def wrap(self, scale: str, tokens: torch.Tensor) -> torch.Tensor:
        """(n, llm_dim) -> (n + 2, llm_dim) with the scale's begin/end markers (unchanged if markers are off)."""
        if self.markers is None:
            return tokens
        m = self.markers[scale].to(tokens.dtype)
        return torch.cat([m[:1], tokens, m[1:]], dim=0)

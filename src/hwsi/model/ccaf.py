"""Cell–Cell Attention Fusion (CCAF), paper Eq. 4.

    c_ij = ViT_cell-cell([CLS]_ij, {c_ijk}_{k=1..n_ij}),   c_ij ∈ R^784 (paper)

The nuclei embeddings c_ijk of one patch (Eq. 3) are projected to the model width, a learnable CLS token is
prepended, ``depth`` pre-norm transformer blocks with ``n_heads`` heads run over the set (no positional
embedding: nuclei are an unordered set), and the normed CLS output is the patch's cellular token. Padding nuclei
are masked as attention keys. A patch with no nuclei gets a learned "no cells" token instead (its transformer
pass is skipped entirely). Patches are batched: input (..., Nmax, Dc) with mask (..., Nmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hwsi.config import NonNegInt, PositiveFloat, PositiveInt
from hwsi.errors import ConfigError
from hwsi.nn.transformer import Block, init_vit_weights


@dataclass
class CCAFConfig:
    in_dim: NonNegInt = 384  # c_ijk width (CellViT-256: 384; built-in morphology features: their width)
    dim: PositiveInt = 784  # transformer width = output width (paper: 784)
    depth: PositiveInt = 2  # paper: 2 blocks
    n_heads: PositiveInt = 2  # paper: 2 heads
    mlp_ratio: PositiveFloat = 4.0

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")


class CCAF(nn.Module):
    """ViT_cell-cell over the nuclei of each patch -> one token per patch (Eq. 4)."""

    def __init__(self, cfg: CCAFConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.in_dim, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.blocks = nn.ModuleList([Block(cfg.dim, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.no_cells = nn.Parameter(torch.zeros(cfg.dim))
        self.apply(init_vit_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.no_cells, std=0.02)

    @property
    def out_dim(self) -> int:
        return self.cfg.dim

    def forward(self, cells: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """cells (..., N, Dc), mask (..., N) bool -> (..., dim). Patches whose mask is all False get ``no_cells``."""
        lead = cells.shape[:-2]
        n, dc = cells.shape[-2], cells.shape[-1]
        count = int(torch.tensor(lead).prod()) if lead else 1
        x = cells.reshape(count, n, dc)
        m = mask.reshape(count, n).to(torch.bool)
        out = self.no_cells.to(x.dtype).expand(x.shape[0], -1).clone()
        has = m.any(dim=1)
        if bool(has.any()):
            xs, ms = x[has], m[has]
            tok = torch.cat([self.cls_token.to(xs.dtype).expand(xs.shape[0], -1, -1), self.embed(xs)], dim=1)
            key_mask = torch.cat([torch.ones_like(ms[:, :1]), ms], dim=1)
            for blk in self.blocks:
                tok = blk(tok, key_mask)
            out[has] = self.norm(tok[:, 0])
        return out.reshape(*lead, self.cfg.dim)

"""HIPT ViT-4K region encoder (ViT_r in paper §3.3): r_i = ViT_r({p_ij}_{j=1..G}).

Input: the (G, Din) ViT-256 features of every patch of a region, G = side² in row-major order (side 16 for
4096/256 regions). Architecture (HIPT ``vit4k_xs``): phi = Linear(Din→192) + GELU, a CLS token, learned
absolute position embeddings, 6 pre-norm blocks with 6 heads (mlp ratio 4, qkv bias, LayerNorm eps 1e-6), a
final LayerNorm; the output is the 192-d CLS token.

Position embeddings: the checkpoint stores ``pos_embed`` of shape (1, 1 + P², 192) with P = ``pos_grid`` (HIPT
builds it with img_size 224 → P = 14). For a side×side grid with side ≠ P the patch part is resized with bicubic
interpolation exactly as DINO/HIPT do (``scale_factor = (side + 0.1) / P`` on both axes), so the features of real
HIPT weights reproduce.

Non-tissue grid cells (``grid_mask`` False) are excluded as attention keys (key-padding mask), so the CLS
token and all tissue tokens ignore them; that is equivalent to deleting those tokens from the sequence (tested).
HIPT itself feeds every cell including background; pass an all-True mask to reproduce that.

State-dict keys are those of HIPT's ``vit4k_xs_dino.pth`` teacher after stripping ``module.``/``backbone.``:
``cls_token, pos_embed, phi.0.{weight,bias}, blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*,
norm.*``. :func:`load_hipt_vit4k` ignores ``head.*`` (the DINO projection head) and fails on any missing key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from hwsi.config import NonNegInt, PositiveFloat, PositiveInt
from hwsi.errors import ConfigError
from hwsi.features.encoders.checkpoints import read_state_dict
from hwsi.nn.transformer import Block, init_vit_weights


@dataclass
class ViT4KConfig:
    in_dim: NonNegInt = 384  # ViT-256 CLS width (HIPT); the small patch encoder's width on CPU
    dim: PositiveInt = 192
    depth: PositiveInt = 6
    n_heads: PositiveInt = 6
    mlp_ratio: PositiveFloat = 4.0
    pos_grid: PositiveInt = 14  # side of the stored position grid (HIPT: img_size 224 // 16 = 14)
    stem: Literal["linear", "conv", "neighbour"] = "linear"  # "linear" = HIPT's phi only (module docstring)
    stem_layers: PositiveInt = 1  # residual 3x3 conv blocks of the "conv" stem

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")


_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def neighbour_cosines(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(M, G, D) grid features, (M, G) tissue mask -> (M, G, 8) cosine to each of the 8 neighbours (0 off-grid)."""
    m, g, d = x.shape
    side = math.isqrt(g)
    u = F.normalize(x.float(), dim=-1)
    if mask is not None:
        u = u * mask[..., None].to(u.dtype)
    grid = F.pad(u.reshape(m, side, side, d).permute(0, 3, 1, 2), (1, 1, 1, 1))  # (M, D, side+2, side+2)
    centre = grid[:, :, 1:-1, 1:-1]
    out = [(centre * grid[:, :, 1 + dy: 1 + dy + side, 1 + dx: 1 + dx + side]).sum(1) for dy, dx in _NEIGHBOURS]
    return torch.stack(out, dim=-1).reshape(m, g, 8).to(x.dtype)


class GridConvStem(nn.Module):
    """Residual 3×3 convolutions over the patch grid: x + W1x1(GELU(conv3x3(x))), identity at initialisation."""

    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(dim, dim, 3, padding=1) for _ in range(layers)])
        self.projs = nn.ModuleList([nn.Linear(dim, dim) for _ in range(layers)])
        for proj in self.projs:
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        m, g, d = x.shape
        side = math.isqrt(g)
        keep = None if mask is None else mask[..., None].to(x.dtype)
        for conv, proj in zip(self.convs, self.projs):
            h = x if keep is None else x * keep
            h = conv(h.transpose(1, 2).reshape(m, d, side, side)).reshape(m, d, g).transpose(1, 2)
            x = x + proj(F.gelu(h))
        return x


def interpolate_pos_embed(pos_embed: torch.Tensor, side: int) -> torch.Tensor:
    """(1, 1+P², D) -> (1, 1+side², D): bicubic resize of the patch part, DINO's ``+0.1`` scale-factor rule."""
    n = pos_embed.shape[1] - 1
    p = int(math.isqrt(n))
    if p * p != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square")
    if side == p:
        return pos_embed
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    d = pos_embed.shape[-1]
    scale = (side + 0.1) / p
    grid = F.interpolate(grid.reshape(1, p, p, d).permute(0, 3, 1, 2), scale_factor=(scale, scale), mode="bicubic")
    grid = grid.permute(0, 2, 3, 1).reshape(1, side * side, d)
    return torch.cat([cls, grid], dim=1)


class ViT4K(nn.Module):
    """Region encoder: (M, G, Din) patch features + (M, G) tissue mask -> (M, dim) region tokens r_i."""

    def __init__(self, cfg: ViT4KConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.phi = nn.Sequential(nn.Linear(cfg.in_dim, cfg.dim), nn.GELU())
        if cfg.stem not in ("linear", "conv", "neighbour"):
            raise ConfigError(f"vit4k.stem must be 'linear', 'conv' or 'neighbour', got {cfg.stem!r}")
        self.stem: nn.Module | None = None
        if cfg.stem == "conv":
            self.stem = GridConvStem(cfg.dim, max(1, cfg.stem_layers))
        elif cfg.stem == "neighbour":
            self.stem = nn.Linear(8, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_grid**2 + 1, cfg.dim))
        self.blocks = nn.ModuleList([Block(cfg.dim, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.apply(init_vit_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if isinstance(self.stem, GridConvStem):
            for proj in self.stem.projs:
                nn.init.zeros_(proj.weight)
        elif self.stem is not None:
            nn.init.zeros_(self.stem.weight)

    @property
    def out_dim(self) -> int:
        return self.cfg.dim

    def forward(self, x: torch.Tensor, grid_mask: torch.Tensor | None = None) -> torch.Tensor:
        m, g, _ = x.shape
        side = math.isqrt(g)
        if side * side != g:
            raise ValueError(f"region grid of {g} patches is not square")
        h = self.phi(x)
        if isinstance(self.stem, GridConvStem):
            h = self.stem(h, grid_mask)
        elif self.stem is not None:
            h = h + self.stem(neighbour_cosines(x, grid_mask))
        tok = torch.cat([self.cls_token.to(x.dtype).expand(m, -1, -1), h], dim=1)
        tok = tok + interpolate_pos_embed(self.pos_embed, side).to(x.dtype)
        key_mask = None
        if grid_mask is not None:
            key_mask = torch.cat([torch.ones_like(grid_mask[:, :1], dtype=torch.bool), grid_mask.to(torch.bool)], 1)
        for blk in self.blocks:
            tok = blk(tok, key_mask)
        return self.norm(tok[:, 0])


def clean_hipt_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unwrap ``teacher``/``state_dict``/``model`` containers, strip ``module.``/``backbone.``, drop ``head.*``."""
    for key in ("teacher", "state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("head."):
            continue
        out[k] = v
    return out


def load_hipt_vit4k(model: ViT4K, path: str | Path) -> ViT4K:
    """Load HIPT ViT-4K weights (e.g. ``vit4k_xs_dino.pth``) into ``model``; any missing or mis-shaped key fails."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: ViT-4K checkpoint not found")
    # LFS pointers, truncated files and DINO's full training checkpoints (args: argparse.Namespace) as for ViT-256
    state = clean_hipt_state_dict(read_state_dict(path, unwrap=("teacher", "state_dict", "model")))
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(state) if not k.startswith("stem."))  # stem.*: ours, not HIPT's
    if missing:
        raise ConfigError(f"{path}: missing ViT-4K keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
           if k in state and state[k].shape != v.shape]
    if bad:
        raise ConfigError(f"{path}: ViT-4K shape mismatch (check in_dim/pos_grid/dim): {bad[:4]}")
    # stem.* keys, absent from HIPT checkpoints, keep their identity initialisation
    model.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    return model

"""The trainable hierarchy (paper §3.3, Eq. 4–5): stored frozen inputs -> per-scale tokens.

    F_WSI = {{c_ij, f_ij}_{j=1..h_i}, r_i}_{i=1..n_r}, f_WSI}                                        (Eq. 5)

* c_ij  = CCAF(nuclei of patch ij)                      cell_tokens   (B, R, k, ccaf.dim)      Eq. 4
* f_ij  = the stored frozen patch features (CONCH)      patch_tokens  (B, R, k, patch_dim)    passed through
* r_i   = ViT-4K(ViT-256 features of the region grid)   region_tokens (B, R, vit4k.dim)
* f_WSI = ViT_WSI({r_i})                                slide_token   (B, slide.dim)

Table 1 ablation switches ``use_cells / use_patches / use_regions / use_slide`` drop a scale from the output
(its field is None). ViT-4K still runs when ``use_regions`` is off but ``use_slide`` is on, since f_WSI is built
from the r_i. Usage::

    enc = HierarchicalEncoder(HierarchyConfig.tiny())
    out = enc(collate_slides([load_slide_inputs(...)]))
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn

from hwsi.config import NonNegInt
from hwsi.errors import ConfigError
from hwsi.model.ccaf import CCAF, CCAFConfig
from hwsi.model.inputs import SlideBatch
from hwsi.model.slide_vit import SlideViT, SlideViTConfig
from hwsi.model.vit4k import ViT4K, ViT4KConfig

SCALES = ("cells", "patches", "regions", "slide")


@dataclass
class HierarchyConfig:
    patch_dim: NonNegInt = 512  # f_ij width (CONCH ViT-B/16: 512)
    ccaf: CCAFConfig = field(default_factory=CCAFConfig)
    vit4k: ViT4KConfig = field(default_factory=ViT4KConfig)
    slide: SlideViTConfig = field(default_factory=SlideViTConfig)
    use_cells: bool = True
    use_patches: bool = True
    use_regions: bool = True
    use_slide: bool = True

    @classmethod
    def tiny(cls, patch_dim: int = 16, region_in_dim: int = 12, cell_dim: int = 8, **switches: bool) -> "HierarchyConfig":
        """A CPU-test-sized hierarchy with the paper's structure (widths shrunk)."""
        return cls(
            patch_dim=patch_dim,
            ccaf=CCAFConfig(in_dim=cell_dim, dim=16, depth=2, n_heads=2),
            vit4k=ViT4KConfig(in_dim=region_in_dim, dim=24, depth=2, n_heads=2, pos_grid=4),
            slide=SlideViTConfig(in_dim=24, dim=24, depth=1, n_heads=2),
            **switches,
        )

    def scales(self) -> tuple[str, ...]:
        on = (self.use_cells, self.use_patches, self.use_regions, self.use_slide)
        return tuple(s for s, u in zip(SCALES, on) if u)

    def dims(self) -> dict[str, int]:
        """Token width of each ACTIVE scale."""
        d = {"cells": self.ccaf.dim, "patches": self.patch_dim, "regions": self.vit4k.dim, "slide": self.slide.dim}
        return {s: d[s] for s in self.scales()}


@dataclass
class HierarchyOutput:
    cell_tokens: torch.Tensor | None  # (B, R, k, Dc') c_ij
    patch_tokens: torch.Tensor | None  # (B, R, k, Dp) f_ij
    region_tokens: torch.Tensor | None  # (B, R, Dr) r_i
    slide_token: torch.Tensor | None  # (B, Dw) f_WSI
    patch_mask: torch.Tensor  # (B, R, k) bool: real selected patch (valid cell and patch tokens)
    region_mask: torch.Tensor  # (B, R) bool: real region
    cell_present: torch.Tensor  # (B, R, k) bool: the patch has >= 1 nucleus (else c_ij is the "no cells" token)
    region_pos: torch.Tensor | None = None  # (B, R, 2) region centres on the slide in [-1, 1] (region_positions)

    def get(self, scale: str) -> torch.Tensor | None:
        return {"cells": self.cell_tokens, "patches": self.patch_tokens, "regions": self.region_tokens,
                "slide": self.slide_token}[scale]

    def split(self) -> list["HierarchyOutput"]:
        """One output per slide of the batch (copies, batch dim 1, padding kept; the masks say what is real)."""
        def take(t: torch.Tensor | None, b: int) -> torch.Tensor | None:
            return None if t is None else t[b:b + 1].clone()
        return [HierarchyOutput(*(take(getattr(self, f.name), b) for f in fields(self)))
                for b in range(self.region_mask.shape[0])]

    @staticmethod
    def collate(outs: list["HierarchyOutput"]) -> "HierarchyOutput":
        """Outputs of single slides (:meth:`split`) -> one batch, padded to the largest R and k with masked zeros;
        :meth:`hwsi.model.mllm.MLLMHWSI.project` reads only the masked-in entries, so the visual tokens equal those
        of the slides encoded one by one."""
        size = {1: max(o.region_mask.shape[1] for o in outs), 2: max(o.patch_mask.shape[2] for o in outs)}
        padded = {"cell_tokens": (1, 2), "patch_tokens": (1, 2), "patch_mask": (1, 2), "cell_present": (1, 2),
                  "region_tokens": (1,), "region_mask": (1,), "slide_token": (), "region_pos": (1,)}

        def pad(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
            for d in dims:
                if t.shape[d] < size[d]:
                    shape = list(t.shape)
                    shape[d] = size[d] - t.shape[d]
                    t = torch.cat([t, t.new_zeros(shape)], dim=d)
            return t

        merged = []
        for f in fields(HierarchyOutput):
            ts = [getattr(o, f.name) for o in outs]
            merged.append(None if ts[0] is None else torch.cat([pad(t, padded[f.name]) for t in ts], dim=0))
        return HierarchyOutput(*merged)


class HierarchicalEncoder(nn.Module):
    """CCAF + ViT-4K + ViT_WSI (trainable) over stored frozen features; see the module docstring."""

    def __init__(self, cfg: HierarchyConfig) -> None:
        super().__init__()
        if cfg.slide.in_dim != cfg.vit4k.dim:
            raise ConfigError(f"slide.in_dim ({cfg.slide.in_dim}) must equal vit4k.dim ({cfg.vit4k.dim})")
        if not cfg.scales():
            raise ConfigError("HierarchyConfig: every scale is switched off")
        self.cfg = cfg
        self.ccaf = CCAF(cfg.ccaf) if cfg.use_cells else None
        self.vit4k = ViT4K(cfg.vit4k) if (cfg.use_regions or cfg.use_slide) else None
        self.slide_vit = SlideViT(cfg.slide) if cfg.use_slide else None

    def forward(self, batch: SlideBatch) -> HierarchyOutput:
        cfg = self.cfg
        patch_mask = batch.patch_mask.to(torch.bool)
        region_mask = batch.region_mask.to(torch.bool)
        cell_present = batch.cell_mask.any(dim=-1) & patch_mask
        cells = patches = regions = slide = None
        if self.ccaf is not None:
            cells = self.ccaf(batch.cell_feats, batch.cell_mask & patch_mask[..., None])
        if cfg.use_patches:
            patches = batch.patch_feats
        if self.vit4k is not None:
            b, r, g, din = batch.region_input.shape
            flat = torch.zeros(b * r, cfg.vit4k.dim, dtype=batch.region_input.dtype, device=batch.region_input.device)
            valid = region_mask.reshape(-1)
            if bool(valid.any()):
                flat[valid] = self.vit4k(batch.region_input.reshape(b * r, g, din)[valid],
                                         batch.grid_mask.reshape(b * r, g)[valid])
            all_regions = flat.reshape(b, r, -1)
            if self.slide_vit is not None:
                slide = self.slide_vit(all_regions, region_mask, batch.region_coords, batch.region_size_level0)
            regions = all_regions if cfg.use_regions else None
        return HierarchyOutput(cells, patches, regions, slide, patch_mask, region_mask, cell_present,
                               region_positions(batch))


def region_positions(batch: SlideBatch) -> torch.Tensor:
    """(B, R, 2) float32 centre of each region on its slide, x and y in [-1, 1] (0 = the slide's centre line,
    -1 = its left / top edge), from ``region_coords`` + half a region over the slide's level-0 size. A slide of
    unknown size (``level0_size`` 0, caches written before it was stored) is centred on its real regions' box
    instead. Padding regions get 0."""
    centre = batch.region_coords.to(torch.float32) + batch.region_size_level0.to(torch.float32)[:, None, None] / 2
    mask = batch.region_mask.to(torch.bool)
    out = torch.zeros_like(centre)
    size = batch.level0_size
    for b in range(centre.shape[0]):
        m = mask[b]
        if not bool(m.any()):
            continue
        c = centre[b, m]
        if size is not None and bool((size[b] > 0).all()):
            half = size[b].to(torch.float32) / 2
            mid = half
        else:
            lo, hi = c.min(dim=0).values, c.max(dim=0).values
            mid, half = (lo + hi) / 2, ((hi - lo) / 2).clamp_min(1.0)
        out[b, m] = ((c - mid) / half).clamp(-1.0, 1.0)
    return out

"""The region + patch grid of a slide at the target µm/px (docs/design.md §3).

* ``scale`` = target µm/px ÷ level-0 µm/px. If ``|level0_mpp / target - 1| <= mpp_tolerance`` (default 0.02) the
  slide is used at its own resolution (``scale = 1``, no resampling; ``effective_mpp`` = level-0 µm/px, e.g. 0.499
  for a "0.5" scan). A slide coarser than the target beyond the tolerance fails (upsampling invents detail).
* A region is ``region_size`` px at the target µm/px = ``region_size_level0 = region_size × scale`` level-0 px
  (non-integer allowed); a patch is ``patch_size`` px = ``patch_size × scale`` level-0 px. Regions tile the slide
  from (0, 0) in row-major order; region (i, j) starts at ``round(j × region_size_level0), round(i × ...)``; patch
  (a, b) of a region starts at the region's origin + ``round(b × patch_size_level0), round(a × ...)``. All
  coordinates are level-0 int64 (x, y); patches are row-major inside the region (G = (region/patch)² per region).
* **Edges: padded.** The last region column/row and slides smaller than one region are kept as full-size regions
  that extend past the slide; the part outside reads as white background and counts as non-tissue, so patches
  lying (mostly) outside the slide are flagged non-tissue. Every region has the same G patches, which keeps the
  store rectangular and the region encoder's input fixed.
* **Tissue.** A patch's tissue fraction is the fraction of its area (including any part outside the slide) covered
  by the tissue mask; a patch counts as tissue when the fraction is ``>= min_patch_tissue`` (0.25). A region's
  tissue fraction is computed the same way over its area; regions below ``min_region_tissue`` (0.05) or without a
  tissue patch are dropped. No region left → SlideError ("no tissue"). A slide too small for ANY patch or region
  to reach those fractions fails before it is read, saying how much of one patch/region it covers
  (:func:`check_fits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hwsi.errors import ConfigError, SlideError
from hwsi.slide.open import Slide
from hwsi.store import RegionGridShape


@dataclass
class GridConfig:
    """Region/patch grid settings. Sizes are pixels at ``target_mpp`` µm/px."""

    target_mpp: float = 0.5
    region_size: int = 4096
    patch_size: int = 256
    min_region_tissue: float = 0.05
    min_patch_tissue: float = 0.25
    mpp_tolerance: float = 0.02

    def validate(self) -> None:
        if not (math.isfinite(self.target_mpp) and self.target_mpp > 0):
            raise ConfigError(f"target_mpp must be a finite number > 0 (µm per pixel), got {self.target_mpp}")
        if self.patch_size <= 0 or self.region_size <= 0:
            raise ConfigError(f"region_size and patch_size must be > 0, got {self.region_size}, {self.patch_size}")
        if self.region_size % self.patch_size:
            raise ConfigError(
                f"region_size ({self.region_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if not 0 <= self.mpp_tolerance < 1:
            raise ConfigError(f"mpp_tolerance must be in [0, 1), got {self.mpp_tolerance}")
        for name in ("min_region_tissue", "min_patch_tissue"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {v}")


@dataclass
class Grid(RegionGridShape):
    """Regions and patches of one slide (level-0 int64 coordinates) and how to read them."""

    region_coords: np.ndarray  # (R, 2) int64
    region_tissue: np.ndarray  # (R,) float32
    patch_coords: np.ndarray  # (R, G, 2) int64
    patch_fraction: np.ndarray  # (R, G) float32 tissue fraction of each patch
    patch_tissue: np.ndarray  # (R, G) bool
    region_size: int
    patch_size: int
    region_size_level0: float
    patch_size_level0: float
    scale: float  # level-0 px per target px
    mpp_level0: float
    target_mpp: float
    effective_mpp: float
    read_level: int
    read_downsample: float
    level0_width: int
    level0_height: int
    n_candidates: int  # regions before tissue filtering

    @property
    def n_regions(self) -> int:
        return int(self.region_coords.shape[0])

    @property
    def resample_free(self) -> bool:
        """True when regions are read at level 0 without any resampling."""
        return self.scale == 1.0 and self.read_level == 0


def resolution_plan(path: str, mpp_level0: float, cfg: GridConfig) -> tuple[float, float]:
    """``(scale, effective_mpp)`` for a slide; SlideError if it is too coarse for the target."""
    cfg.validate()
    ratio = mpp_level0 / cfg.target_mpp
    if abs(ratio - 1) <= cfg.mpp_tolerance:
        return 1.0, float(mpp_level0)
    if ratio > 1:
        raise SlideError(
            path,
            f"resolution too coarse: level 0 is {mpp_level0:.4g} µm/px, the target is {cfg.target_mpp:g} µm/px "
            f"(tolerance {cfg.mpp_tolerance:.0%})",
            "use a higher-resolution scan or a larger --target-mpp",
        )
    return float(cfg.target_mpp / mpp_level0), float(cfg.target_mpp)


def check_fits(slide: Slide, cfg: GridConfig, scale: float) -> None:
    """SlideError "no tissue" BEFORE any pixel is read when the slide is too small for the grid to find any: the
    whole slide covers less of one patch than ``min_patch_tissue``, or of one region than ``min_region_tissue``
    (grid edges are padded, so a slide smaller than one region is fine as long as it fills enough of it). This also
    stops sizes that do not fit an integer (``--target-mpp 1e300``)."""
    w, h = slide.dimensions
    for what, size, floor, option in (("patch", cfg.patch_size, cfg.min_patch_tissue, "--patch-size"),
                                      ("region", cfg.region_size, cfg.min_region_tissue, "--region-size")):
        side = size * scale  # level-0 px
        cover = (min(w, side) / side) * (min(h, side) / side)
        if cover < floor or (floor == 0 and cover == 0):
            raise SlideError(
                slide.path,
                f"no tissue possible: the whole slide ({w}×{h} level-0 px at {slide.mpp:.4g} µm/px) covers "
                f"{cover:.2%} of one {what} ({size} px at {cfg.target_mpp:g} µm/px = {side:.4g} level-0 px), "
                f"below min_{what}_tissue {floor:.0%}",
                f"use a smaller {option} or --target-mpp",
            )


def _box_fractions(ii: np.ndarray, ds: float, x0: np.ndarray, y0: np.ndarray, size: float) -> np.ndarray:
    """Tissue fraction of level-0 boxes [x0, x0+size) × [y0, y0+size) from the integral image of the mask."""
    h, w = ii.shape[0] - 1, ii.shape[1] - 1
    mx0 = np.rint(x0 / ds).astype(np.int64)
    my0 = np.rint(y0 / ds).astype(np.int64)
    side = max(1, int(round(size / ds)))
    mx1, my1 = mx0 + side, my0 + side
    cx0, cx1 = np.clip(mx0, 0, w), np.clip(mx1, 0, w)
    cy0, cy1 = np.clip(my0, 0, h), np.clip(my1, 0, h)
    s = ii[cy1, cx1] - ii[cy0, cx1] - ii[cy1, cx0] + ii[cy0, cx0]
    return (s / float(side * side)).astype(np.float32)


def build_grid(slide: Slide, tissue_mask: np.ndarray, mask_downsample: float, cfg: GridConfig | None = None) -> Grid:
    """Regions and patches of ``slide`` with their tissue fractions from ``tissue_mask`` (bool, level-0 px per
    mask px = ``mask_downsample``); see the module docstring for the rules."""
    cfg = cfg or GridConfig()
    scale, eff = resolution_plan(str(slide.path), slide.mpp, cfg)
    check_fits(slide, cfg, scale)
    r0 = cfg.region_size * scale
    p0 = cfg.patch_size * scale
    w, h = slide.dimensions
    nx, ny = max(1, int(np.ceil(w / r0 - 1e-9))), max(1, int(np.ceil(h / r0 - 1e-9)))
    jj, ii_ = np.meshgrid(np.arange(nx), np.arange(ny))
    rx = np.rint(jj.ravel() * r0).astype(np.int64)
    ry = np.rint(ii_.ravel() * r0).astype(np.int64)
    g = cfg.region_size // cfg.patch_size
    off = np.rint(np.arange(g) * p0).astype(np.int64)
    oy, ox = np.meshgrid(off, off, indexing="ij")  # row-major: row a (y), column b (x)
    px = rx[:, None] + ox.ravel()[None, :]
    py = ry[:, None] + oy.ravel()[None, :]

    mask = np.asarray(tissue_mask, bool)
    ii = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int32)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int32), axis=1, out=ii[1:, 1:])
    patch_frac = _box_fractions(ii, mask_downsample, px, py, p0)
    region_frac = _box_fractions(ii, mask_downsample, rx, ry, r0)
    patch_tissue = patch_frac >= cfg.min_patch_tissue
    keep = (region_frac >= cfg.min_region_tissue) & patch_tissue.any(axis=1)
    if not keep.any():
        raise SlideError(
            slide.path,
            f"no tissue: none of {rx.size} regions has >= {cfg.min_region_tissue:.0%} tissue "
            f"(mask tissue fraction {mask.mean():.2%})",
            "check the slide, or lower min_region_tissue / min_patch_tissue",
        )
    level = slide.best_level_for_downsample(scale)
    return Grid(
        region_coords=np.stack([rx[keep], ry[keep]], axis=1),
        region_tissue=region_frac[keep],
        patch_coords=np.stack([px[keep], py[keep]], axis=2),
        patch_fraction=patch_frac[keep],
        patch_tissue=patch_tissue[keep],
        region_size=cfg.region_size,
        patch_size=cfg.patch_size,
        region_size_level0=float(r0),
        patch_size_level0=float(p0),
        scale=float(scale),
        mpp_level0=float(slide.mpp),
        target_mpp=float(cfg.target_mpp),
        effective_mpp=eff,
        read_level=level,
        read_downsample=float(slide.level_downsamples[level]),
        level0_width=int(w),
        level0_height=int(h),
        n_candidates=int(rx.size),
    )

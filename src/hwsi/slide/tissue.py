"""Tissue mask from a low-resolution view of the slide.

Rule (all thresholds in :class:`TissueConfig`; saturation S and value V on OpenCV's 0–255 HSV scale):

1. **Brightfield check.** A brightfield slide (H&E, IHC) has a bright background or at least bright structures:
   if the 99th percentile of grey level is below ``dark_background_grey`` (default 100) the image is taken as
   fluorescence / dark-field and the slide fails with a :class:`~hwsi.errors.SlideError`.
2. **Saturation threshold.** Background glass is white/grey (low S); stained tissue is coloured. The threshold is
   Otsu's on S (pixels with V >= ``min_value``), clamped to [``min_saturation``, ``max_saturation``] so that an
   all-background view (Otsu splits noise) finds nothing and an all-tissue view (Otsu splits pale from dark
   tissue) keeps the pale tissue; faint tissue (S ≈ 20–40) passes the lower clamp.
3. **Not tissue:** pixels darker than ``min_value`` (black borders, out-of-focus debris, black ink) and, with
   ``pen_filter``, pen ink: green (hue 70°–190°, S >= 40), strong blue (hue 190°–250°, S >= 90 — hematoxylin is
   purple, hue 260°–320°) and deep red (hue >= 340° or <= 20°, S >= 110, V <= 200 — eosin is pink: paler, hue
   300°–340°).
4. **Morphology** at the mask's µm/px: closing (``close_um``), opening (``open_um``: removes lines and specks),
   objects smaller than ``min_object_um2`` removed, holes smaller than ``max_hole_um2`` filled (lumina, fat in
   tissue count as tissue).

The mask is computed at ``mask_mpp`` µm/px (default 16, like CLAM's segmentation level; finer when patches are small so a patch spans >= 8 mask
pixels), at most ``max_mask_side`` px on its longer side, read from the best pyramid level in bounded-memory chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hwsi.errors import SlideError
from hwsi.slide.levels import iter_downsampled, read_downsampled
from hwsi.slide.open import Slide


@dataclass
class TissueConfig:
    """Tissue detection settings (see the module docstring for the rule)."""

    mask_mpp: float = 16.0
    max_mask_side: int = 8192
    min_saturation: int = 25
    max_saturation: int = 45
    min_value: int = 80
    dark_background_grey: int = 100
    pen_filter: bool = True
    close_um: float = 32.0
    open_um: float = 16.0
    min_object_um2: float = 500.0
    max_hole_um2: float = 200_000.0


@dataclass
class TissueMask:
    """A tissue mask of the slide: ``mask[y, x]`` covers level-0 pixels ``[x*ds, (x+1)*ds) × [y*ds, (y+1)*ds)``."""

    mask: np.ndarray  # bool (h, w)
    downsample: float  # level-0 px per mask px
    thumbnail: np.ndarray  # small RGB uint8 view of the slide (for previews)
    saturation_threshold: float
    mask_mpp: float
    thumbnail_downsample: float = 1.0  # level-0 px per thumbnail px

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0



def _disk(radius_px: float) -> np.ndarray:
    import cv2

    r = max(1, int(round(radius_px)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _pixel_classes(rgb: np.ndarray, cfg: TissueConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel: saturation (uint8), lit (V >= min_value), pen ink (bool)."""
    import cv2

    hsv = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2HSV)
    sat = hsv[..., 1].copy()
    val = hsv[..., 2]
    lit = val >= cfg.min_value
    if cfg.pen_filter:
        hue = hsv[..., 0].astype(np.int16) * 2
        green = (hue >= 70) & (hue < 190) & (sat >= 40)
        blue = (hue >= 190) & (hue < 250) & (sat >= 90)
        red = ((hue >= 350) | (hue <= 20)) & (sat >= 120)
        pen = green | blue | red
    else:
        pen = np.zeros(sat.shape, bool)
    return sat, lit, pen


def _otsu_threshold(hist: np.ndarray, cfg: TissueConfig) -> float:
    """Otsu on a 256-bin saturation histogram, clamped to [min_saturation, max_saturation]."""
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total <= 0 or np.count_nonzero(hist) < 2:
        return float(cfg.max_saturation)
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    t = float(np.argmax(between[:-1])) + 0.5  # pixels > t are the upper class
    return float(min(max(t, cfg.min_saturation), cfg.max_saturation))


def _finish_mask(sat: np.ndarray, lit: np.ndarray, pen: np.ndarray, t: float, mask_mpp: float,
                 cfg: TissueConfig) -> np.ndarray:
    """Threshold, pen removal and morphology (see the module docstring)."""
    import cv2

    tissue = (sat >= t) & lit
    if pen.any():
        halo = cv2.dilate(pen.astype(np.uint8), _disk(8.0 / mask_mpp)).astype(bool)  # pen stroke edges
        tissue &= ~halo
    m = tissue.astype(np.uint8)
    del tissue
    m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, _disk(cfg.close_um / 2 / mask_mpp))
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, _disk(cfg.open_um / 2 / mask_mpp))
    px_area = mask_mpp * mask_mpp
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n > 1:
        keep = stats[:, cv2.CC_STAT_AREA] >= cfg.min_object_um2 / px_area
        keep[0] = False
        m = keep[lab].astype(np.uint8)
    del lab
    # fill holes: background components not touching the border and smaller than max_hole_um2
    inv = (m == 0).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    if n > 1:
        h, w = m.shape
        x, y, bw, bh, area = (stats[:, i] for i in range(5))
        border = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
        fill = (~border) & (area <= cfg.max_hole_um2 / px_area)
        if fill.any():
            m[fill[lab] & (inv == 1)] = 1
    return m.astype(bool)


def tissue_mask_from_rgb(rgb: np.ndarray, mask_mpp: float, cfg: TissueConfig | None = None) -> tuple[np.ndarray, float]:
    """Tissue mask (bool) of an RGB uint8 image whose pixels are ``mask_mpp`` µm wide; returns (mask, S threshold).

    Does not apply the brightfield check (see :func:`check_brightfield`).
    """
    cfg = cfg or TissueConfig()
    sat, lit, pen = _pixel_classes(rgb, cfg)
    hist = np.bincount(sat[lit].ravel(), minlength=256)
    t = _otsu_threshold(hist, cfg)
    return _finish_mask(sat, lit, pen, t, mask_mpp, cfg), t


def check_brightfield(path: str, grey_p99: float, cfg: TissueConfig | None = None) -> None:
    """Fail with SlideError if the image looks like fluorescence / dark-field (99th percentile grey too dark)."""
    cfg = cfg or TissueConfig()
    if grey_p99 < cfg.dark_background_grey:
        raise SlideError(
            path,
            f"looks like a fluorescence / dark-field image (99th percentile grey level {grey_p99:.0f} < "
            f"{cfg.dark_background_grey}: no bright background)",
            "hwsi processes RGB brightfield slides (H&E, IHC)",
        )


def mask_downsample_for(slide: Slide, cfg: TissueConfig, patch_size_level0: float | None = None) -> float:
    """Level-0 px per mask px: ``mask_mpp`` (finer if patches are small: >= 8 mask px per patch side), capped by
    ``max_mask_side``."""
    ds = max(1.0, cfg.mask_mpp / slide.mpp)
    if patch_size_level0 is not None:
        ds = min(ds, max(1.0, patch_size_level0 / 8.0))
    w, h = slide.dimensions
    ds = max(ds, max(w, h) / cfg.max_mask_side)
    return float(ds)


def compute_tissue(slide: Slide, cfg: TissueConfig | None = None, patch_size_level0: float | None = None,
                   thumbnail_side: int = 1024, threads: int = 1) -> TissueMask:
    """Tissue mask of ``slide``: brightfield check, saturation + Otsu, pen filter, morphology.

    Bounded memory: the mask-resolution RGB image is never held whole; chunks are reduced to saturation (uint8),
    lit and pen flags (bool) plus a small RGB thumbnail (longer side ``thumbnail_side``) kept for previews.
    """
    import cv2

    cfg = cfg or TissueConfig()
    ds = mask_downsample_for(slide, cfg, patch_size_level0)
    w0, h0 = slide.dimensions
    ow, oh = max(1, math.ceil(w0 / ds)), max(1, math.ceil(h0 / ds))
    sat = np.empty((oh, ow), np.uint8)
    lit = np.empty((oh, ow), bool)
    pen = np.empty((oh, ow), bool)
    tscale = min(1.0, thumbnail_side / max(ow, oh))
    tw, th = max(1, round(ow * tscale)), max(1, round(oh * tscale))
    thumb = np.full((th, tw, 3), 255, np.uint8)
    grey_hist = np.zeros(256, np.int64)
    sat_hist = np.zeros(256, np.int64)
    for ox, oy, img in iter_downsampled(slide, ds, threads=threads):
        h, w = img.shape[:2]
        s_, l_, p_ = _pixel_classes(img, cfg)
        sat[oy : oy + h, ox : ox + w] = s_
        lit[oy : oy + h, ox : ox + w] = l_
        pen[oy : oy + h, ox : ox + w] = p_
        sat_hist += np.bincount(s_[l_].ravel(), minlength=256)
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        grey_hist += np.bincount(grey.ravel(), minlength=256)
        tx0, ty0 = int(ox * tscale), int(oy * tscale)
        tx1, ty1 = min(tw, max(tx0 + 1, round((ox + w) * tscale))), min(th, max(ty0 + 1, round((oy + h) * tscale)))
        thumb[ty0:ty1, tx0:tx1] = cv2.resize(img, (tx1 - tx0, ty1 - ty0), interpolation=cv2.INTER_AREA)
    thumb_ds = max(1.0, max(w0, h0) / thumbnail_side)
    if thumb_ds < ds * 0.9:  # the mask is coarser than the wanted thumbnail: read the thumbnail on its own
        thumb = read_downsampled(slide, thumb_ds)
        tw, th = thumb.shape[1], thumb.shape[0]
    cdf = np.cumsum(grey_hist)
    p99 = float(np.searchsorted(cdf, 0.99 * cdf[-1]))
    check_brightfield(str(slide.path), p99, cfg)
    mask_mpp = slide.mpp * ds
    t = _otsu_threshold(sat_hist, cfg)
    mask = _finish_mask(sat, lit, pen, t, mask_mpp, cfg)
    return TissueMask(mask=mask, downsample=ds, thumbnail=thumb, saturation_threshold=t, mask_mpp=mask_mpp,
                      thumbnail_downsample=max(w0 / tw, h0 / th))

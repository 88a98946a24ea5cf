"""Built-in CPU nucleus segmentation for H&E (docs/design.md §5 "Cells", backend a).

Pipeline of :func:`segment_nuclei` (every length is given in µm and converted with the image's µm/px, so one
:class:`SegmentConfig` serves 0.25 and 0.5 µm/px alike):

1. colour deconvolution (Ruifrok & Johnston H&E-DAB matrix, as ``skimage.color.hed_from_rgb``) of the optical
   density to a haematoxylin (H) and an eosin (E) channel;
2. Gaussian smoothing of H (``smooth_um``);
3. a threshold on smoothed H: Otsu's threshold over the tile, never below the absolute floor ``min_h`` — a white
   or eosin-only tile has no H above the floor and gives 0 nuclei, not noise; optionally lowered locally
   (``local_offset``) where a nucleus is faint but clearly darker than its surroundings;
4. morphological opening, hole filling;
5. splitting of touching nuclei: a marker-controlled watershed on the smoothed distance transform, markers being
   the h-maxima (domes standing ``h_um`` above their saddle) of the smoothed distance transform; then
   (``merge_solidity`` < 1, off by default) adjacent pieces are merged back while their union stays convex, so a
   large or elongated nucleus with two distance-transform domes stays whole while touching nuclei, whose union
   has a waist, stay apart;
6. size (``min_area_um2``/``max_area_um2``) and shape (``min_solidity``) filters;
7. per-nucleus measurements (:mod:`hwsi.cells.morphology`) and outlines (:func:`instance_contours`: the outer
   boundary of each instance traced with ``cv2.findContours`` through the centres of its boundary pixels, then
   simplified by Douglas–Peucker within ``contour_tolerance_px`` (0.5 px: no traced boundary pixel lies farther
   than half a pixel from the stored outline)).

Two parameter sets: ``SegmentConfig()`` (the default every pipeline uses, chosen on the two tiles of
``../shared/data/nuclei``) and :func:`held_out_config` (chosen on 20 annotated tiles of two public datasets, checked
leave-one-tile-out, leave-one-dataset-out and on 35 tiles used for no choice; docs/cells.md has the measured table
and says when to run CellViT instead).
:func:`plain_watershed` is the baseline both are compared against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from skimage.segmentation import watershed

from hwsi.cells.morphology import convex_hull_areas, measure_nuclei
from hwsi.cells.nucleus_types import TypeRules
from hwsi.cells.watershed import merge_convex_pieces
from hwsi.errors import ConfigError, HwsiError

# Ruifrok & Johnston stain vectors (rows H, E, DAB), inverted: OD (·, 3) @ HED_FROM_RGB -> (H, E, DAB).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)
# Optical density of each 8-bit value, log10(255/max(v,1)) as in rgb2hed (which uses max(v, 1e-6)/255 after scaling).
_OD_LUT = (-np.log(np.maximum(np.arange(256, dtype=np.float64), 1.0) / 255.0) / np.log(10.0)).astype(np.float32)


@dataclass
class SegmentConfig:
    """Parameters of :func:`segment_nuclei`. Lengths in µm, areas in µm², densities in optical-density units."""

    smooth_um: float = 0.5  # Gaussian sigma applied to the H channel
    min_h: float = 0.12  # absolute floor of the H threshold (OD units of the H stain); empty tiles stay empty
    otsu_weight: float = 1.0  # threshold = max(min_h, otsu_weight * otsu)
    local_window_um: float = 12.0  # window of the local (adaptive) mean of H; 0 disables the local rule
    local_offset: float = 0.04  # a pixel is also nucleus if H > local mean + offset and H > min_h
    open_um: float = 0.5  # radius of the opening that removes specks and thin bridges
    dist_smooth_um: float = 0.5  # Gaussian sigma applied to the distance transform before finding markers
    h_um: float = 0.8  # a distance-transform dome must rise this much above its saddle to seed its own nucleus
    merge_solidity: float = 1.0  # merge adjacent watershed pieces whose union has at least this solidity; 1 disables
    min_area_um2: float = 4.0
    max_area_um2: float = 400.0
    min_solidity: float = 0.6
    min_chroma: float = 12.0  # mean (R+B)/2 - G inside a nucleus (8-bit units): rejects grey/black ink and dirt
    max_tile_px: int = 8192  # refuse larger inputs (call per patch/region)
    contour_tolerance_px: float = 0.5  # Douglas–Peucker tolerance of the stored outlines (pixels of the image)
    type_rules: "TypeRules" = field(default_factory=lambda: TypeRules())

    def validate(self) -> None:
        for name in ("smooth_um", "open_um", "dist_smooth_um", "h_um", "local_window_um", "min_area_um2"):
            if getattr(self, name) < 0:
                raise ConfigError(f"SegmentConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_area_um2 <= self.min_area_um2:
            raise ConfigError(f"SegmentConfig: need min_area_um2 < max_area_um2, got {self.min_area_um2}, "
                              f"{self.max_area_um2}")
        for name in ("min_solidity", "merge_solidity"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"SegmentConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.contour_tolerance_px < 0:
            raise ConfigError(f"SegmentConfig.contour_tolerance_px must be >= 0, got {self.contour_tolerance_px}")
        if self.max_tile_px < 1:
            raise ConfigError(f"SegmentConfig.max_tile_px must be >= 1, got {self.max_tile_px}")


def held_out_config() -> SegmentConfig:
    """The parameter set chosen on 20 annotated CPM-15 and GBM40 tiles (0.25 and 0.5 µm/px) by the grid of
    ``benchmarks/cells.py --select``, which also reruns the leave-one-out checks; docs/cells.md gives the held-out
    table. Not the pipeline default: switching it would change every pipeline's cells."""
    return SegmentConfig(**HELD_OUT_PARAMS)


# filled in from the leave-one-out selection (benchmarks/cells.py --select); every other field keeps its default
HELD_OUT_PARAMS: dict[str, float] = dict(
    smooth_um=0.5, min_h=0.08, otsu_weight=0.8, local_offset=0.0, h_um=0.3, merge_solidity=0.95,
    min_area_um2=6.0, max_area_um2=600.0,
)


@dataclass
class Nuclei:
    """Nuclei found in one image.

    ``labels``: (H, W) int32 instance image, 0 background, nucleus i has label i+1 (row i of table/features).
    ``table``: columnar per-nucleus measurements (see :data:`hwsi.cells.morphology.TABLE_COLUMNS`), each (N,).
    ``features``: (N, D) float32 standardised c_ijk vectors (see :data:`hwsi.cells.morphology.FEATURE_NAMES`).
    ``mpp``: µm per pixel of the image.
    ``contours``: N outlines, (k, 2) float64 x, y image pixels (open rings), or None where none were traced.
    """

    labels: np.ndarray
    table: dict[str, np.ndarray]
    features: np.ndarray
    mpp: float
    contours: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])


def _odd(n: float, minimum: int = 3) -> int:
    k = max(minimum, int(round(n)))
    return k if k % 2 == 1 else k + 1


def check_rgb(rgb: np.ndarray, what: str = "image") -> np.ndarray:
    """Validate an RGB(A) uint8 image; return an (H, W, 3) contiguous uint8 view/copy."""
    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise HwsiError(f"{what}: expected an (H, W, 3) RGB image, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise HwsiError(f"{what}: expected uint8 pixels, got {a.dtype}")
    return np.ascontiguousarray(a[..., :3])


def stain_channels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin optical densities (float32 (H, W) each) by Ruifrok colour deconvolution."""
    rgb = check_rgb(rgb)
    od = _OD_LUT[rgb]  # (H, W, 3)
    h = od @ HED_FROM_RGB[:, 0]
    e = od @ HED_FROM_RGB[:, 1]
    return np.maximum(h, 0.0).astype(np.float32, copy=False), np.maximum(e, 0.0).astype(np.float32, copy=False)


def _otsu(values: np.ndarray, nbins: int = 128) -> float:
    """Otsu's threshold of a 1-D float sample (histogram over its range)."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-6:
        return hi
    hist, edges = np.histogram(values, bins=nbins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between[:-1]))])


def foreground_mask(h_smooth: np.ndarray, mpp: float, cfg: SegmentConfig) -> np.ndarray:
    """Binary nucleus mask from the smoothed H channel (steps 3–4)."""
    if h_smooth.size == 0 or float(h_smooth.max()) <= cfg.min_h:
        return np.zeros(h_smooth.shape, dtype=bool)
    t = max(cfg.min_h, cfg.otsu_weight * _otsu(h_smooth.ravel()))
    mask = h_smooth > t
    if cfg.local_window_um > 0 and cfg.local_offset > 0:
        k = _odd(cfg.local_window_um / mpp)
        local_mean = cv2.blur(h_smooth, (k, k), borderType=cv2.BORDER_REFLECT)
        mask |= (h_smooth > local_mean + cfg.local_offset) & (h_smooth > cfg.min_h)
    r = cfg.open_um / mpp
    if r >= 0.75:
        k = _odd(2 * r + 1)
        se = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        mask = cv2.morphologyEx(mask.view(np.uint8), cv2.MORPH_OPEN, se).astype(bool)
    return fill_holes(mask)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions not connected to the image border (4-connected background), via one flood fill."""
    inv = np.pad(~mask, 1, constant_values=True).astype(np.uint8)
    ff_mask = np.zeros((inv.shape[0] + 2, inv.shape[1] + 2), np.uint8)
    cv2.floodFill(inv, ff_mask, (0, 0), 2, flags=4)
    return (inv != 2)[1:-1, 1:-1]


def reconstruct_by_dilation(seed: np.ndarray, limit: np.ndarray, max_iter: int = 10_000) -> np.ndarray:
    """Greyscale morphological reconstruction by dilation of ``seed`` under ``limit`` (8-connected).

    Iterated 3×3 dilation clipped by ``limit`` until stable: for nucleus-sized domes it converges in about as many
    steps as the widest nucleus is in pixels, far faster here than the general-purpose skimage implementation.
    """
    cur = np.minimum(seed, limit).astype(np.float32)
    lim = limit.astype(np.float32, copy=False)
    kernel = np.ones((3, 3), np.uint8)
    for _ in range(max(1, max_iter // 4)):
        prev = cur
        for _ in range(4):
            cur = np.minimum(cv2.dilate(cur, kernel), lim)
        if np.array_equal(cur, prev):
            break
    return cur


def split_touching(mask: np.ndarray, mpp: float, cfg: SegmentConfig) -> np.ndarray:
    """Instance labels from a binary mask: marker-controlled watershed on the distance transform (step 5)."""
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32)
    m8 = mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8)
    dist = cv2.distanceTransform(np.pad(m8, 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    sigma = cfg.dist_smooth_um / mpp
    dist_s = cv2.GaussianBlur(dist, (0, 0), sigma) if sigma >= 0.3 else dist
    # markers: the h-maxima of dist_s (domes that rise at least h above the saddle to any higher dome)
    h = min(cfg.h_um / mpp, 0.5 * float(dist_s.max()))
    peaks = ((dist_s - reconstruct_by_dilation(dist_s - h, dist_s)) > h - 1e-3) & mask
    n_markers, markers = cv2.connectedComponents(peaks.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    comp_n, comp = cv2.connectedComponents(m8, connectivity=8, ltype=cv2.CV_32S)
    # every connected component gets at least one marker (small blobs with no maximum)
    has = np.zeros(comp_n, dtype=bool)
    has[comp[markers > 0]] = True
    missing = np.flatnonzero(~has[1:]) + 1
    if len(missing):
        # seed each marker-less component at its distance maximum
        flat_comp = comp.ravel()
        order = np.lexsort((-dist.ravel(), flat_comp))
        first = np.searchsorted(flat_comp[order], missing)
        idx = order[first]
        mflat = markers.ravel()
        mflat[idx] = n_markers + np.arange(len(missing), dtype=np.int32)
    labels = watershed(-dist_s, markers, mask=mask).astype(np.int32, copy=False)
    if cfg.merge_solidity < 1:
        labels = merge_convex_pieces(labels, cfg.merge_solidity)
    return labels


def filter_instances(
    labels: np.ndarray, rgb: np.ndarray, mpp: float, cfg: SegmentConfig
) -> np.ndarray:
    """Drop instances outside the area range, below the solidity floor or not purple enough (``min_chroma``:
    haematoxylin is blue-purple, pen ink and dust are grey); relabel 1..N in raster order (step 6)."""
    if labels.max() == 0:
        return labels
    n = int(labels.max())
    area = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64) * mpp * mpp
    keep = (area >= cfg.min_area_um2) & (area <= cfg.max_area_um2)
    keep[0] = False
    if cfg.min_solidity > 0 and keep.any():
        hull = convex_hull_areas(labels, n)
        solidity = np.divide(area / (mpp * mpp), hull, out=np.ones_like(hull), where=hull > 0)
        keep &= solidity >= cfg.min_solidity
    if cfg.min_chroma > 0 and keep.any():
        c = rgb.astype(np.float32)
        chroma = (c[..., 0] + c[..., 2]) * 0.5 - c[..., 1]
        mean_chroma = np.bincount(labels.ravel(), weights=chroma.ravel(), minlength=n + 1) / np.maximum(
            area / (mpp * mpp), 1
        )
        keep &= mean_chroma >= cfg.min_chroma
    lut = np.zeros(n + 1, dtype=np.int32)
    # relabel in order of first appearance (raster order) so output is deterministic
    present = np.flatnonzero(keep)
    if len(present) == 0:
        return np.zeros_like(labels)
    flat = labels.ravel()
    first = np.full(n + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, flat, np.arange(flat.size, dtype=np.int64))
    ordered = present[np.argsort(first[present], kind="stable")]
    lut[ordered] = np.arange(1, len(ordered) + 1, dtype=np.int32)
    return lut[labels]


def segment_labels(rgb: np.ndarray, mpp: float, cfg: SegmentConfig | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1–6: return (labels int32, H, E) without measuring the nuclei."""
    cfg = cfg or SegmentConfig()
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise HwsiError(f"segment_nuclei: mpp must be a positive number of µm per pixel, got {mpp!r}")
    rgb = check_rgb(rgb)
    if max(rgb.shape[:2]) > cfg.max_tile_px:
        raise HwsiError(
            f"segment_nuclei: image {rgb.shape[1]}×{rgb.shape[0]} exceeds max_tile_px={cfg.max_tile_px}; "
            "segment it patch by patch"
        )
    h, e = stain_channels(rgb)
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        return np.zeros(rgb.shape[:2], dtype=np.int32), h, e
    s = cfg.smooth_um / mpp
    h_s = cv2.GaussianBlur(h, (0, 0), s) if s >= 0.3 else h
    mask = foreground_mask(h_s, mpp, cfg)
    labels = split_touching(mask, mpp, cfg)
    labels = filter_instances(labels, rgb, mpp, cfg)
    return labels, h, e


def segment_nuclei(rgb: np.ndarray, mpp: float, cfg: SegmentConfig | None = None) -> Nuclei:
    """Segment the nuclei of an H&E RGB uint8 image at ``mpp`` µm/px and measure each one.

    Returns :class:`Nuclei` (instance labels, columnar table, (N, D) standardised features).
    Raises :class:`HwsiError` on a non-RGB / non-uint8 image, a non-positive mpp or a bad config.
    """
    cfg = cfg or SegmentConfig()
    cfg.validate()
    labels, h, e = segment_labels(rgb, mpp, cfg)
    table, feats = measure_nuclei(labels, h, e, mpp, cfg.type_rules)
    return Nuclei(labels=labels, table=table, features=feats, mpp=float(mpp),
                  contours=instance_contours(labels, cfg.contour_tolerance_px))


def instance_contours(labels: np.ndarray, tolerance_px: float = 0.5) -> list[np.ndarray]:
    """Outline of each instance 1..N of ``labels``: (k, 2) float64 x, y (pixel indices: the centres of its outer
    boundary pixels, as ``cv2.findContours`` traces them), the largest outer boundary where an instance has several
    pieces, simplified by Douglas–Peucker within ``tolerance_px``; at least 3 vertices where the instance has them."""
    from scipy import ndimage as ndi

    n = int(labels.max()) if labels.size else 0
    out: list[np.ndarray] = []
    if n == 0:
        return out
    for i, sl in enumerate(ndi.find_objects(labels, max_label=n), start=1):
        if sl is None:
            out.append(np.zeros((0, 2)))
            continue
        crop = np.pad((labels[sl] == i).astype(np.uint8), 1)
        found, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        c = max(found, key=cv2.contourArea) if found else np.zeros((0, 1, 2), np.int32)
        if tolerance_px > 0 and len(c) > 3:
            simple = cv2.approxPolyDP(c, tolerance_px, True)
            c = simple if len(simple) >= 3 else c
        xy = c.reshape(-1, 2).astype(np.float64) + (sl[1].start - 1, sl[0].start - 1)
        out.append(xy)
    return out


def plain_watershed(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Baseline instance labels: Otsu on the smoothed H channel, 1-px opening, hole filling, Euclidean distance
    transform, one marker per local maximum at least 2 µm from any higher one, watershed, drop pieces < 4 µm².

    The few-minutes textbook method every built-in parameter set must beat (benchmarks/cells.py).
    """
    from skimage.feature import peak_local_max

    h, _ = stain_channels(rgb)
    if h.size == 0 or float(h.max()) <= 0:
        return np.zeros(h.shape, dtype=np.int32)
    h_s = cv2.GaussianBlur(h, (0, 0), 0.5 / mpp)
    mask = (h_s > _otsu(h_s.ravel())).view(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3)))
    mask = fill_holes(mask.astype(bool))
    dist = cv2.distanceTransform(np.pad(mask.view(np.uint8), 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    _, comp = cv2.connectedComponents(mask.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    peaks = peak_local_max(dist, min_distance=max(1, int(round(2.0 / mpp))), labels=comp, exclude_border=False)
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    labels = watershed(-dist, markers, mask=mask).astype(np.int32, copy=False)
    small = np.bincount(labels.ravel()) * mpp * mpp < 4.0
    small[0] = False
    labels[small[labels]] = 0
    return labels

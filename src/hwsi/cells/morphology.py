"""Per-nucleus measurements (the table) and the standardised cell vector c_ijk (the features).

Everything is computed for all nuclei at once with ``np.bincount`` over the label image (no per-object Python
loop except one ``cv2.convexHull`` call per nucleus), so measuring a 256² patch costs a few milliseconds.

Table columns (:data:`TABLE_COLUMNS`), each an (N,) array, row i ↔ label i+1:

=================  =======  ============================================================================
x, y               float64  centroid in image pixels (column, row)
area_um2           float32  pixel count × mpp²
perimeter_um       float32  crack length (4-neighbour boundary edges) × π/4 × mpp — unbiased for discs
eccentricity       float32  of the ellipse with the same second moments (0 circle → 1 line)
solidity           float32  area / convex-hull area; hull area of the pixel centres + half its perimeter + 1
                            (Pick's theorem, so a convex digital shape scores ≈ 1)
major_axis_um      float32  4·sqrt(λ1)·mpp (skimage convention), minor_axis_um 4·sqrt(λ2)·mpp
minor_axis_um      float32
orientation        float32  angle of the major axis to the image x axis, radians in (-π/2, π/2]
mean_h, std_h      float32  haematoxylin optical density inside the nucleus
mean_e, std_e      float32  eosin optical density inside the nucleus
texture_grad       float32  mean gradient magnitude of H inside the nucleus (OD per µm)
texture_lvar       float32  mean local variance of H in a ~1 µm window inside the nucleus (chromatin texture)
nn_dist_um         float32  distance to the nearest other nucleus centroid in the same image (50 µm if none)
n_neighbors        float32  number of other centroids within 15 µm
type               int8     rule-based type (:data:`hwsi.cells.nucleus_types.TYPE_NAMES`)
type_prob          float32  membership of the chosen type (see :class:`hwsi.cells.nucleus_types.TypeRules`)
=================  =======  ============================================================================

Features (:data:`FEATURE_NAMES`, D = :data:`FEATURE_DIM` = 22, float32): each raw value (log for sizes) minus a
fixed centre, divided by a fixed scale (:data:`FEATURE_CENTER`/:data:`FEATURE_SCALE`, the pooled mean/std measured
once on the real annotated H&E tiles at 0.25 and 0.5 µm/px), then clipped to [-5, 5]; the last 4 are the one-hot type. Fixed constants
(not per-image statistics) keep a nucleus's vector independent of the patch it was found in.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from hwsi.cells.nucleus_types import TypeRules, classify_types

TABLE_COLUMNS: tuple[str, ...] = (
    "x", "y", "area_um2", "perimeter_um", "eccentricity", "solidity", "major_axis_um", "minor_axis_um",
    "orientation", "mean_h", "std_h", "mean_e", "std_e", "texture_grad", "texture_lvar", "nn_dist_um",
    "n_neighbors", "type", "type_prob",
)

FEATURE_NAMES: tuple[str, ...] = (
    "log_area_um2", "log_perimeter_um", "log_major_axis_um", "log_minor_axis_um", "eccentricity", "solidity",
    "circularity", "log_aspect_ratio", "mean_h", "std_h", "mean_e", "std_e", "texture_grad", "texture_lvar",
    "log_nn_dist_um", "n_neighbors", "type_prob", "mean_od",
    "type_unknown", "type_small_round", "type_large_atypical", "type_elongated",
)
FEATURE_DIM = len(FEATURE_NAMES)

# Reference centre / scale of the 18 continuous features (type one-hots use centre 0, scale 1): the pooled mean and
# standard deviation over the 554 nuclei the default segmenter finds on the two real annotated tiles of the test
# data (nuclei image01 at 0.5 µm/px and image08 at 0.25 µm/px), rounded; `benchmarks/cells.py` reprints them.
FEATURE_CENTER = np.array(
    [3.05, 2.96, 2.01, 1.34, 0.80, 0.89, 0.73, 0.68, 0.47, 0.23, 0.29, 0.14, 0.43, 0.041, 2.16, 3.5, 0.74, 0.75,
     0.0, 0.0, 0.0, 0.0],
    dtype=np.float64,
)
FEATURE_SCALE = np.array(
    [0.70, 0.43, 0.46, 0.38, 0.15, 0.07, 0.18, 0.41, 0.17, 0.10, 0.06, 0.084, 0.16, 0.035, 0.32, 2.0, 0.15, 0.18,
     1.0, 1.0, 1.0, 1.0],
    dtype=np.float64,
)

NN_NONE_UM = 50.0
NEIGHBOR_RADIUS_UM = 15.0


def convex_hull_areas(labels: np.ndarray, n: int | None = None) -> np.ndarray:
    """Digital convex-hull area (pixels) of labels 0..n (index 0 unused): hull of pixel centres + P/2 + 1."""
    n = int(labels.max()) if n is None else n
    out = np.zeros(n + 1, dtype=np.float64)
    if n == 0:
        return out
    flat = labels.ravel()
    fg = np.flatnonzero(flat)
    order = fg[np.argsort(flat[fg], kind="stable")]
    sorted_lab = flat[order]
    starts = np.searchsorted(sorted_lab, np.arange(1, n + 2))
    w = labels.shape[1]
    ys = (order // w).astype(np.int32)
    xs = (order % w).astype(np.int32)
    for lab in range(1, n + 1):
        a, b = starts[lab - 1], starts[lab]
        if b - a == 0:
            continue
        if b - a < 3:
            out[lab] = b - a
            continue
        pts = np.stack([xs[a:b], ys[a:b]], axis=1)
        hull = cv2.convexHull(pts)
        out[lab] = cv2.contourArea(hull) + cv2.arcLength(hull, True) / 2.0 + 1.0
    return out


def _crack_lengths(labels: np.ndarray, n: int) -> np.ndarray:
    """Number of 4-neighbour edges between each label and anything else (including the image border)."""
    pad = np.pad(labels, 1)
    counts = np.zeros(n + 1, dtype=np.int64)
    for a, b in ((pad[1:, :], pad[:-1, :]), (pad[:, 1:], pad[:, :-1])):
        diff = a != b
        counts += np.bincount(a[diff], minlength=n + 1)
        counts += np.bincount(b[diff], minlength=n + 1)
    return counts


def _neighbors(x: np.ndarray, y: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    n = len(x)
    if n < 2:
        return np.full(n, NN_NONE_UM, dtype=np.float32), np.zeros(n, dtype=np.float32)
    if n <= 2000:
        d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :]) * mpp
        np.fill_diagonal(d, np.inf)
        nn = d.min(axis=1)
        cnt = (d <= NEIGHBOR_RADIUS_UM).sum(axis=1)
    else:
        from scipy.spatial import cKDTree

        pts = np.stack([x, y], axis=1) * mpp
        tree = cKDTree(pts)
        dd, _ = tree.query(pts, k=2)
        nn = dd[:, 1]
        cnt = np.array([len(v) - 1 for v in tree.query_ball_point(pts, NEIGHBOR_RADIUS_UM)])
    return np.minimum(nn, NN_NONE_UM).astype(np.float32), cnt.astype(np.float32)


def empty_table() -> dict[str, np.ndarray]:
    """A table with every column and zero rows."""
    t = {c: np.zeros(0, dtype=np.float32) for c in TABLE_COLUMNS}
    t["x"] = np.zeros(0, dtype=np.float64)
    t["y"] = np.zeros(0, dtype=np.float64)
    t["type"] = np.zeros(0, dtype=np.int8)
    return t


def measure_nuclei(
    labels: np.ndarray, h: np.ndarray, e: np.ndarray, mpp: float, rules: TypeRules | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Measure every nucleus of ``labels`` (1..N consecutive) → (table, features (N, D) float32)."""
    rules = rules or TypeRules()
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return empty_table(), np.zeros((0, FEATURE_DIM), dtype=np.float32)
    hh, ww = labels.shape
    fg = np.flatnonzero(labels.ravel())  # only nucleus pixels take part in the per-label sums
    flat = labels.ravel()[fg]
    yf = (fg // ww).astype(np.float64)
    xf = (fg % ww).astype(np.float64)

    def bsum(w: np.ndarray | None) -> np.ndarray:
        return np.bincount(flat, weights=w, minlength=n + 1)[1:]

    cnt = bsum(None)
    if np.any(cnt == 0):
        raise ValueError("measure_nuclei: labels must be consecutive 1..N")
    mx = bsum(xf) / cnt
    my = bsum(yf) / cnt
    # central second moments via raw moments
    mxx = bsum(xf * xf) / cnt - mx * mx
    myy = bsum(yf * yf) / cnt - my * my
    mxy = bsum(xf * yf) / cnt - mx * my
    tr = mxx + myy
    det_term = np.sqrt(np.maximum(((mxx - myy) / 2) ** 2 + mxy**2, 0.0))
    l1 = np.maximum(tr / 2 + det_term, 0.0)
    l2 = np.maximum(tr / 2 - det_term, 0.0)
    major = 4 * np.sqrt(l1) * mpp
    minor = 4 * np.sqrt(l2) * mpp
    ecc = np.sqrt(np.clip(1 - np.divide(l2, l1, out=np.ones_like(l1), where=l1 > 0), 0, 1))
    orient = 0.5 * np.arctan2(2 * mxy, mxx - myy)

    area_px = cnt
    area = area_px * mpp * mpp
    perim = _crack_lengths(labels, n)[1:] * (math.pi / 4) * mpp
    hull = convex_hull_areas(labels, n)[1:]
    solidity = np.clip(np.divide(area_px, hull, out=np.ones_like(hull), where=hull > 0), 0, 1)

    hf = h.ravel()[fg].astype(np.float64)
    ef = e.ravel()[fg].astype(np.float64)
    mean_h = bsum(hf) / cnt
    std_h = np.sqrt(np.maximum(bsum(hf * hf) / cnt - mean_h**2, 0))
    mean_e = bsum(ef) / cnt
    std_e = np.sqrt(np.maximum(bsum(ef * ef) / cnt - mean_e**2, 0))
    gx = cv2.Sobel(h, cv2.CV_32F, 1, 0, ksize=3) / 8.0
    gy = cv2.Sobel(h, cv2.CV_32F, 0, 1, ksize=3) / 8.0
    grad = np.sqrt(gx * gx + gy * gy).ravel()[fg].astype(np.float64) / mpp
    texture_grad = bsum(grad) / cnt
    k = max(3, int(round(1.0 / mpp)) | 1)
    m1 = cv2.blur(h, (k, k))
    m2 = cv2.blur(h * h, (k, k))
    lvar = np.maximum(m2 - m1 * m1, 0).ravel()[fg].astype(np.float64)
    texture_lvar = bsum(lvar) / cnt
    nn, nb = _neighbors(mx, my, mpp)
    aspect = np.divide(major, minor, out=np.full_like(major, 10.0), where=minor > 0)
    aspect = np.clip(aspect, 1.0, 10.0)
    ntype, tprob = classify_types(area, ecc, solidity, aspect, rules)

    f32 = np.float32
    table: dict[str, np.ndarray] = {
        "x": mx,
        "y": my,
        "area_um2": area.astype(f32),
        "perimeter_um": perim.astype(f32),
        "eccentricity": ecc.astype(f32),
        "solidity": solidity.astype(f32),
        "major_axis_um": major.astype(f32),
        "minor_axis_um": minor.astype(f32),
        "orientation": orient.astype(f32),
        "mean_h": mean_h.astype(f32),
        "std_h": std_h.astype(f32),
        "mean_e": mean_e.astype(f32),
        "std_e": std_e.astype(f32),
        "texture_grad": texture_grad.astype(f32),
        "texture_lvar": texture_lvar.astype(f32),
        "nn_dist_um": nn,
        "n_neighbors": nb,
        "type": ntype,
        "type_prob": tprob,
    }
    return table, features_from_table(table)


def features_from_table(table: dict[str, np.ndarray]) -> np.ndarray:
    """The standardised (N, :data:`FEATURE_DIM`) float32 c_ijk vectors of a nucleus table."""
    raw = raw_features(table)
    z = (raw - FEATURE_CENTER) / FEATURE_SCALE
    return np.clip(z, -5.0, 5.0).astype(np.float32)


def raw_features(table: dict[str, np.ndarray]) -> np.ndarray:
    """The (N, :data:`FEATURE_DIM`) float64 feature values before standardisation (order :data:`FEATURE_NAMES`)."""
    n = len(table["area_um2"])
    if n == 0:
        return np.zeros((0, FEATURE_DIM), dtype=np.float64)
    area = table["area_um2"].astype(np.float64)
    perim = np.maximum(table["perimeter_um"].astype(np.float64), 1e-3)
    major = np.maximum(table["major_axis_um"].astype(np.float64), 1e-3)
    minor = np.maximum(table["minor_axis_um"].astype(np.float64), 1e-3)
    circ = np.clip(4 * math.pi * area / perim**2, 0, 1.5)
    mean_od = table["mean_h"].astype(np.float64) + table["mean_e"].astype(np.float64)
    cont = np.stack(
        [
            np.log(np.maximum(area, 1e-3)),
            np.log(perim),
            np.log(major),
            np.log(minor),
            table["eccentricity"],
            table["solidity"],
            circ,
            np.log(np.clip(major / minor, 1.0, 10.0)),
            table["mean_h"],
            table["std_h"],
            table["mean_e"],
            table["std_e"],
            table["texture_grad"],
            table["texture_lvar"],
            np.log(np.maximum(table["nn_dist_um"].astype(np.float64), 0.1)),
            table["n_neighbors"],
            table["type_prob"],
            mean_od,
        ],
        axis=1,
    ).astype(np.float64)
    onehot = np.zeros((n, 4), dtype=np.float64)
    onehot[np.arange(n), np.clip(table["type"].astype(np.int64), 0, 3)] = 1.0
    return np.concatenate([cont, onehot], axis=1)

"""Regions read from a level finer than the target, straight into their ``(G, P, P, 3)`` patch buffer.

Two paths, chosen by :func:`hwsi.slide.reader.read_region_pixels` for tiled-TIFF slides (docs/slide.md, "Reading"):

* **DCT-scaled** (:func:`read_dct_region`): where the downsample from the read level is within the µm/px tolerance
  of 2 or 4 (a 0.25 µm/px slide read at 0.5), JPEG tiles are decoded at 1/2 or 1/4 in the DCT domain
  (:mod:`hwsi.slide.jpeg_tiles`; simplejpeg, else full decode + exact means), each straight into its patch slot
  (or copied from a small reused buffer into the patches it covers): less work than a full decode. When
  the scaled box is not exactly ``region_size`` (the downsample is 2.02, say) it is assembled and resized the rest
  of the way (INTER_AREA shrinking, INTER_LINEAR enlarging).
* **Strips** (:func:`read_strip_patches`, level px per output px ``r`` in (1, 2], e.g. 1.9 for 0.2631 → 0.5
  µm/px): every covering tile is decoded once, a tile row at a time, into a strip of the box (rows still needed are
  carried over); new rows are smoothed with a 3×3 Gaussian of σ = 0.35·√(r² − 1) (fixed-point, replicated border at
  the box edges only) and sampled bilinearly, output pixel ``j`` at box coordinate ``(j + 0.5)·r − 0.5``: in bands
  of ``q`` output rows (``q`` = the denominator of ``lh / s``, at most ``MAX_BAND_ROWS``) that start on whole box
  rows, one ``cv2.resize`` per band, otherwise ``cv2.warpAffine`` per tile row. The result equals one smoothing +
  resample of the whole box (within 1 grey level) and approximates INTER_AREA (accepted: mean |diff| ≤ 3, 99th
  percentile ≤ 16 grey levels; measured ≈ 0.8 / 7 on a noise texture) at about half the cost of the whole-box
  path. Integer ratios (``lw = lh = q·s``) are shrunk with INTER_AREA per strip of whole ``q``-row groups: exactly
  INTER_AREA of the whole box. Memory: two strips of (one band + one tile row) × box width × 3 bytes per thread,
  whatever the slide size.
"""

from __future__ import annotations

import math
import threading
from fractions import Fraction

import numpy as np

from hwsi.slide.jpeg_tiles import put_rect, read_box, read_box_patches, read_scaled
from hwsi.slide.levels import CorruptTile
from hwsi.slide.open import Slide

STRIP_MAX_RATIO = 2.0  # beyond it a 3x3 smoothing is too narrow: the reader resizes the whole box with INTER_AREA
MAX_BAND_ROWS = 1024  # output rows of one exact resize band at most (else warpAffine per tile row)
_CARRY = 8  # raw rows kept from the previous tile row (bilinear taps + the smoothing's neighbours + margin)
_local = threading.local()


def strip_applies(lw: int, lh: int, s: int) -> bool:
    """Whether :func:`read_strip_patches` reads an ``lw × lh`` box into ``s × s``: an integer ratio, or at most
    ``STRIP_MAX_RATIO`` level px per output px."""
    return (lw == lh and lw % s == 0 and lw > s) or (s < max(lw, lh) <= STRIP_MAX_RATIO * s and min(lw, lh) >= s)


def smoothing_sigma(ratio: float) -> float:
    """σ of the 3×3 Gaussian applied before bilinear sampling at ``ratio`` level px per output px."""
    return 0.35 * math.sqrt(max(0.0, ratio * ratio - 1.0))


def _buffer(name: str, shape: tuple[int, int, int]) -> np.ndarray:
    buf = getattr(_local, name, None)
    if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:]:
        buf = np.empty(shape, np.uint8)
        setattr(_local, name, buf)
    return buf


def _taps(s: int, ratio: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest source row (clamped to ``[0, n)``) each output row's bilinear sample may touch, with a
    margin for warpAffine's 1/32-px fixed-point coordinates."""
    y = (np.arange(s) + 0.5) * ratio - 0.5
    lo = np.clip(np.floor(y - 0.05).astype(np.int64), 0, n - 1)
    hi = np.clip(np.floor(y + 0.05).astype(np.int64) + 1, 0, n - 1)
    return lo, hi


def _warp_rows(src: np.ndarray, top: int, j0: int, j1: int, rx: float, ry: float, grid5: np.ndarray,
               p: int) -> None:
    """Output rows ``[j0, j1)`` sampled from ``src`` (box rows from ``top``) into the patch grid, patch by patch."""
    import cv2

    g = grid5.shape[0]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    for r in range(j0 // p, (j1 - 1) // p + 1):
        a, b = max(j0, r * p), min(j1, (r + 1) * p)
        ty = (a + 0.5) * ry - 0.5 - top
        for c in range(g):
            m = np.array([[rx, 0.0, (c * p + 0.5) * rx - 0.5], [0.0, ry, ty]])
            cv2.warpAffine(src, m, (p, b - a), dst=grid5[r, c, a - r * p : b - r * p], flags=flags,
                           borderMode=cv2.BORDER_REPLICATE)


def read_strip_patches(slide: Slide, level: int, lx: int, ly: int, lw: int, lh: int, s: int, p: int,
                       out: np.ndarray, fast_upsample: bool = True) -> list[CorruptTile]:
    """Fill ``out`` ``(G, P, P, 3)`` with the ``lw × lh`` box at ``(lx, ly)`` of ``level`` resampled to ``s × s``
    (module docstring, "Strips"); returns the corrupt tiles met (black)."""
    import cv2

    assert slide.tiff_levels is not None
    tl = slide.tiff_levels[level]
    g = s // p
    grid5 = out.reshape(g, g, p, p, 3)
    if lw == lh and lw % s == 0:
        return _read_integer_strips(slide, level, lx, ly, lw // s, s, p, grid5)
    rx, ry = lw / s, lh / s
    sigma = smoothing_sigma(max(rx, ry))
    th = tl.tile_height
    # bands of q output rows start on whole box rows (q = denominator of lh / s): one cv2.resize per band samples
    # exactly where a resize of the whole box would; else (q large) warpAffine per tile row, any offset
    q = Fraction(lh, s).denominator
    q = q if q <= MAX_BAND_ROWS else 1
    cap = int(math.ceil(q * ry)) + th + _CARRY + 2
    raw = _buffer("raw", (cap, lw, 3))
    smooth = _buffer("smooth", (cap, lw, 3)) if sigma > 0.1 else None
    tap_lo, tap_hi = _taps(s, ry, lh)
    bad: list[CorruptTile] = []
    top = n = j = y = 0  # box row of raw[0], rows held, next output row, next box row to decode
    while y < lh:
        y1 = min(lh, ((ly + y) // th + 1) * th - ly)  # end of this tile row (or of the box)
        keep = max(top, int(tap_lo[j]) - 2) if j < s else top + n  # first row still needed (with context)
        if keep > top:
            raw[: n - (keep - top)] = raw[keep - top : n]
            if smooth is not None:
                smooth[: n - (keep - top)] = smooth[keep - top : n]
            top, n = keep, n - (keep - top)
        bad += read_box(slide, tl, level, lx, ly + y, lw, y1 - y, 1, raw[n : n + y1 - y], fast_upsample)
        n_old, n, y = n, n + y1 - y, y1
        src = raw[:n]
        if smooth is not None:  # smooth the new rows and the one above them (it now has its lower neighbour)
            a = max(0, n_old - 2)
            kept = smooth[a].copy()  # row a was smoothed with its upper neighbour: recomputing here would lose it
            cv2.GaussianBlur(raw[a:n], (3, 3), sigma, dst=smooth[a:n], borderType=cv2.BORDER_REPLICATE)
            if a > 0:
                smooth[a] = kept
            src = smooth[:n]
        valid_lo = top if top == 0 else top + 1  # rows whose smoothing saw both neighbours (or the box edge)
        valid_hi = y if y == lh else y - 1
        j_end = j
        while j_end < s and tap_lo[j_end] >= valid_lo and tap_hi[j_end] < valid_hi:
            j_end += 1
        if q > 1 and j_end < s:
            j_end -= j_end % q
        if j_end <= j:
            continue
        if q > 1:
            y0 = (j * lh) // s - top  # a whole row: j is a multiple of q
            rows = min(n - y0, int(math.ceil((j_end - j) * ry)) + 1)
            band = cv2.resize(src[y0 : y0 + rows], None, fx=s / lw, fy=s / lh, interpolation=cv2.INTER_LINEAR)
            put_rect(grid5, p, j, 0, j_end - j, s, band[: j_end - j, :s])
        else:
            _warp_rows(src, top, j, j_end, rx, ry, grid5, p)
        j = j_end
    assert j == s, f"strip resampler produced {j} of {s} rows"
    return bad


def _read_integer_strips(slide: Slide, level: int, lx: int, ly: int, q: int, s: int, p: int,
                         grid5: np.ndarray) -> list[CorruptTile]:
    """Integer ratio ``q``: whole groups of ``q`` box rows, a tile row at a time, shrunk with INTER_AREA (exact
    ``q × q`` means, so equal to one INTER_AREA of the whole box)."""
    import cv2

    assert slide.tiff_levels is not None
    tl = slide.tiff_levels[level]
    lw = q * s
    th = tl.tile_height
    raw = _buffer("raw", (th + q, lw, 3))
    small = _buffer("small", (th // q + 2, s, 3))
    bad: list[CorruptTile] = []
    n = j = y = 0
    while y < lw:
        y1 = min(lw, ((ly + y) // th + 1) * th - ly)
        bad += read_box(slide, tl, level, lx, ly + y, lw, y1 - y, 1, raw[n : n + y1 - y])
        n, y = n + y1 - y, y1
        m = n // q
        if m:
            part = cv2.resize(raw[: m * q], (s, m), dst=small[:m], interpolation=cv2.INTER_AREA)
            put_rect(grid5, p, j, 0, m, s, part)
            j += m
            raw[: n - m * q] = raw[m * q : n]
            n -= m * q
    return bad


def read_dct_region(slide: Slide, level: int, k: int, lx: int, ly: int, lw: int, lh: int, s: int, p: int,
                    out: np.ndarray) -> tuple[np.ndarray | None, list[CorruptTile]]:
    """The box read at ``1/k`` (DCT-scaled): ``(None, bad)`` with ``out`` ``(G, P, P, 3)`` filled when the scaled
    box is ``s × s``, else ``(image, bad)``: the scaled box resized to ``s × s``."""
    import cv2

    assert slide.tiff_levels is not None
    tl = slide.tiff_levels[level]
    bx, by = int(round(lx / k)), int(round(ly / k))
    bw, bh = max(1, int(round(lw / k))), max(1, int(round(lh / k)))
    if bw != s or bh != s:
        img, bad = read_scaled(slide, level, k, bx, by, bw, bh)
        interp = cv2.INTER_AREA if bw > s else cv2.INTER_LINEAR
        return cv2.resize(img, (s, s), interpolation=interp), bad
    return None, read_box_patches(slide, tl, level, bx, by, s, k, p, out)

"""Pixels of one pyramid level: a box read from the best source, and the whole slide downsampled in chunks.

The lowest layer of :mod:`hwsi.slide` but for the tile decoders of :mod:`hwsi.slide.jpeg_tiles`:
:mod:`hwsi.slide.open` (``Slide.thumbnail``), :mod:`hwsi.slide.tissue` (tissue masks) and :mod:`hwsi.slide.reader`
(regions) read through it. A box of a tiled-TIFF level is decoded
tile by tile with ``os.pread`` (imagecodecs JPEG, or the page's own decoder); other slides go through the
backend's ``read_region``. Outside the level is white; corrupt tiles are black and reported as
``(level, col, row)`` (see :mod:`hwsi.slide.reader` for the full reading contract).
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from hwsi.errors import SlideError
from hwsi.slide.jpeg_tiles import CorruptTile, dct_factor_for, read_scaled

if TYPE_CHECKING:  # annotations only: hwsi.slide.open imports this module (Slide.thumbnail)
    from hwsi.slide.open import Slide, TiffLevel

_FALLBACK_BLOCK = 512


def _read_tiff_box(slide: Slide, tl: TiffLevel, level: int, lx: int, ly: int, lw: int, lh: int,
                   out: np.ndarray) -> list[CorruptTile]:
    from imagecodecs import jpeg8_decode

    fd = slide.raw_fd()
    jpeg = tl.jpeg_colorspace
    tw, th = tl.tile_width, tl.tile_height
    ntx = tl.tiles_across
    x_end, y_end = min(lx + lw, tl.width), min(ly + lh, tl.height)
    bad: list[CorruptTile] = []
    if x_end <= max(lx, 0) or y_end <= max(ly, 0):
        return bad
    for ty in range(max(ly, 0) // th, (y_end - 1) // th + 1):
        for tx in range(max(lx, 0) // tw, (x_end - 1) // tw + 1):
            idx = ty * ntx + tx
            # intersection of the tile with the box, in level px
            ix0, iy0 = max(lx, tx * tw), max(ly, ty * th)
            ix1, iy1 = min(x_end, (tx + 1) * tw), min(y_end, (ty + 1) * th)
            dst = out[iy0 - ly : iy1 - ly, ix0 - lx : ix1 - lx]
            off, n = int(tl.offsets[idx]), int(tl.bytecounts[idx])
            if n == 0 or off == 0:
                dst[...] = 255  # sparse TIFF: no tile stored = background, as OpenSlide does
                continue
            try:
                data = os.pread(fd, n, off)
                if len(data) != n:
                    raise ValueError(f"truncated tile: {len(data)} of {n} bytes")
                if jpeg is not None:  # direct libjpeg-turbo decode (tifffile's generic decoder is ~1.5x slower)
                    seg = jpeg8_decode(data, tables=tl.jpegtables, colorspace=jpeg[0], outcolorspace=jpeg[1])
                else:
                    seg = tl.decode(data, idx, jpegtables=tl.jpegtables)[0]
                if seg is None:
                    raise ValueError("tile decoded to nothing")
                seg = seg.reshape(seg.shape[-3], seg.shape[-2], -1)
                dst[...] = seg[iy0 - ty * th : iy1 - ty * th, ix0 - tx * tw : ix1 - tx * tw, :3]
            except Exception:  # noqa: BLE001 - any decode failure is a corrupt tile: recorded, never white
                dst[...] = 0
                bad.append((level, tx, ty))
    return bad


def _read_backend_box(slide: Slide, level: int, lx: int, ly: int, lw: int, lh: int,
                      out: np.ndarray) -> list[CorruptTile]:
    ds = slide.level_downsamples[level]

    def read(bx: int, by: int, bw: int, bh: int) -> np.ndarray:
        return slide.read_region(int(round(bx * ds)), int(round(by * ds)), level, bw, bh)

    try:
        out[...] = read(lx, ly, lw, lh)
        return []
    except Exception:  # noqa: BLE001 - localise the failure below
        slide.reopen_handle()
    bad: list[CorruptTile] = []
    b = _FALLBACK_BLOCK
    for by in range(ly - ly % b, ly + lh, b):
        for bx in range(lx - lx % b, lx + lw, b):
            x0, y0 = max(bx, lx), max(by, ly)
            x1, y1 = min(bx + b, lx + lw), min(by + b, ly + lh)
            dst = out[y0 - ly : y1 - ly, x0 - lx : x1 - lx]
            try:
                dst[...] = read(x0, y0, x1 - x0, y1 - y0)
            except Exception:  # noqa: BLE001
                slide.reopen_handle()
                dst[...] = 0
                bad.append((level, bx // b, by // b))
    return bad


def read_level_box(slide: Slide, level: int, lx: int, ly: int, lw: int, lh: int,
                   fast_path: bool = True) -> tuple[np.ndarray, list[CorruptTile]]:
    """RGB uint8 ``(lh, lw, 3)`` of ``level`` pixels ``[lx, lx+lw) × [ly, ly+lh)`` and the corrupt tiles met.

    Pixels outside the level are white.
    """
    out = np.empty((lh, lw, 3), np.uint8)
    lw_, lh_ = slide.level_dimensions[level]
    if lx < 0 or ly < 0 or lx + lw > lw_ or ly + lh > lh_:
        out[...] = 255
        # read only the inside part; the rest stays white
        ix0, iy0 = max(lx, 0), max(ly, 0)
        ix1, iy1 = min(lx + lw, lw_), min(ly + lh, lh_)
        if ix1 <= ix0 or iy1 <= iy0:
            return out, []
        inner = out[iy0 - ly : iy1 - ly, ix0 - lx : ix1 - lx]
        sub, bad = read_level_box(slide, level, ix0, iy0, ix1 - ix0, iy1 - iy0, fast_path)
        inner[...] = sub
        return out, bad
    if fast_path and slide.tiff_levels is not None:
        return out, _read_tiff_box(slide, slide.tiff_levels[level], level, lx, ly, lw, lh, out)
    return out, _read_backend_box(slide, level, lx, ly, lw, lh, out)


def iter_downsampled(slide: Slide, downsample: float, chunk: int = 2048, threads: int = 1,
                     dct: bool = False) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(ox, oy, rgb)`` chunks of the slide at ``downsample`` (level-0 px per output px).

    Chunks tile the ``ceil(W/ds) × ceil(H/ds)`` output; each is read from the best pyramid level (at most about
    ``chunk``² level pixels at once) and resized with INTER_AREA; ``threads`` chunks are read at a time. With
    ``dct`` (thumbnails: no resolution rule binds) a JPEG-tiled level needed at 2× or 4× down or more is decoded at
    1/2 or 1/4 in the DCT domain first (:mod:`hwsi.slide.jpeg_tiles`; within its stated bound of decode + resize).
    """
    import cv2

    w0, h0 = slide.dimensions
    ow, oh = max(1, math.ceil(w0 / downsample)), max(1, math.ceil(h0 / downsample))
    level = slide.best_level_for_downsample(downsample)
    lw, lh = slide.level_dimensions[level]
    sx, sy = w0 / lw, h0 / lh  # per-axis level downsample
    step = max(1, int(chunk * min(sx, sy) / downsample))  # output px per chunk side
    k = dct_factor_for(slide, level, downsample / max(sx, sy)) if dct and min(lw, lh) >= 64 else 1

    def read(box: tuple[int, int]) -> tuple[int, int, np.ndarray]:
        ox, oy = box
        ow_c, oh_c = min(step, ow - ox), min(step, oh - oy)
        lx0 = min(lw - 1, int(ox * downsample / sx))
        ly0 = min(lh - 1, int(oy * downsample / sy))
        lx1 = max(lx0 + 1, min(lw, math.ceil((ox + ow_c) * downsample / sx)))
        ly1 = max(ly0 + 1, min(lh, math.ceil((oy + oh_c) * downsample / sy)))
        if k > 1:  # the box at 1/k, inside the scaled level (floor(W / k) px wide)
            bx0, by0 = min(lw // k - 1, lx0 // k), min(lh // k - 1, ly0 // k)
            bx1, by1 = max(bx0 + 1, min(lw // k, -(-lx1 // k))), max(by0 + 1, min(lh // k, -(-ly1 // k)))
            img, bad = read_scaled(slide, level, k, bx0, by0, bx1 - bx0, by1 - by0)
        else:
            img, bad = read_level_box(slide, level, lx0, ly0, lx1 - lx0, ly1 - ly0)
        if bad:
            raise SlideError(slide.path, f"corrupt tile(s) in the low-resolution level {level}: {bad[:5]}")
        if img.shape[:2] != (oh_c, ow_c):
            img = cv2.resize(img, (ow_c, oh_c), interpolation=cv2.INTER_AREA)
        return ox, oy, img

    boxes = [(ox, oy) for oy in range(0, oh, step) for ox in range(0, ow, step)]
    if threads <= 1 or len(boxes) <= 1:
        for b in boxes:
            yield read(b)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: collections.deque = collections.deque()
        it = iter(boxes)
        for b in it:
            pending.append(pool.submit(read, b))
            if len(pending) >= 2 * threads:
                break
        while pending:
            res = pending.popleft().result()
            nb = next(it, None)
            if nb is not None:
                pending.append(pool.submit(read, nb))
            yield res


def read_downsampled(slide: Slide, downsample: float, chunk: int = 2048, dct: bool = False) -> np.ndarray:
    """The whole slide at ``downsample`` as one RGB uint8 array (``ceil(W/ds) × ceil(H/ds)``); ``dct``: see
    :func:`iter_downsampled`."""
    w0, h0 = slide.dimensions
    ow, oh = max(1, math.ceil(w0 / downsample)), max(1, math.ceil(h0 / downsample))
    out = np.empty((oh, ow, 3), np.uint8)
    for ox, oy, img in iter_downsampled(slide, downsample, chunk, dct=dct):
        out[oy : oy + img.shape[0], ox : ox + img.shape[1]] = img
    return out

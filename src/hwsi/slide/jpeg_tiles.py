"""Tiles of a tiled-TIFF level decoded once each into a caller's buffer, at full size or 1/2, 1/4 in the DCT domain.

* **Full size**: imagecodecs ``jpeg8_decode`` (libjpeg-turbo) with the page's JPEG tables and colour spaces into a
  reused per-thread tile buffer, or the page's own decoder for other codecs; the same pixels as
  :mod:`hwsi.slide.levels`.
* **Scaled** (``k`` = 2 or 4, JPEG levels whose JPEG colour space is RGB or left to libjpeg): libjpeg-turbo's DCT
  scaling through simplejpeg (``decode_jpeg(min_height=, min_width=)`` picks the scale ``1/k``; ``strict=True``,
  written into the caller's buffer). A TIFF JPEG tile is an abbreviated stream (its tables live in the page's
  ``JPEGTables``): the stream decoded is SOI + (for an RGB-coded level) an Adobe APP14 marker with transform 0, so
  libjpeg does not take the components for YCbCr + the tables + the tile. Pixel ``(r, c)`` of the scaled level is
  about the mean of level pixels ``[rk, rk+k) × [ck, ck+k)``; its width and height are ``floor(W / k)``,
  ``floor(H / k)`` (the last partial column would mix in the writer's tile padding).
  **Fallback**: where simplejpeg is not installed (it is a default dependency, but optional) or a tile does not
  decode with it (strict mode raises on a truncated tile, say), the tile is decoded at full size and shrunk by
  exact ``k × k`` means (INTER_AREA): decode-then-resize itself. Accepted bound of the DCT-scaled pixels against
  decode + INTER_AREA (tests/test_slide_resampled.py, real H&E tiles of ../shared/data): mean |diff| ≤ 1.5 and
  99th percentile ≤ 12 grey levels. Measured: the SVS's own RGB-coded tiles at 1/2 mean 0.09, p99 2 (max 19); the
  same pixels as YCbCr 4:2:0 (quality 90) at 1/2 0.82, 9 (max 39), at 1/4 0.42, 4 (max 14).
* Outside the level is white, sparse tiles (offset or byte count 0) white, corrupt tiles black and listed as
  ``(level, col, row)`` of the level's tile grid (see :mod:`hwsi.slide.reader`).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only (hwsi.slide.open imports hwsi.slide.levels, which imports this module)
    from hwsi.slide.open import Slide, TiffLevel

CorruptTile = tuple[int, int, int]  # (level, col, row) of a tile (fast path) or 512-px block (fallback)

_JCS_RGB = 2
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # APP14, transform 0: components are R, G, B
_local = threading.local()


def dct_scalable(tl: TiffLevel, k: int) -> bool:
    """Whether the tiles of ``tl`` decode at ``1/k`` (k in 2, 4) in the DCT domain: 8-bit JPEG decoded to RGB from
    RGB (or the colour space libjpeg infers), tile sides multiples of ``8 k``."""
    cs = tl.jpeg_colorspace
    return (k in (2, 4) and cs is not None and tl.compression == 7 and cs[1] == _JCS_RGB
            and cs[0] in (None, _JCS_RGB) and tl.tile_width % (8 * k) == 0 and tl.tile_height % (8 * k) == 0)


def _stream(tl: TiffLevel, data: bytes) -> bytes:
    """A complete JPEG stream for an abbreviated TIFF tile (tables spliced in, RGB flagged when the level says so)."""
    tables = tl.jpegtables[2:-2] if tl.jpegtables else b""
    adobe = _ADOBE_RGB if tl.jpeg_colorspace is not None and tl.jpeg_colorspace[0] == _JCS_RGB else b""
    return b"\xff\xd8" + adobe + tables + data[2:]


@functools.cache
def simplejpeg_module() -> ModuleType | None:
    """simplejpeg, or None where it is not installed (scaled decodes then take the fallback: full decode + means)."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def _tile_buffer(name: str, h: int, w: int) -> np.ndarray:
    buf = getattr(_local, name, None)
    if buf is None or buf.shape != (h, w, 3):
        buf = np.empty((h, w, 3), np.uint8)
        setattr(_local, name, buf)
    return buf


def decode_tile(tl: TiffLevel, data: bytes, idx: int, k: int = 1, out: np.ndarray | None = None,
                fast_upsample: bool = False) -> np.ndarray:
    """RGB ``(h, w, 3)`` of one stored tile at ``1/k`` (1, or 2/4 where :func:`dct_scalable`); raises on corrupt
    data. At ``k = 1`` a JPEG tile is decoded into this thread's reused buffer (valid until the next call); with
    ``fast_upsample`` (for pixels that are resampled and smoothed next) by simplejpeg with libjpeg-turbo's fast
    chroma upsampling (subsampled chroma replicated, merged with the colour conversion) where it takes the tile.
    At ``k > 1`` the result is written into ``out`` (a C-contiguous ``(th/k, tw/k, 3)`` uint8 array) when given,
    else into a second reused per-thread buffer; simplejpeg's DCT scaling, else (missing, or the tile fails with
    it) the full decode shrunk by exact ``k × k`` means (module docstring, "Fallback")."""
    if k == 1:
        jpeg = tl.jpeg_colorspace
        if jpeg is not None:
            buf = _tile_buffer("tile", tl.tile_height, tl.tile_width)
            sj = simplejpeg_module() if fast_upsample else None
            if sj is not None:
                try:
                    sj.decode_jpeg(_stream(tl, data), colorspace="RGB", fastupsample=True, buffer=buf, strict=True)
                    return buf
                except Exception:  # noqa: BLE001 - not a 3-sample RGB decode, or damaged: imagecodecs decides
                    pass
            from imagecodecs import jpeg8_decode

            try:
                return jpeg8_decode(data, tables=tl.jpegtables, colorspace=jpeg[0], outcolorspace=jpeg[1], out=buf)
            except Exception:  # noqa: BLE001 - not a 3-sample decode (or corrupt): decode without a buffer below
                seg = jpeg8_decode(data, tables=tl.jpegtables, colorspace=jpeg[0], outcolorspace=jpeg[1])
        else:
            seg = tl.decode(data, idx, jpegtables=tl.jpegtables)[0]
        if seg is None:
            raise ValueError("tile decoded to nothing")
        return seg.reshape(seg.shape[-3], seg.shape[-2], -1)[..., :3]
    h, w = tl.tile_height // k, tl.tile_width // k
    if out is None:
        out = _tile_buffer("scaled", h, w)
    sj = simplejpeg_module()
    if sj is not None:
        try:
            img = sj.decode_jpeg(_stream(tl, data), colorspace="RGB", min_height=h, min_width=w, buffer=out,
                                 strict=True)
            if img.shape == (h, w, 3):
                return out
        except Exception:  # noqa: BLE001 - truncated / corrupt / unsupported: the full decode decides below
            pass
    import cv2

    full = decode_tile(tl, data, idx, 1)
    cv2.resize(full, (w, h), dst=out, interpolation=cv2.INTER_AREA)
    return out


def put_rect(grid5: np.ndarray, p: int, y0: int, x0: int, h: int, w: int, src: np.ndarray | int) -> None:
    """Write ``src`` (an ``(h, w, ≥3)`` array or a grey value) at region pixel ``(y0, x0)`` of the patch-layout grid
    ``grid5`` ``(g, g, P, P, 3)``, split along patch borders."""
    y1, x1 = y0 + h, x0 + w
    for r in range(y0 // p, (y1 - 1) // p + 1):
        py0, py1 = max(y0, r * p), min(y1, (r + 1) * p)
        for c in range(x0 // p, (x1 - 1) // p + 1):
            px0, px1 = max(x0, c * p), min(x1, (c + 1) * p)
            dst = grid5[r, c, py0 - r * p : py1 - r * p, px0 - c * p : px1 - c * p]
            if isinstance(src, np.ndarray):
                dst[...] = src[py0 - y0 : py1 - y0, px0 - x0 : px1 - x0, :3]
            else:
                dst[...] = src


def covering_tiles(tiles_across: int, tw: int, th: int, width: int, height: int, bx: int, by: int, bw: int,
                   bh: int) -> Iterator[tuple[int, int, int, int, int, int, int]]:
    """The tiles (side ``tw`` × ``th``, ``tiles_across`` per row) covering the part of the box ``(bx, by, bw, bh)``
    inside a ``width`` × ``height`` level, all in the same px: ``(tx, ty, idx, ix0, iy0, ix1, iy1)``, the tile's
    column, row and index and its intersection with that part; nothing when the box lies outside."""
    x_beg, y_beg = max(bx, 0), max(by, 0)
    x_end, y_end = min(bx + bw, width), min(by + bh, height)
    if x_end <= x_beg or y_end <= y_beg:
        return
    for ty in range(y_beg // th, (y_end - 1) // th + 1):
        for tx in range(x_beg // tw, (x_end - 1) // tw + 1):
            yield (tx, ty, ty * tiles_across + tx, max(x_beg, tx * tw), max(y_beg, ty * th),
                   min(x_end, (tx + 1) * tw), min(y_end, (ty + 1) * th))


def read_tile_bytes(fd: int, offset: int, n: int) -> bytes:
    """The ``n`` stored bytes of a tile at ``offset``; a short read is a truncated (corrupt) tile: ValueError."""
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise ValueError(f"truncated tile: {len(data)} of {n} bytes")
    return data


def read_box(slide: Slide, tl: TiffLevel, level: int, bx: int, by: int, bw: int, bh: int, k: int,
             out: np.ndarray, fast_upsample: bool = False) -> list[CorruptTile]:
    """Fill ``out`` ``(bh, bw, 3)`` with the box at ``(bx, by)`` of ``level`` scaled by ``1/k`` (box in scaled px):
    each covering tile decoded once (``fast_upsample``: see :func:`decode_tile`), white outside, sparse tiles
    white, corrupt tiles black (returned)."""
    fd = slide.raw_fd()
    tw, th = tl.tile_width // k, tl.tile_height // k  # tile side in scaled px
    width, height = (tl.width, tl.height) if k == 1 else (tl.width // k, tl.height // k)
    if bx < 0 or by < 0 or bx + bw > width or by + bh > height:
        out.fill(255)
    bad: list[CorruptTile] = []
    for tx, ty, idx, ix0, iy0, ix1, iy1 in covering_tiles(tl.tiles_across, tw, th, width, height, bx, by, bw, bh):
        dst = out[iy0 - by : iy1 - by, ix0 - bx : ix1 - bx]
        off, n = int(tl.offsets[idx]), int(tl.bytecounts[idx])
        if n == 0 or off == 0:
            dst[...] = 255  # sparse TIFF: no tile stored = background
            continue
        try:
            seg = decode_tile(tl, read_tile_bytes(fd, off, n), idx, k, fast_upsample=fast_upsample)
            dst[...] = seg[iy0 - ty * th : iy1 - ty * th, ix0 - tx * tw : ix1 - tx * tw]
        except Exception:  # noqa: BLE001 - any decode failure is a corrupt tile: recorded, never white
            dst[...] = 0
            bad.append((level, tx, ty))
    return bad


def read_box_patches(slide: Slide, tl: TiffLevel, level: int, bx: int, by: int, s: int, k: int, p: int,
                     out: np.ndarray) -> list[CorruptTile]:
    """Fill ``out`` ``(G, P, P, 3)`` with the ``s × s`` box at ``(bx, by)`` of ``level`` at ``1/k`` (box in scaled
    px), straight in patch layout: each covering tile decoded once, into its patch's slot when the scaled tile is
    exactly one aligned patch inside the level, else into a small reused buffer copied into the patches it covers.
    Same pixels as :func:`read_box` + slicing: white outside and for sparse tiles, corrupt tiles black (returned)."""
    g = s // p
    grid5 = out.reshape(g, g, p, p, 3)
    fd = slide.raw_fd()
    tw, th = tl.tile_width // k, tl.tile_height // k
    width, height = (tl.width, tl.height) if k == 1 else (tl.width // k, tl.height // k)
    if bx < 0 or by < 0 or bx + s > width or by + s > height:
        out.fill(255)
    bad: list[CorruptTile] = []
    whole = k > 1 and tw == p and th == p  # (decode_tile writes into ``out`` only when scaled)
    for tx, ty, idx, ix0, iy0, ix1, iy1 in covering_tiles(tl.tiles_across, tw, th, width, height, bx, by, s, s):
        ry, rx, h, w = iy0 - by, ix0 - bx, iy1 - iy0, ix1 - ix0  # in region px
        off, n = int(tl.offsets[idx]), int(tl.bytecounts[idx])
        if n == 0 or off == 0:
            put_rect(grid5, p, ry, rx, h, w, 255)  # sparse TIFF: no tile stored = background
            continue
        slot = out[(ry // p) * g + rx // p] if whole and h == th and w == tw and ry % p == 0 and rx % p == 0 \
            else None
        try:
            seg = decode_tile(tl, read_tile_bytes(fd, off, n), idx, k, out=slot)
            if slot is not None:
                continue
            seg = seg[iy0 - ty * th : iy1 - ty * th, ix0 - tx * tw : ix1 - tx * tw]
            r, c = ry // p, rx // p
            if (ry + h - 1) // p == r and (rx + w - 1) // p == c:  # inside one patch (a 1/2 tile of a 256 patch)
                out[r * g + c, ry - r * p : ry - r * p + h, rx - c * p : rx - c * p + w] = seg
            else:
                put_rect(grid5, p, ry, rx, h, w, seg)
        except Exception:  # noqa: BLE001 - any decode failure is a corrupt tile: recorded, never white
            put_rect(grid5, p, ry, rx, h, w, 0)
            bad.append((level, tx, ty))
    return bad


def read_scaled(slide: Slide, level: int, k: int, bx: int, by: int, bw: int,
                bh: int) -> tuple[np.ndarray, list[CorruptTile]]:
    """RGB ``(bh, bw, 3)`` of ``level`` at ``1/k`` (``k`` from :func:`dct_factor_for`) and the corrupt tiles met."""
    assert slide.tiff_levels is not None
    out = np.empty((bh, bw, 3), np.uint8)
    return out, read_box(slide, slide.tiff_levels[level], level, bx, by, bw, bh, k, out)


def dct_factor_for(slide: Slide, level: int, downsample: float, tolerance: float = 0.0) -> int:
    """The DCT scale ``k`` (4, 2 or 1) for reading ``level`` at ``downsample`` (level px per output px).

    With ``tolerance`` 0 (viewer tiles, no resolution rule): the largest ``k <= downsample``. Otherwise (regions at
    a target µm/px): ``k`` with ``|downsample / k - 1| <= tolerance``, so the result is never coarser than the
    target beyond the grid's µm/px tolerance.
    """
    if slide.tiff_levels is None:
        return 1
    tl = slide.tiff_levels[level]
    for k in (4, 2):
        ok = downsample >= k * (1 - 1e-9) if tolerance == 0 else abs(downsample / k - 1) <= tolerance
        if ok and dct_scalable(tl, k):
            return k
    return 1

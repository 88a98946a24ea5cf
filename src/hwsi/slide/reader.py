"""Read regions once from the best pyramid level and slice them into patches; streaming, bounded memory.

Reading a region (see ../shared/MACHINE-FACTS.md for the costs measured here):

* The level is ``slide.best_level_for_downsample(scale)`` where ``scale`` = target µm/px ÷ level-0 µm/px (1 when
  the slide is within the grid's µm/px tolerance of the target); the region's box on that level is read and, when
  its size differs from ``region_size``, resized with INTER_AREA (shrinking) or INTER_LINEAR (enlarging). When
  ``scale == 1`` and the level is 0 no resampling happens: the pixels are the stored ones. Region boxes are rounded
  to whole pixels of the read level, so a resampled region may be offset by < 1 pixel of that level.
* **Fast path** for slides whose every level is a tiled TIFF page (generic TIFF, Aperio SVS, tiffslide-opened tiled
  TIFFs): the tiles covering the box are read with ``os.pread`` and decoded directly (tifffile's page decoder:
  imagecodecs JPEG with the page's JPEG tables, or deflate/LZW/...), then assembled — no ARGB conversion.
* **Fallback** (other formats, strip TIFFs): the backend's ``read_region`` with one handle per thread.
* Outside the slide is white (background), as OpenSlide's transparent pixels composited on white.
* **Corrupt tiles** (decode error, truncated data; in the fallback a failed read, localised to 512-px blocks) are
  filled with BLACK (never white), listed as ``(level, col, row)`` in :attr:`RegionPixels.corrupt_tiles`, flagged
  in :attr:`RegionPixels.corrupt_patches`, and counted per slide: past ``ReaderConfig.max_corrupt_tiles`` the
  iterator raises :class:`~hwsi.errors.SlideError` naming them. A failed OpenSlide handle is reopened (after a
  corrupt JPEG, every later read on it fails).

:func:`iter_regions` reads regions on ``threads`` worker threads and yields them in grid order, with at most
``queue_size`` (default ``2 × threads``) regions decoded but not yet consumed, so memory does not grow with the slide.
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from hwsi.errors import SlideError
from hwsi.slide.grid import Grid
from hwsi.slide.open import Slide, TiffLevel

CorruptTile = tuple[int, int, int]  # (level, col, row) of a tile (fast path) or 512-px block (fallback)
_FALLBACK_BLOCK = 512


@dataclass
class ReaderConfig:
    """Region reading settings."""

    max_corrupt_tiles: int = 4  # per slide; one more fails the slide with a SlideError
    queue_size: int | None = None  # regions decoded ahead of the consumer (default 2 × threads)
    fast_path: bool = True  # decode TIFF tiles directly when possible


@dataclass
class RegionPixels:
    """One region at the target µm/px and its patches (row-major grid)."""

    index: int
    coords: tuple[int, int]  # level-0 x, y
    image: np.ndarray  # (S, S, 3) uint8
    patch_size: int
    corrupt_tiles: list[CorruptTile] = field(default_factory=list)
    corrupt_patches: np.ndarray | None = None  # (G,) bool, patches touching a corrupt tile

    @property
    def grid_side(self) -> int:
        return self.image.shape[0] // self.patch_size

    @property
    def patch_grid(self) -> np.ndarray:
        """View ``(g, g, P, P, 3)``: ``patch_grid[row, col]`` is a patch (no copy)."""
        g, p = self.grid_side, self.patch_size
        return self.image.reshape(g, p, g, p, 3).swapaxes(1, 2)

    @property
    def patches(self) -> np.ndarray:
        """``(G, P, P, 3)`` patches, row-major (one contiguous copy of the region)."""
        g, p = self.grid_side, self.patch_size
        return np.ascontiguousarray(self.patch_grid).reshape(g * g, p, p, 3)

    def patch(self, g: int) -> np.ndarray:
        """Patch ``g`` (row-major) as a view."""
        r, c = divmod(g, self.grid_side)
        return self.patch_grid[r, c]


# ---- low level: a box of one level ------------------------------------------------------------------------------


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


# ---- regions ----------------------------------------------------------------------------------------------------


def region_level_box(slide: Slide, grid: Grid, x: int, y: int) -> tuple[int, int, int, int]:
    """The box ``(lx, ly, lw, lh)`` on ``grid.read_level`` that covers the region at level-0 (x, y)."""
    level = grid.read_level
    w0, h0 = slide.dimensions
    lw_, lh_ = slide.level_dimensions[level]
    sx, sy = w0 / lw_, h0 / lh_
    if grid.resample_free:
        return int(round(x / sx)), int(round(y / sy)), grid.region_size, grid.region_size
    lx, ly = int(round(x / sx)), int(round(y / sy))
    lw = max(1, int(round(grid.region_size_level0 / sx)))
    lh = max(1, int(round(grid.region_size_level0 / sy)))
    return lx, ly, lw, lh


def read_region_pixels(slide: Slide, grid: Grid, index: int, fast_path: bool = True) -> RegionPixels:
    """Read region ``index`` of ``grid`` once and return it at the target µm/px."""
    import cv2

    x, y = (int(v) for v in grid.region_coords[index])
    lx, ly, lw, lh = region_level_box(slide, grid, x, y)
    img, bad = read_level_box(slide, grid.read_level, lx, ly, lw, lh, fast_path)
    s = grid.region_size
    if img.shape[:2] != (s, s):
        interp = cv2.INTER_AREA if lw > s else cv2.INTER_LINEAR
        img = cv2.resize(img, (s, s), interpolation=interp)
    corrupt_patches = None
    if bad:
        corrupt_patches = _corrupt_patch_mask(slide, grid, bad, lx, ly, lw, lh)
    return RegionPixels(index, (x, y), img, grid.patch_size, bad, corrupt_patches)


def _corrupt_patch_mask(slide: Slide, grid: Grid, bad: list[CorruptTile], lx: int, ly: int, lw: int,
                        lh: int) -> np.ndarray:
    g, p, s = grid.grid_side, grid.patch_size, grid.region_size
    mask = np.zeros((g, g), bool)
    for level, cx, cy in bad:
        if slide.tiff_levels is not None:
            tl = slide.tiff_levels[level]
            tw, th = tl.tile_width, tl.tile_height
        else:
            tw = th = _FALLBACK_BLOCK
        # tile rect in region px
        x0 = (cx * tw - lx) * s / lw
        x1 = ((cx + 1) * tw - lx) * s / lw
        y0 = (cy * th - ly) * s / lh
        y1 = ((cy + 1) * th - ly) * s / lh
        c0, c1 = max(0, int(math.floor(x0 / p))), min(g, int(math.ceil(x1 / p)))
        r0, r1 = max(0, int(math.floor(y0 / p))), min(g, int(math.ceil(y1 / p)))
        mask[r0:r1, c0:c1] = True
    return mask.ravel()


def iter_regions(
    slide: Slide,
    grid: Grid,
    cfg: ReaderConfig | None = None,
    threads: int = 2,
    indices: Sequence[int] | None = None,
) -> Iterator[RegionPixels]:
    """Yield the regions of ``grid`` (all, or ``indices``) in order, read on ``threads`` threads.

    At most ``cfg.queue_size`` (default ``2 × threads``) regions are in flight. Raises SlideError once the slide's
    corrupt tiles exceed ``cfg.max_corrupt_tiles``.
    """
    cfg = cfg or ReaderConfig()
    order = list(range(grid.n_regions)) if indices is None else [int(i) for i in indices]
    threads = max(1, int(threads))
    depth = max(1, cfg.queue_size or 2 * threads)
    seen_bad: list[CorruptTile] = []
    pending: collections.deque[Future[RegionPixels]] = collections.deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="hwsi-read") as pool:
        it = iter(order)
        try:
            for i in it:
                pending.append(pool.submit(read_region_pixels, slide, grid, i, cfg.fast_path))
                if len(pending) >= depth:
                    break
            while pending:
                rp = pending.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(read_region_pixels, slide, grid, nxt, cfg.fast_path))
                if rp.corrupt_tiles:
                    seen_bad.extend(rp.corrupt_tiles)
                    if len(seen_bad) > cfg.max_corrupt_tiles:
                        raise SlideError(
                            slide.path,
                            f"{len(seen_bad)} corrupt tiles (more than max_corrupt_tiles={cfg.max_corrupt_tiles}); "
                            f"first (level, col, row): {seen_bad[:8]}",
                            "the file is damaged; re-export or re-copy it",
                        )
                yield rp
        finally:
            for f in pending:
                f.cancel()

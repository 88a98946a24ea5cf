"""Read regions once from the best pyramid level and slice them into patches; streaming, bounded memory.

Reading a region (see docs/machine-facts.md for the costs measured here):

* The level is ``slide.best_level_for_downsample(scale)`` where ``scale`` = target µm/px ÷ level-0 µm/px (1 when
  the slide is within the grid's µm/px tolerance of the target); the region's box on that level is read and, when
  its size differs from ``region_size``, resized with INTER_AREA (shrinking) or INTER_LINEAR (enlarging). When
  ``scale == 1`` and the level is 0 no resampling happens: the pixels are the stored ones. Region boxes are rounded
  to whole pixels of the read level, so a resampled region may be offset by < 1 pixel of that level.
* **Fast path** for slides whose every level is a tiled TIFF page (generic TIFF, Aperio SVS, tiffslide-opened tiled
  TIFFs): the tiles covering the box are read with ``os.pread`` and decoded directly (tifffile's page decoder:
  imagecodecs JPEG with the page's JPEG tables, or deflate/LZW/...), then assembled — no ARGB conversion.
* **Direct patch path** (fast path, no resampling): each region is produced straight in patch layout, a
  ``(G, P, P, 3)`` buffer: a JPEG tile that is exactly one patch (tile side = patch side, tile grid aligned with the
  patch grid, tile inside the level) is decoded by libjpeg-turbo *into its patch's slot*; other tiles (240-px SVS
  tiles, 512-px tiles, border tiles, non-JPEG) are decoded to a small temporary and copied into the patches they
  cover. No region image is assembled and :attr:`RegionPixels.patches` is that buffer (no copy); the row-major
  :attr:`RegionPixels.image` is assembled only when asked for. Pixels equal the assembled-image path exactly.
* **Resampled** (fast path, the box is not ``region_size``): decoded straight into the patch buffer by
  :mod:`hwsi.slide.resampled`: JPEG tiles at 1/2 or 1/4 in the DCT domain where the downsample from the read level
  is within ``ReaderConfig.mpp_tolerance`` of 2 or 4 (never coarser than the target beyond it); otherwise a tile
  row at a time, smoothed and sampled bilinearly (≤ 2 level px per output px) or shrunk with INTER_AREA (integer
  ratios, exact). ``ReaderConfig(resample="box", dct_scale=False)`` is the previous whole-box INTER_AREA path.
* **Fallback** (other formats, strip TIFFs): the backend's ``read_region`` with one handle per thread.
* Outside the slide is white (background), as OpenSlide's transparent pixels composited on white.
* **Corrupt tiles** (decode error, truncated data; in the fallback a failed read, localised to 512-px blocks) are
  filled with BLACK (never white), listed as ``(level, col, row)`` in :attr:`RegionPixels.corrupt_tiles`, flagged
  in :attr:`RegionPixels.corrupt_patches`, and counted per slide: past ``ReaderConfig.max_corrupt_tiles`` the
  iterator raises :class:`~hwsi.errors.SlideError` naming them. A failed OpenSlide handle is reopened (after a
  corrupt JPEG, every later read on it fails).

:func:`iter_regions` reads regions on ``threads`` worker threads and yields them in grid order, with at most
``queue_size`` (default ``2 × threads``) regions decoded but not yet consumed, so memory does not grow with the slide.

**Buffer lifetime.** :func:`iter_regions` recycles the patch buffers of the direct path through a small pool
(``queue_size + 2`` buffers), so a slide does not allocate (and page-fault) ~50 MB per region. The consumer owns
what it is given: a buffer is reused only once *nothing* refers to it any more — not the :class:`RegionPixels`,
not ``rp.patches`` / ``rp.patch(g)`` / ``rp.patch_grid`` or any numpy view or ``torch.from_numpy`` of them. Keeping
regions or patch arrays (e.g. ``list(iter_regions(...))``) is therefore always safe; it only means new buffers are
allocated for the regions that follow. Dropping each region before asking for the next one (a plain ``for`` loop)
keeps the pool's buffers in circulation. To keep pixels beyond that, nothing special is needed; a ``.copy()`` is
only useful to let the pool reuse the buffer sooner. Arrays handed out are writable: writing into ``rp.patches``
changes that region's pixels (and its not-yet-assembled ``image``), never another region's.
"""

from __future__ import annotations

import collections
import math
import threading
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from hwsi.errors import SlideError
from hwsi.slide.grid import Grid
from hwsi.slide.jpeg_tiles import covering_tiles, dct_factor_for, put_rect, read_tile_bytes
from hwsi.slide.levels import _FALLBACK_BLOCK, CorruptTile, read_level_box
from hwsi.slide.open import Slide, TiffLevel
from hwsi.slide.resampled import read_dct_region, read_strip_patches, strip_applies



@dataclass
class ReaderConfig:
    """Region reading settings."""

    max_corrupt_tiles: int = 4  # per slide; one more fails the slide with a SlideError
    queue_size: int | None = None  # regions decoded ahead of the consumer (default 2 × threads)
    fast_path: bool = True  # decode TIFF tiles directly when possible
    direct_patches: bool = True  # fast path without resampling: decode tiles straight into a (G, P, P, 3) buffer
    # fast path with resampling (hwsi.slide.resampled): "strip" = tiles decoded once a tile row at a time, smoothed
    # and sampled into the patch buffer (level px per output px <= 2); "box" = the whole box, then INTER_AREA
    resample: Literal["strip", "box"] = "strip"
    dct_scale: bool = True  # decode JPEG tiles at 1/2 or 1/4 where the downsample is within mpp_tolerance of it
    # strips: full-size JPEG decodes with libjpeg-turbo's fast chroma upsampling (simplejpeg), smoothed next anyway
    fast_upsample: bool = True
    mpp_tolerance: float = 0.02  # the grid's µm/px tolerance (GridConfig.mpp_tolerance)


class RegionPixels:
    """One region at the target µm/px and its patches (row-major grid).

    Holds the pixels either as the row-major region ``image`` (S, S, 3) or as the ``patches`` (G, P, P, 3) buffer
    of the direct path (or both); the other layout is built on first access (one copy) and kept. See the module
    docstring for how long the arrays stay valid (as long as they are referenced).
    """

    __slots__ = ("index", "coords", "patch_size", "corrupt_tiles", "corrupt_patches", "_image", "_patches")

    def __init__(self, index: int, coords: tuple[int, int], image: np.ndarray | None, patch_size: int,
                 corrupt_tiles: list[CorruptTile] | None = None, corrupt_patches: np.ndarray | None = None,
                 *, patches: np.ndarray | None = None) -> None:
        if image is None and patches is None:
            raise ValueError("RegionPixels needs image or patches")
        self.index = index
        self.coords = coords  # level-0 x, y
        self.patch_size = patch_size
        self.corrupt_tiles: list[CorruptTile] = [] if corrupt_tiles is None else corrupt_tiles
        self.corrupt_patches = corrupt_patches  # (G,) bool, patches touching a corrupt tile
        self._image = image
        self._patches = patches

    def __repr__(self) -> str:
        return (f"RegionPixels(index={self.index}, coords={self.coords}, side={self.region_size}, "
                f"patch_size={self.patch_size}, corrupt_tiles={self.corrupt_tiles})")

    @property
    def region_size(self) -> int:
        if self._image is not None:
            return int(self._image.shape[0])
        return self.grid_side * self.patch_size

    @property
    def grid_side(self) -> int:
        if self._image is not None:
            return self._image.shape[0] // self.patch_size
        return math.isqrt(self._patches.shape[0])  # type: ignore[union-attr]

    @property
    def image(self) -> np.ndarray:
        """``(S, S, 3)`` uint8 region, row-major (assembled from the patches on first access in the direct path)."""
        if self._image is None:
            g, p = self.grid_side, self.patch_size
            grid = self._patches.reshape(g, g, p, p, 3)  # type: ignore[union-attr]
            self._image = np.ascontiguousarray(grid.swapaxes(1, 2)).reshape(g * p, g * p, 3)
        return self._image

    @property
    def patch_grid(self) -> np.ndarray:
        """View ``(g, g, P, P, 3)``: ``patch_grid[row, col]`` is a patch (no copy)."""
        g, p = self.grid_side, self.patch_size
        if self._patches is not None:
            return self._patches.reshape(g, g, p, p, 3)
        return self._image.reshape(g, p, g, p, 3).swapaxes(1, 2)  # type: ignore[union-attr]

    @property
    def patches(self) -> np.ndarray:
        """``(G, P, P, 3)`` contiguous patches, row-major: the region's own buffer in the direct path (no copy),
        else one contiguous copy of the image made on first access and kept."""
        if self._patches is None:
            g, p = self.grid_side, self.patch_size
            self._patches = np.ascontiguousarray(self.patch_grid).reshape(g * g, p, p, 3)
        return self._patches

    def patch(self, g: int) -> np.ndarray:
        """Patch ``g`` (row-major) as a view."""
        if self._patches is not None:
            return self._patches[g]
        r, c = divmod(g, self.grid_side)
        return self.patch_grid[r, c]


class _BufferPool:
    """Recycles ``(G, P, P, 3)`` patch buffers once nothing refers to them (see "Buffer lifetime").

    Each buffer's memory is a ``bytearray`` owned by the pool; consumers get a numpy array over it. numpy bases every
    view (reshape, slice, ``torch.from_numpy``, ...) of that array on the array itself (the chain of bases stops at
    the first non-ndarray), so the array lives exactly as long as anything derived from it; a ``weakref.finalize`` on it returns the memory to the pool. At most
    ``cap`` memories are kept; past that, buffers are plain allocations freed as usual.
    """

    def __init__(self, shape: tuple[int, ...], cap: int) -> None:
        self.shape = shape
        self.nbytes = int(np.prod(shape))
        self.cap = cap
        self._free: list[bytearray] = []
        self._owned = 0
        self._lock = threading.Lock()
        self.reused = 0
        self.allocated = 0

    def get(self) -> np.ndarray:
        with self._lock:
            if self._free:
                mem = self._free.pop()
                self.reused += 1
            elif self._owned < self.cap:
                mem = bytearray(self.nbytes)
                self._owned += 1
                self.allocated += 1
            else:
                mem = None
        if mem is None:
            return np.empty(self.shape, np.uint8)
        arr = np.ndarray(self.shape, np.uint8, buffer=mem)  # base = the bytearray: views are based on ``arr``
        weakref.finalize(arr, self._put, mem)
        return arr

    def _put(self, mem: bytearray) -> None:
        with self._lock:
            self._free.append(mem)


# ---- a region straight in patch layout (boxes of one level: hwsi.slide.levels) ----------------------------------


def _read_tiff_patches(slide: Slide, tl: TiffLevel, level: int, lx: int, ly: int, s: int, p: int,
                       out: np.ndarray) -> list[CorruptTile]:
    """Fill ``out`` ``(G, P, P, 3)`` with the patches of the ``s`` × ``s`` box at ``(lx, ly)`` of ``level``.

    Same pixels as :func:`_read_tiff_box` + slicing: outside the level white, sparse tiles white, corrupt tiles
    black. A JPEG tile that is exactly one patch (side ``p``, aligned, inside the level) is decoded into its slot.
    """
    from imagecodecs import jpeg8_decode

    g = s // p
    grid5 = out.reshape(g, g, p, p, 3)
    fd = slide.raw_fd()
    jpeg = tl.jpeg_colorspace
    tw, th = tl.tile_width, tl.tile_height
    if lx < 0 or ly < 0 or lx + s > tl.width or ly + s > tl.height:
        out.fill(255)  # edge region: outside the level is white (only the inside is written below)
    bad: list[CorruptTile] = []
    direct = jpeg is not None and tw == p and th == p
    # (ix0, iy0, ix1, iy1): the tile ∩ the inside of the box, level px
    for tx, ty, idx, ix0, iy0, ix1, iy1 in covering_tiles(tl.tiles_across, tw, th, tl.width, tl.height, lx, ly, s,
                                                          s):
        ry, rx, h, w = iy0 - ly, ix0 - lx, iy1 - iy0, ix1 - ix0  # in region px
        off, n = int(tl.offsets[idx]), int(tl.bytecounts[idx])
        if n == 0 or off == 0:
            put_rect(grid5, p, ry, rx, h, w, 255)  # sparse TIFF: no tile stored = background
            continue
        slot = None
        if direct and h == th and w == tw and ry % p == 0 and rx % p == 0:
            slot = out[(ry // p) * g + rx // p]  # whole tile = one whole patch: decode in place
        try:
            data = read_tile_bytes(fd, off, n)
            if slot is not None:
                try:
                    jpeg8_decode(data, tables=tl.jpegtables, colorspace=jpeg[0], outcolorspace=jpeg[1], out=slot)
                    continue
                except Exception:  # noqa: BLE001 - corrupt, or not a 3-sample decode: retry below to tell
                    pass
            if jpeg is not None:
                seg = jpeg8_decode(data, tables=tl.jpegtables, colorspace=jpeg[0], outcolorspace=jpeg[1])
            else:
                seg = tl.decode(data, idx, jpegtables=tl.jpegtables)[0]
            if seg is None:
                raise ValueError("tile decoded to nothing")
            seg = seg.reshape(seg.shape[-3], seg.shape[-2], -1)
            if slot is not None:
                direct = False  # decodes, but not into a (P, P, 3) slot (e.g. 4 samples): copy from now on
            put_rect(grid5, p, ry, rx, h, w, seg[iy0 - ty * th : iy1 - ty * th, ix0 - tx * tw : ix1 - tx * tw])
        except Exception:  # noqa: BLE001 - any decode failure is a corrupt tile: recorded, never white
            put_rect(grid5, p, ry, rx, h, w, 0)
            bad.append((level, tx, ty))
    return bad


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


def read_region_pixels(slide: Slide, grid: Grid, index: int, fast_path: bool = True, *,
                       direct_patches: bool = True, pool: _BufferPool | None = None,
                       resample: Literal["strip", "box"] = "strip", dct_scale: bool = True,
                       mpp_tolerance: float = 0.02, fast_upsample: bool = True) -> RegionPixels:
    """Read region ``index`` of ``grid`` once and return it at the target µm/px.

    With ``fast_path`` and ``direct_patches``, a TIFF-tiled slide read without resampling is decoded straight into
    a ``(G, P, P, 3)`` patch buffer (taken from ``pool`` when given). Resampled, a TIFF-tiled slide is decoded at
    1/2 or 1/4 in the DCT domain where ``dct_scale`` and the downsample from the read level is within
    ``mpp_tolerance`` of it, else (``resample="strip"``, at most 2 level px per output px) resampled in strips into
    the patch buffer (:mod:`hwsi.slide.resampled`); otherwise the region image is assembled and resized.
    """
    import cv2

    x, y = (int(v) for v in grid.region_coords[index])
    lx, ly, lw, lh = region_level_box(slide, grid, x, y)
    s, p = grid.region_size, grid.patch_size
    level = grid.read_level
    mode = None
    if fast_path and slide.tiff_levels is not None and s % p == 0:
        k = dct_factor_for(slide, level, grid.scale / grid.read_downsample, mpp_tolerance) if dct_scale else 1
        if lw == lh == s:
            mode = "direct" if direct_patches else None
        elif k > 1:
            mode = "dct"
        elif resample == "strip" and strip_applies(lw, lh, s):
            mode = "strip"
    if mode is not None:
        g = s // p
        out = pool.get() if pool is not None else np.empty((g * g, p, p, 3), np.uint8)
        img = None
        if mode == "direct":
            bad = _read_tiff_patches(slide, slide.tiff_levels[level], level, lx, ly, s, p, out)  # type: ignore[index]
        elif mode == "dct":
            img, bad = read_dct_region(slide, level, k, lx, ly, lw, lh, s, p, out)
        else:
            bad = read_strip_patches(slide, level, lx, ly, lw, lh, s, p, out, fast_upsample)
        mask = _corrupt_patch_mask(slide, grid, bad, lx, ly, lw, lh) if bad else None
        if img is not None:
            return RegionPixels(index, (x, y), img, p, bad, mask)
        return RegionPixels(index, (x, y), None, p, bad, mask, patches=out)
    img, bad = read_level_box(slide, level, lx, ly, lw, lh, fast_path)
    if img.shape[:2] != (s, s):
        interp = cv2.INTER_AREA if lw > s else cv2.INTER_LINEAR
        img = cv2.resize(img, (s, s), interpolation=interp)
    corrupt_patches = None
    if bad:
        corrupt_patches = _corrupt_patch_mask(slide, grid, bad, lx, ly, lw, lh)
    return RegionPixels(index, (x, y), img, p, bad, corrupt_patches)


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
    corrupt tiles exceed ``cfg.max_corrupt_tiles``. Patch buffers are recycled once unreferenced (module docstring,
    "Buffer lifetime"): the consumer may keep any region or array it was given.
    """
    cfg = cfg or ReaderConfig()
    order = list(range(grid.n_regions)) if indices is None else [int(i) for i in indices]
    threads = max(1, int(threads))
    depth = max(1, cfg.queue_size or 2 * threads)
    pool = None
    s, p = grid.region_size, grid.patch_size
    if cfg.fast_path and slide.tiff_levels is not None and s % p == 0:
        # in flight + the one the consumer holds + the one its loop variable still holds while asking for the next
        pool = _BufferPool(((s // p) ** 2, p, p, 3), depth + 2)

    def submit(i: int) -> Future[RegionPixels]:
        return executor.submit(read_region_pixels, slide, grid, i, cfg.fast_path,
                               direct_patches=cfg.direct_patches, pool=pool, resample=cfg.resample,
                               dct_scale=cfg.dct_scale, mpp_tolerance=cfg.mpp_tolerance,
                               fast_upsample=cfg.fast_upsample)

    seen_bad: list[CorruptTile] = []
    pending: collections.deque[Future[RegionPixels]] = collections.deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="hwsi-read") as executor:
        it = iter(order)
        try:
            for i in it:
                pending.append(submit(i))
                if len(pending) >= depth:
                    break
            while pending:
                rp = pending.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(submit(nxt))
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
                del rp  # do not pin the consumer's buffer while it asks for the next region
        finally:
            for f in pending:
                f.cancel()

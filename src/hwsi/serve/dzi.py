"""Deep Zoom (DZI) tiles cut from a slide's pyramid, with an LRU cache of encoded tiles.

Geometry (the Deep Zoom convention OpenSeadragon uses): level ``L`` in ``0..max_level`` with
``max_level = ceil(log2(max(W, H)))`` shows the slide at scale ``2**(L - max_level)``; its size is
``ceil(W * scale) × ceil(H * scale)``; tiles are ``tile_size`` px with ``overlap`` px shared on each inner edge.
Each level is rendered the faster way (:meth:`TileSource.route`, measured in benchmarks/tiles.py): a level whose
downsample a slide level has is handed to openslide's ``DeepZoomGenerator`` (OpenSlide slides); other tiles are
read from the best pyramid level of the slide (downsample ≤ needed) and resized once; coarse tiles with no slide
level as coarse as a cached overview are cut from that overview, so a single-level slide never reads the whole
level 0 for a thumbnail-sized tile. Where the read level is JPEG-tiled and the tile needs 2× or more of it, its
tiles are decoded at 1/2 or 1/4 in the DCT domain (hwsi.slide.jpeg_tiles; no resolution rule binds a viewer), and
the overview likewise. Level, column and row are validated: anything out of range is
:class:`TileNotFound` (HTTP 404), never an exception from the reader.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from hwsi.slide.jpeg_tiles import dct_factor_for, read_scaled
from hwsi.slide.open import open_slide

TILE_FORMATS = {"jpeg": "image/jpeg", "jpg": "image/jpeg", "png": "image/png"}


class TileNotFound(LookupError):
    """The requested tile does not exist (bad level, column, row or format)."""


class SlideReader(Protocol):
    """The part of :class:`hwsi.slide.Slide` the tile server uses (thread-safe: one backend handle per thread, and
    a handle that failed a read is replaced by a fresh one on the next read)."""

    dimensions: tuple[int, int]
    level_count: int
    level_dimensions: Any
    level_downsamples: Any

    def read_region(self, x0: int, y0: int, level: int, w: int, h: int) -> np.ndarray: ...

    def close(self) -> None: ...


def open_reader(path: Path, mpp: float | None = None) -> SlideReader:
    """The one way the server opens a slide: :func:`hwsi.slide.open_slide` (whose reads reopen the backend
    handle after a failed read, as OpenSlide needs after a corrupt tile)."""
    return open_slide(path, mpp=mpp)


@dataclass(frozen=True)
class DziGeometry:
    """The Deep Zoom pyramid of a ``width`` × ``height`` level-0 image."""

    width: int
    height: int
    tile_size: int = 256
    overlap: int = 0

    @property
    def max_level(self) -> int:
        return max(0, math.ceil(math.log2(max(self.width, self.height, 1))))

    def downsample(self, level: int) -> int:
        return 2 ** (self.max_level - level)

    def level_size(self, level: int) -> tuple[int, int]:
        d = self.downsample(level)
        return max(1, math.ceil(self.width / d)), max(1, math.ceil(self.height / d))

    def tile_grid(self, level: int) -> tuple[int, int]:
        w, h = self.level_size(level)
        return math.ceil(w / self.tile_size), math.ceil(h / self.tile_size)

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x, y, w, h) of a tile in level ``level`` pixels, overlap included; raises :class:`TileNotFound`."""
        if not (isinstance(level, int) and 0 <= level <= self.max_level):
            raise TileNotFound(f"level {level} outside 0..{self.max_level}")
        cols, rows = self.tile_grid(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileNotFound(f"tile ({col}, {row}) outside {cols}x{rows} at level {level}")
        lw, lh = self.level_size(level)
        ts, ov = self.tile_size, self.overlap
        x = col * ts - (ov if col > 0 else 0)
        y = row * ts - (ov if row > 0 else 0)
        x1 = min(lw, (col + 1) * ts + ov)
        y1 = min(lh, (row + 1) * ts + ov)
        return x, y, x1 - x, y1 - y

    def xml(self, fmt: str = "jpeg") -> str:
        """The ``.dzi`` descriptor."""
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{fmt}" '
            f'Overlap="{self.overlap}" TileSize="{self.tile_size}">'
            f'<Size Width="{self.width}" Height="{self.height}"/></Image>'
        )


class TileCache:
    """Thread-safe LRU cache of encoded tiles, bounded in bytes."""

    def __init__(self, max_bytes: int = 128 * 2**20) -> None:
        self.max_bytes = int(max_bytes)
        self._d: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[Any, ...]) -> bytes | None:
        with self._lock:
            data = self._d.get(key)
            if data is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple[Any, ...], data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._d[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes and self._d:
                _, ev = self._d.popitem(last=False)
                self._bytes -= len(ev)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._d)

    @property
    def nbytes(self) -> int:
        return self._bytes


def encode(img: np.ndarray, fmt: str, quality: int = 85) -> bytes:
    """JPEG or PNG bytes of an RGB or RGBA uint8 image."""
    buf = io.BytesIO()
    pil = Image.fromarray(img)
    if fmt in ("jpeg", "jpg"):
        pil.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        pil.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class TileSource:
    """Renders the DZI tiles, thumbnail and overview of one slide; thread-safe (the reader is; the overview is
    built once under a lock)."""

    OVERVIEW_SIDE = 2048

    def __init__(self, slide_id: str, reader: SlideReader, tile_size: int = 256, overlap: int = 0) -> None:
        self.slide_id = slide_id
        self.reader = reader
        w, h = (int(v) for v in reader.dimensions)
        self.geometry = DziGeometry(w, h, tile_size, overlap)
        self._lock = threading.Lock()
        self._local = threading.local()  # per-thread DeepZoomGenerator (route() "openslide")
        self._overview: np.ndarray | None = None
        self._overview_ds = 1.0

    def close(self) -> None:
        with self._lock:
            self.reader.close()

    def route(self, level: int) -> str:
        """How DZI ``level`` is rendered, each case the faster way (benchmarks/tiles.py, README "Tile latency",
        measured side by side with openslide-python's ``DeepZoomGenerator`` on the same tiles):

        * ``"overview"``: coarse levels of a slide with no pyramid level as coarse as hwsi's in-memory overview
          (e.g. a single-level SVS): cut from the overview, 6-9x faster than DeepZoomGenerator reading level 0;
        * ``"openslide"``: the DZI level's downsample IS a slide level's (no resampling) and the slide is read
          through OpenSlide: DeepZoomGenerator reads that level and hands back its image, 1.03-1.22x faster cold
          than hwsi's read + RGBA-to-RGB conversion of the same pixels;
        * ``"level"``: everything else (between slide levels): hwsi reads the finer level, decoding JPEG tiles at
          1/2 or 1/4 in the DCT domain where it can, and resizes once: 1.7-16x faster than DeepZoomGenerator,
          which reads the finer level at full size.
        """
        g = self.geometry
        ds = float(g.downsample(level))
        lvl = self._best_level(ds)
        lds = float(self.reader.level_downsamples[lvl])
        ov_ds = self._overview_ds_for()
        if ds >= ov_ds and lds < ov_ds:
            return "overview"
        if abs(lds - ds) <= 1e-3 * ds and getattr(self.reader, "backend", "") == "openslide":
            return "openslide"
        return "level"

    def _overview_ds_for(self) -> float:
        """The downsample of the overview (built or not); infinity for a slide small enough to have none."""
        if self._overview is not None:
            return self._overview_ds
        side = max(self.geometry.width, self.geometry.height)
        return side / self.OVERVIEW_SIDE if side > self.OVERVIEW_SIDE else math.inf

    def _deepzoom(self) -> Any:
        """openslide's DeepZoomGenerator over this thread's OpenSlide handle (same tile size and overlap,
        ``limit_bounds`` off: the same DZI geometry, tests/test_serve_tiles.py)."""
        from openslide.deepzoom import DeepZoomGenerator

        hnd = self.reader.handle()  # type: ignore[attr-defined]
        dz = getattr(self._local, "dz", None)
        if dz is None or self._local.dz_handle is not hnd:
            g = self.geometry
            dz = DeepZoomGenerator(hnd, tile_size=g.tile_size, overlap=g.overlap, limit_bounds=False)
            self._local.dz, self._local.dz_handle = dz, hnd
        return dz

    def _best_level(self, ds: float) -> int:
        best = 0
        for i, d in enumerate(self.reader.level_downsamples):
            if float(d) <= ds + 1e-6:
                best = i
        return best

    def _read_level0_box(self, x0: int, y0: int, w0: int, h0: int, out_w: int, out_h: int) -> np.ndarray:
        """Pixels of the level-0 box resized to (out_h, out_w) from the best level (or the overview)."""
        ds = max(w0 / max(out_w, 1), h0 / max(out_h, 1))
        lvl = self._best_level(ds)
        # the overview where no slide level is as coarse as it (else that level is the closer source: route())
        use_overview = ds >= self._overview_ds_for() and float(self.reader.level_downsamples[lvl]) < self._overview_ds_for()
        ov = self._get_overview() if use_overview else None
        if ov is not None:
            s = self._overview_ds
            ox0, oy0 = int(x0 / s), int(y0 / s)
            ox1 = min(ov.shape[1], max(ox0 + 1, math.ceil((x0 + w0) / s)))
            oy1 = min(ov.shape[0], max(oy0 + 1, math.ceil((y0 + h0) / s)))
            crop = ov[oy0:oy1, ox0:ox1]
            return np.asarray(Image.fromarray(crop).resize((out_w, out_h), Image.BILINEAR))
        lds = float(self.reader.level_downsamples[lvl])
        lw, lh = (int(v) for v in self.reader.level_dimensions[lvl])
        scaled = self._read_dct(lvl, ds / lds, x0 / lds, y0 / lds, w0 / lds, h0 / lds)
        if scaled is not None:
            return np.asarray(Image.fromarray(scaled).resize((out_w, out_h), Image.BOX))
        rw = max(1, min(math.ceil(w0 / lds), lw - int(x0 / lds)))
        rh = max(1, min(math.ceil(h0 / lds), lh - int(y0 / lds)))
        img = np.asarray(self.reader.read_region(int(x0), int(y0), lvl, rw, rh))
        if img.shape[0] != out_h or img.shape[1] != out_w:
            img = np.asarray(Image.fromarray(img).resize((out_w, out_h), Image.BOX if ds > lds else Image.BILINEAR))
        return img

    def _read_dct(self, lvl: int, ds: float, lx: float, ly: float, lw: float, lh: float) -> np.ndarray | None:
        """The box ``(lx, ly, lw, lh)`` of level ``lvl`` decoded at 1/2 or 1/4 in the DCT domain when ``ds`` (level
        px per output px) allows it and the level is JPEG-tiled (:mod:`hwsi.slide.jpeg_tiles`); None otherwise or
        when a tile is corrupt (the caller then reads it the usual way)."""
        slide = self.reader
        if getattr(slide, "tiff_levels", None) is None:
            return None
        k = dct_factor_for(slide, lvl, ds)  # type: ignore[arg-type]
        if k == 1:
            return None
        tl = slide.tiff_levels[lvl]  # type: ignore[attr-defined]
        bx, by = int(lx / k), int(ly / k)
        bw = max(1, min(math.ceil(lw / k), tl.width // k - bx))
        bh = max(1, min(math.ceil(lh / k), tl.height // k - by))
        img, bad = read_scaled(slide, lvl, k, bx, by, bw, bh)  # type: ignore[arg-type]
        return None if bad else img

    def _get_overview(self) -> np.ndarray | None:
        """A whole-slide image of at most OVERVIEW_SIDE px a side, built once from the coarsest suitable level."""
        if self._overview is not None:
            return self._overview
        g = self.geometry
        side = max(g.width, g.height)
        if side <= self.OVERVIEW_SIDE:
            return None  # small slide: reading level 0 is already cheap
        ds = side / self.OVERVIEW_SIDE
        ow, oh = max(1, round(g.width / ds)), max(1, round(g.height / ds))
        lvl = self._best_level(ds)
        lw, lh = (int(v) for v in self.reader.level_dimensions[lvl])
        with self._lock:
            if self._overview is not None:
                return self._overview
            lds = float(self.reader.level_downsamples[lvl])
            scaled = self._read_dct(lvl, ds / lds, 0, 0, lw, lh) if lw * lh <= 4 * 64 * 2**20 else None
            if scaled is not None:  # decoded at 1/2 or 1/4: a quarter or a sixteenth of the memory
                img = np.asarray(Image.fromarray(scaled).resize((ow, oh), Image.BOX))
            elif lw * lh > 64 * 2**20:  # a level this big would take too much memory: read it in strips
                img = self._read_strips(lvl, lw, lh, ow, oh)
            else:
                img = np.asarray(self.reader.read_region(0, 0, lvl, lw, lh))
                img = np.asarray(Image.fromarray(img).resize((ow, oh), Image.BOX))
            self._overview_ds = g.width / ow
            self._overview = img
        return img

    def _read_strips(self, lvl: int, lw: int, lh: int, ow: int, oh: int) -> np.ndarray:
        out = np.empty((oh, ow, 3), np.uint8)
        lds = float(self.reader.level_downsamples[lvl])
        rows_per = max(1, math.ceil(lh / oh))
        strip = rows_per * max(1, (8 * 2**20) // (lw * 3 * rows_per))
        for y in range(0, lh, strip):
            sh = min(strip, lh - y)
            part = np.asarray(self.reader.read_region(0, int(y * lds), lvl, lw, sh))
            oy0, oy1 = int(y * oh / lh), min(oh, math.ceil((y + sh) * oh / lh))
            out[oy0:oy1] = np.asarray(Image.fromarray(part).resize((ow, max(1, oy1 - oy0)), Image.BOX))
        return out

    def tile(self, level: int, col: int, row: int) -> np.ndarray:
        """RGB pixels of DZI tile (level, col, row); raises :class:`TileNotFound` for out-of-range requests."""
        g = self.geometry
        x, y, w, h = g.tile_box(level, col, row)
        if self.route(level) == "openslide":
            try:
                img = np.asarray(self._deepzoom().get_tile(level, (col, row)).convert("RGB"))
                if img.shape[:2] == (h, w):
                    return img
            except Exception:  # noqa: BLE001 - a corrupt tile: a fresh handle, and hwsi's own read decides
                self.reader.reopen_handle()  # type: ignore[attr-defined]
        d = g.downsample(level)
        x0, y0 = x * d, y * d
        w0 = min(g.width - x0, w * d)
        h0 = min(g.height - y0, h * d)
        return self._read_level0_box(x0, y0, max(1, w0), max(1, h0), w, h)

    def thumbnail(self, max_side: int = 256) -> np.ndarray:
        """Whole-slide thumbnail whose longer side is ``max_side`` px."""
        g = self.geometry
        s = max(g.width, g.height) / max_side
        ow, oh = max(1, round(g.width / s)), max(1, round(g.height / s))
        return self._read_level0_box(0, 0, g.width, g.height, ow, oh)


def etag_for(*parts: object) -> str:
    """A strong ETag from the parts that identify a response."""
    text = "|".join(map(str, parts)).encode("utf-8", "surrogatepass")  # ids from file names may hold surrogates
    return '"' + hashlib.sha1(text).hexdigest()[:20] + '"'

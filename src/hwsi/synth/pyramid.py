"""Streaming writer of pyramidal tiled JPEG TIFFs that OpenSlide opens as ``generic-tiff``.

Layout written (facts from docs/machine-facts.md, re-checked by tests/test_pyramid.py):

* every pyramid level is its own top-level IFD (not a SubIFD), level 0 first; reduced levels carry
  ``NewSubfileType = 1``;
* tiles of ``tile_size`` (multiple of 16), ``Photometric = RGB``, ``Compression = JPEG`` at ``quality``;
* ``XResolution``/``YResolution`` in pixels per centimetre (``ResolutionUnit = 3``), i.e. ``1e4 / mpp``;
  OpenSlide reports it as ``openslide.mpp-x``/``mpp-y``;
* level k has size ``ceil(level_{k-1} / 2)``: each level is the 2×2 box average of the one above it (an odd last
  row/column is replicated before averaging), so downsamples are exactly 2, 4, 8, ... up to rounding at the edge.

Bounded memory: the level-0 image never exists as one array. ``tile_fn`` is called one tile at a time (a tile row at
a time across ``threads``); each level-0 tile is written (tifffile encodes tiles in parallel) and, at the same
time, reduced 2× into a band of level 1. Level bands cascade: each completed pair of rows of level k is reduced into
level k+1, and every reduced level is appended row-band by row-band to a raw temporary file beside the output
(``(1/4 + 1/16 + ...) * 3 * W * H`` bytes ≈ ``W * H`` bytes of disk, deleted at the end). After level 0 the reduced
levels are read back one tile row at a time and written. Peak memory is a few tile rows of the widest level
(``~tile_size * W * 3 / 2`` bytes) plus tifffile's encode buffer, independent of the slide height; a 100k-wide slide
needs ~40 MB of bands.

The file is written under a temporary name and renamed when complete (:mod:`hwsi.utils.atomic`).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np

from hwsi.errors import ConfigError
from hwsi.utils.atomic import atomic_path

TileFn = Callable[[int, int, int, int], np.ndarray]
"""``tile_fn(x0, y0, w, h) -> uint8 (h, w, 3)``: the level-0 pixels of the rectangle at (x0, y0)."""


@dataclass
class PyramidInfo:
    """What :func:`write_pyramid_tiff` wrote."""

    path: Path
    mpp: float
    tile_size: int
    quality: int
    level_dimensions: list[tuple[int, int]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)


def pyramid_level_dimensions(
    width: int, height: int, n_levels: int | None = None, min_level_side: int = 512
) -> list[tuple[int, int]]:
    """Sizes of the levels :func:`write_pyramid_tiff` writes.

    Without ``n_levels``, levels halve until the longer side of the smallest level is ``<= min_level_side``.
    """
    dims = [(int(width), int(height))]
    while True:
        w, h = dims[-1]
        if n_levels is not None:
            if len(dims) >= n_levels:
                break
        elif max(w, h) <= min_level_side:
            break
        if w == 1 and h == 1:
            break
        dims.append(((w + 1) // 2, (h + 1) // 2))
    return dims


def _half(img: np.ndarray) -> np.ndarray:
    """2×2 box average (rounded), replicating an odd last row/column first. uint8 (h, w, 3) -> (ceil h/2, ceil w/2, 3)."""
    h, w = img.shape[:2]
    if h % 2 or w % 2:
        img = np.pad(img, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    a = img.astype(np.uint16)
    s = a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
    return ((s + 2) >> 2).astype(np.uint8)


class _LevelSink:
    """Receives rows of one reduced level, appends them to a raw file and feeds row pairs to the next level."""

    def __init__(self, path: Path, width: int, height: int, child: _LevelSink | None) -> None:
        self.path = path
        self.width = width
        self.height = height
        self.child = child
        self.rows_written = 0
        self.fh: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in finish()
        self.pending: np.ndarray | None = None  # an odd leftover row waiting for its pair

    def push(self, rows: np.ndarray) -> None:
        assert rows.shape[1] == self.width, (rows.shape, self.width)
        n = min(rows.shape[0], self.height - self.rows_written)
        rows = rows[:n]
        if n == 0:
            return
        self.fh.write(np.ascontiguousarray(rows).tobytes())
        self.rows_written += n
        if self.child is not None:
            if self.pending is not None:
                rows = np.concatenate([self.pending, rows], axis=0)
                self.pending = None
            even = rows.shape[0] - rows.shape[0] % 2
            if even:
                self.child.push(_half(rows[:even]))
            if rows.shape[0] % 2:
                self.pending = rows[even:].copy()

    def finish(self) -> None:
        if self.rows_written != self.height:
            raise RuntimeError(f"level sink got {self.rows_written} rows, expected {self.height}")
        if self.child is not None:
            if self.pending is not None:
                self.child.push(_half(self.pending))  # odd last row: replicated by _half
                self.pending = None
            self.child.finish()
        self.fh.close()


def _pad_tile(tile: np.ndarray, ts: int) -> np.ndarray:
    h, w = tile.shape[:2]
    if h == ts and w == ts:
        return tile
    return np.pad(tile, ((0, ts - h), (0, ts - w), (0, 0)), mode="edge")


def write_pyramid_tiff(
    path: str | Path,
    width: int,
    height: int,
    mpp: float,
    tile_fn: TileFn,
    tile_size: int = 256,
    n_levels: int | None = None,
    min_level_side: int = 512,
    quality: int = 90,
    threads: int | None = None,
    description: str = "",
    level_step: Literal[2, 4] = 2,
) -> PyramidInfo:
    """Write a pyramidal tiled JPEG TIFF of ``width`` × ``height`` level-0 pixels at ``mpp`` µm/px.

    Args:
        path: output file (``.tiff``); written atomically.
        width, height: level-0 size in pixels.
        mpp: level-0 µm per pixel, stored as TIFF resolution (pixels per centimetre).
        tile_fn: ``tile_fn(x0, y0, w, h) -> uint8 (h, w, 3)`` renders level-0 pixels; called once per level-0
            tile (edge tiles are clipped to the image), possibly from several threads at once.
        tile_size: TIFF tile side (multiple of 16).
        n_levels: number of levels; default: halve until the longer side is ``<= min_level_side``.
        quality: JPEG quality (1–100).
        threads: threads for ``tile_fn`` and JPEG encoding (default: all CPUs).
        description: ImageDescription of level 0.
        level_step: downsample between written levels: 2 (1, 2, 4, ...) or 4 (1, 4, 16, ...: every other level of
            the 2× cascade, as some scanners write); ``n_levels``/``min_level_side`` count the 2× cascade.
    """
    import tifffile

    t0 = time.perf_counter()
    path = Path(path)
    if width <= 0 or height <= 0:
        raise ConfigError(f"write_pyramid_tiff: size must be positive, got {width}x{height}")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ConfigError(f"write_pyramid_tiff: mpp must be a positive number, got {mpp}")
    if tile_size < 16 or tile_size % 16:
        raise ConfigError(f"write_pyramid_tiff: tile_size must be a multiple of 16, got {tile_size}")
    if n_levels is not None and n_levels < 1:
        raise ConfigError(f"write_pyramid_tiff: n_levels must be >= 1, got {n_levels}")
    if level_step not in (2, 4):
        raise ConfigError(f"write_pyramid_tiff: level_step must be 2 or 4, got {level_step}")
    if not 1 <= quality <= 100:
        raise ConfigError(f"write_pyramid_tiff: quality must be in 1..100, got {quality}")
    threads = max(1, threads or os.cpu_count() or 1)
    ts = tile_size
    dims = pyramid_level_dimensions(width, height, n_levels, min_level_side)
    ppcm = 1e4 / mpp
    common = dict(
        tile=(ts, ts),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": int(quality)},
        resolution=(ppcm, ppcm),
        resolutionunit="CENTIMETER",
        maxworkers=threads,
        # tifffile buffers this many bytes of tiles per parallel encode batch (default 512 MB): keep it small
        buffersize=max(8, 8 * threads) * ts * ts * 3,
        metadata=None,
    )

    with atomic_path(path) as tmp, tempfile.TemporaryDirectory(prefix=".pyr-", dir=path.parent) as tdir:
        # cascade of reduced-level sinks: sinks[k] receives level k+1
        sinks: list[_LevelSink] = []
        child: _LevelSink | None = None
        for lvl in range(len(dims) - 1, 0, -1):
            w, h = dims[lvl]
            child = _LevelSink(Path(tdir) / f"level{lvl}.raw", w, h, child)
            sinks.insert(0, child)
        top = sinks[0] if sinks else None

        def level0_tiles(pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
            ntx = math.ceil(width / ts)
            nty = math.ceil(height / ts)
            w1 = dims[1][0] if len(dims) > 1 else 0
            for ty in range(nty):
                y0 = ty * ts
                th = min(ts, height - y0)
                band = np.empty(((th + 1) // 2, w1, 3), np.uint8) if top is not None else None

                def render(tx: int, y0: int = y0, th: int = th) -> np.ndarray:
                    x0 = tx * ts
                    tw = min(ts, width - x0)
                    tile = np.asarray(tile_fn(x0, y0, tw, th))
                    if tile.shape != (th, tw, 3) or tile.dtype != np.uint8:
                        raise ValueError(
                            f"tile_fn({x0}, {y0}, {tw}, {th}) returned {tile.dtype} {tile.shape}, "
                            f"expected uint8 {(th, tw, 3)}"
                        )
                    return tile

                # render a tile row in chunks so at most ~4*threads tiles are alive at once; the finished band is
                # pushed to level 1 BEFORE the row's last tiles are yielded (tifffile closes the iterator after the
                # last tile, so code after the final yield would never run)
                chunk = 4 * threads
                for c0 in range(0, ntx, chunk):
                    txs = range(c0, min(ntx, c0 + chunk))
                    tiles = list(pool.map(render, txs))
                    if band is not None:
                        for tx, tile in zip(txs, tiles):
                            half = _half(tile)
                            hx = tx * ts // 2
                            band[:, hx : hx + half.shape[1]] = half
                        if txs[-1] == ntx - 1 and top is not None:
                            top.push(band)
                    for tile in tiles:
                        yield _pad_tile(tile, ts)
                    del tiles

        def reduced_tiles(sink: _LevelSink) -> Iterator[np.ndarray]:
            w, h = sink.width, sink.height
            row_bytes = w * 3
            with open(sink.path, "rb") as fh:
                for y0 in range(0, h, ts):
                    th = min(ts, h - y0)
                    band = np.frombuffer(fh.read(th * row_bytes), np.uint8).reshape(th, w, 3)
                    for x0 in range(0, w, ts):
                        yield _pad_tile(band[:, x0 : x0 + ts], ts)
                    del band

        with tifffile.TiffWriter(tmp, bigtiff=width * height * 3 > 2**31) as tif:
            with ThreadPoolExecutor(threads) as pool:
                tif.write(
                    level0_tiles(pool),
                    shape=(height, width, 3),
                    dtype=np.uint8,
                    subfiletype=0,
                    description=description or None,
                    **common,
                )
            if top is not None:
                top.finish()
            for k, sink in enumerate(sinks, start=1):
                if k % (level_step // 2):  # a 4x-step pyramid keeps levels 0, 2, 4, ... of the 2x cascade
                    os.unlink(sink.path)
                    continue
                tif.write(
                    reduced_tiles(sink),
                    shape=(sink.height, sink.width, 3),
                    dtype=np.uint8,
                    subfiletype=1,
                    **common,
                )
                os.unlink(sink.path)
    written = [d for k, d in enumerate(dims) if k % (level_step // 2) == 0]
    return PyramidInfo(path, float(mpp), ts, int(quality), written, time.perf_counter() - t0)

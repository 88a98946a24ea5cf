"""Resampled region reads (hwsi.slide.resampled, hwsi.slide.jpeg_tiles): strips, integer strips, DCT-scaled JPEG
decoding, fallbacks, bounded memory, and the viewer's DCT-scaled tiles. Correctness only (benchmarks/resample.py
measures speed).

Accepted bounds against decode + INTER_AREA (uint8 grey levels, docs/slide.md "Reading"): mean |diff| <= 3 and
99th percentile <= 16 on synthetic slides (the bound of a reduced pyramid level against level 0 resized); real H&E
JPEG tiles decoded at 1/2 and 1/4 (simplejpeg): mean <= 1.5, 99th percentile <= 8 (the SVS's RGB-coded tiles) or 12
(the same pixels as YCbCr 4:2:0). Without simplejpeg, or for a tile it refuses, the scaled read is decode-then-resize
exactly.
"""

from __future__ import annotations

import os
import tracemalloc
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from hwsi.slide import GridConfig, ReaderConfig, build_grid, iter_regions, open_slide, read_level_box
from hwsi.slide.jpeg_tiles import _stream, dct_factor_for, decode_tile
from hwsi.slide.reader import region_level_box
from hwsi.slide.resampled import smoothing_sigma
from hwsi.synth.pyramid import write_pyramid_tiff

CFG = GridConfig(region_size=512, patch_size=64)


def texture(x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Pink tissue-like texture with fine detail (periods of 5-40 px) everywhere."""
    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
    r = 200 + 30 * np.sin(xx / 3.1) * np.cos(yy / 4.3)
    g = 110 + 40 * np.sin((xx + yy) / 7.0)
    b = 170 + 25 * np.cos(xx / 11.0) + 15 * np.sin(yy / 2.3)
    return np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)


def stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), float(np.percentile(d, 99))


def all_tissue_grid(s, cfg: GridConfig = CFG):
    w, h = s.dimensions
    return build_grid(s, np.ones((-(-h // 16), -(-w // 16)), bool), 16.0, cfg)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Single-level JPEG pyramids (the read level is level 0) whose sizes leave padded edge regions."""
    d = tmp_path_factory.mktemp("resampled")
    out = {}
    for name, w, h, mpp in (("m2631", 2300, 1700, 0.2631), ("m025", 2500, 1800, 0.25), ("m0125", 2600, 2300, 0.125)):
        out[name] = d / f"{name}.tiff"
        write_pyramid_tiff(out[name], w, h, mpp, texture, n_levels=1)
    return out


@pytest.mark.parametrize("case", ["bands", "warp"])
def test_strips_equal_one_whole_box_resample_and_approximate_inter_area(slides: dict[str, Path], case: str) -> None:
    """bands: 973 box rows per 512 output rows, one exact cv2.resize per band; warp: 3891 rows per 2048 (no short
    exact band), warpAffine per tile row. Either equals one smoothing + resample of the whole box (decoded as
    read_level_box does: ``fast_upsample=False``); with the default fast chroma upsampling it stays in the bound."""
    from hwsi.slide.resampled import MAX_BAND_ROWS

    cfg = CFG if case == "bands" else GridConfig(region_size=2048, patch_size=256)
    with open_slide(slides["m2631"], mpp=0.2631 if case == "bands" else 0.2632) as s:
        g = all_tissue_grid(s, cfg)
        assert g.read_level == 0
        size = cfg.region_size
        n_edge = 0
        box_cfg = ReaderConfig(resample="box", dct_scale=False)
        exact_cfg = ReaderConfig(fast_upsample=False)  # imagecodecs' decode: the pixels read_level_box gives
        for ex, rp, old in zip(iter_regions(s, g, exact_cfg, threads=2), iter_regions(s, g, threads=2),
                               iter_regions(s, g, box_cfg, threads=2)):
            lx, ly, lw, lh = region_level_box(s, g, *rp.coords)
            assert (Fraction(lh, size).denominator <= MAX_BAND_ROWS) == (case == "bands")
            n_edge += lx + lw > s.dimensions[0] or ly + lh > s.dimensions[1]
            box, _ = read_level_box(s, 0, lx, ly, lw, lh)
            rx, ry = lw / size, lh / size
            smooth = cv2.GaussianBlur(box, (3, 3), smoothing_sigma(max(rx, ry)), borderType=cv2.BORDER_REPLICATE)
            if case == "bands":
                whole = cv2.resize(smooth, None, fx=size / lw, fy=size / lh, interpolation=cv2.INTER_LINEAR)
            else:
                m = np.array([[rx, 0, 0.5 * rx - 0.5], [0, ry, 0.5 * ry - 0.5]])
                whole = cv2.warpAffine(smooth, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                       borderMode=cv2.BORDER_REPLICATE)
            assert np.abs(ex.image.astype(int) - whole[:size, :size]).max() <= 1  # = one resample of the box
            for img in (ex.image, rp.image):  # default: fast chroma upsampling too
                mean, p99 = stats(img, old.image)  # vs the previous path: whole box + INTER_AREA
                assert mean <= 3 and p99 <= 16, (rp.coords, mean, p99)
        assert n_edge >= 1


def test_integer_ratio_strips_equal_inter_area_exactly(slides: dict[str, Path]) -> None:
    with open_slide(slides["m025"]) as s:
        g = all_tissue_grid(s)
        assert g.scale == 2.0 and g.read_level == 0
        new = iter_regions(s, g, ReaderConfig(dct_scale=False), threads=2)
        for rp, old in zip(new, iter_regions(s, g, ReaderConfig(resample="box", dct_scale=False), threads=2)):
            assert rp._image is None  # straight into the patch buffer
            np.testing.assert_array_equal(rp.patches, old.patches)


@pytest.mark.parametrize("name,k", [("m025", 2), ("m0125", 4)])
def test_dct_scaled_regions_within_bound_of_decode_then_resize(slides: dict[str, Path], name: str, k: int) -> None:
    with open_slide(slides[name]) as s:
        g = all_tissue_grid(s)
        assert dct_factor_for(s, 0, g.scale, 0.02) == k
        ref_cfg = ReaderConfig(dct_scale=False)
        n = 0
        for rp, ref in zip(iter_regions(s, g, threads=2), iter_regions(s, g, ref_cfg, threads=2)):
            mean, p99 = stats(rp.patches, ref.patches)
            assert mean <= 3 and p99 <= 16, (rp.coords, mean, p99)
            x, y = rp.coords
            inside_w = (s.dimensions[0] - x) // k  # outside the slide: white, like the reference
            if inside_w < 512:
                assert (rp.image[:, inside_w + 1 :] == 255).all()
            n += 1
        assert n == g.n_regions


def test_dct_never_coarser_than_the_target_beyond_the_tolerance(slides: dict[str, Path]) -> None:
    with open_slide(slides["m2631"]) as s:
        assert dct_factor_for(s, 0, 1.9004, 0.02) == 1  # 1/2 would give 0.526 µm/px: 5 % coarser
        assert dct_factor_for(s, 0, 1.97, 0.02) == 2  # 0.5 µm/px target, 0.507 read: within 2 %
        assert dct_factor_for(s, 0, 3.0) == 2 and dct_factor_for(s, 0, 4.5) == 4  # viewer: no rule binds
    with open_slide(slides["m025"], mpp=0.2475) as s:  # downsample 2.02: 1/2 decode, then resized the rest
        g = all_tissue_grid(s)
        ref = next(iter_regions(s, g, ReaderConfig(dct_scale=False), indices=[0]))
        rp = next(iter_regions(s, g, indices=[0]))
        mean, p99 = stats(rp.image, ref.image)
        assert rp.image.shape == (512, 512, 3) and mean <= 3 and p99 <= 16


def test_real_svs_tiles_dct_scaled_within_bound(shared_data: Path) -> None:
    p = shared_data / "slides" / "cmu-1-small-region.svs"
    with open_slide(p) as s:
        tl = s.tiff_levels[0]
        assert tl.jpeg_colorspace[0] == 2  # RGB-coded JPEG (Aperio): the Adobe marker must say so
        fd = s.raw_fd()
        diffs = {2: [], 4: []}
        for idx in range(0, len(tl.offsets), 3):
            data = os.pread(fd, int(tl.bytecounts[idx]), int(tl.offsets[idx]))
            full = decode_tile(tl, data, idx).copy()
            same = cv2.imdecode(np.frombuffer(_stream(tl, data), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
            np.testing.assert_array_equal(same, full)  # the spliced stream decodes to the same pixels
            for k in (2, 4):
                ref = cv2.resize(full, (tl.tile_width // k, tl.tile_height // k), interpolation=cv2.INTER_AREA)
                diffs[k].append(np.abs(decode_tile(tl, data, idx, k).astype(np.int16) - ref))
        for k, d in diffs.items():
            d = np.concatenate([x.ravel() for x in d])
            assert d.mean() <= 1.5 and np.percentile(d, 99) <= 8, (k, d.mean(), np.percentile(d, 99))
    with open_slide(p, mpp=0.25) as s:  # read as a 0.25 µm/px slide at 0.5: DCT 1/2, edge regions included
        g = all_tissue_grid(s, GridConfig(region_size=480, patch_size=240))
        for rp, ref in zip(iter_regions(s, g), iter_regions(s, g, ReaderConfig(dct_scale=False))):
            mean, p99 = stats(rp.patches, ref.patches)
            assert mean <= 1.5 and p99 <= 8, (rp.coords, mean, p99)


@pytest.mark.parametrize("name,mpp", [("boxes.tiff", 0.125), ("small.svs", 0.25), ("kidney-48-5.tif", 0.25)])
def test_other_slides_fall_back_cleanly(shared_data: Path, name: str, mpp: float) -> None:
    """Deflate tiles (boxes), a 16-px JPEG SVS, a strip TIFF read by tiffslide: the default reader gives the
    previous path's pixels exactly (boxes, kidney) or within the bound (small.svs, DCT-scaled)."""
    with open_slide(shared_data / "slides" / name, mpp=mpp) as s:
        cfg = GridConfig(region_size=16, patch_size=8) if name == "small.svs" else GridConfig(region_size=64,
                                                                                              patch_size=16)
        w, h = s.dimensions
        g = build_grid(s, np.ones((h, w), bool), 1.0, cfg)
        for rp, ref in zip(iter_regions(s, g), iter_regions(s, g, ReaderConfig(resample="box", dct_scale=False))):
            if name == "small.svs":
                mean, p99 = stats(rp.image, ref.image)
                assert mean <= 3 and p99 <= 16
            else:
                np.testing.assert_array_equal(rp.image, ref.image)


def test_corrupt_tile_black_and_recorded_in_strip_and_dct_paths(tmp_path: Path) -> None:
    p = tmp_path / "c.tiff"
    write_pyramid_tiff(p, 1200, 1100, 0.25, texture, n_levels=1)
    with tifffile.TiffFile(p) as tf:
        off = tf.pages[0].dataoffsets[1 * 5 + 2]  # tile (col 2, row 1)
    with open(p, "r+b") as fh:
        fh.seek(off)
        fh.write(b"\x00" * 64)
    for mpp in (0.25, 0.2631):  # DCT 1/2; strips (ratio 1.9 with the user's µm/px)
        with open_slide(p, mpp=mpp) as s:
            g = all_tissue_grid(s)
            regions = list(iter_regions(s, g, ReaderConfig(max_corrupt_tiles=4)))
            bad = [r for r in regions if r.corrupt_tiles]
            assert len(bad) == 1 and bad[0].corrupt_tiles == [(0, 2, 1)], mpp
            rp = bad[0]
            ys, xs = (slice(int(256 / g.scale) + 2, int(512 / g.scale) - 2),
                      slice(int(512 / g.scale) + 2, int(768 / g.scale) - 2))
            assert (rp.image[ys, xs] == 0).all()  # black, never white
            assert rp.corrupt_patches is not None and rp.corrupt_patches.any()


def test_memory_does_not_grow_with_slide_size(tmp_path: Path) -> None:
    peaks = []
    for side in (2400, 4800):  # 4 vs ~12 regions of 973 level-0 px
        p = tmp_path / f"s{side}.tiff"
        write_pyramid_tiff(p, side, side // 2, 0.2631, texture, n_levels=1)
        with open_slide(p) as s:
            g = all_tissue_grid(s)
            tracemalloc.start()
            n = sum(1 for _ in iter_regions(s, g, ReaderConfig(queue_size=2), threads=1))
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            assert n == g.n_regions
    assert peaks[1] <= 1.25 * peaks[0], peaks


def test_viewer_tiles_and_thumbnail_dct_scaled(slides: dict[str, Path]) -> None:
    from PIL import Image

    from hwsi.serve.dzi import TileSource, open_reader

    p = slides["m025"]
    src = TileSource("m025", open_reader(p), tile_size=256)
    full = read_level_box(src.reader, 0, 0, 0, 2500, 1800)[0]
    lvl = src.geometry.max_level - 1  # half resolution: 1/2 decode
    for col, row in ((0, 0), (4, 3)):  # inner and edge tile
        x, y, w, h = src.geometry.tile_box(lvl, col, row)
        ref = np.asarray(Image.fromarray(full[2 * y : 2 * (y + h), 2 * x : 2 * (x + w)]).resize((w, h), Image.BOX))
        mean, p99 = stats(src.tile(lvl, col, row), ref)
        assert mean <= 3 and p99 <= 16, (col, row, mean, p99)
    thumb = src.thumbnail(256)
    ref = np.asarray(Image.fromarray(full).resize(thumb.shape[1::-1], Image.BOX))
    mean, p99 = stats(thumb, ref)
    assert mean <= 3 and p99 <= 16
    src.close()


# ---- simplejpeg's DCT scaling, its bound on real H&E tiles, and the full-decode fallback --------------------------


def _svs_tile_fn(shared_data: Path):
    """Level-0 pixels of the real H&E SVS, mirrored and repeated (what benchmarks/resample.py writes)."""
    img = tifffile.imread(shared_data / "slides" / "cmu-1-small-region.svs")
    img = np.concatenate([img, img[:, ::-1]], 1)
    ih, iw = img.shape[:2]

    def fn(x0: int, y0: int, w: int, h: int) -> np.ndarray:
        return img[(np.arange(y0, y0 + h) % ih)[:, None], (np.arange(x0, x0 + w) % iw)[None, :]]

    return fn


def _tile_diffs(path: Path, k: int) -> tuple[np.ndarray, int, int]:
    """|DCT-scaled - (full decode + INTER_AREA)| over the level-0 tiles, how many tiles differ at all, how many."""
    with open_slide(path) as s:
        tl = s.tiff_levels[0]
        fd = s.raw_fd()
        d, n_differ = [], 0
        for idx in range(len(tl.offsets)):
            data = os.pread(fd, int(tl.bytecounts[idx]), int(tl.offsets[idx]))
            full = decode_tile(tl, data, idx).copy()
            ref = cv2.resize(full, (tl.tile_width // k, tl.tile_height // k), interpolation=cv2.INTER_AREA)
            diff = np.abs(decode_tile(tl, data, idx, k).astype(np.int16) - ref)
            n_differ += bool(diff.any())
            d.append(diff.ravel())
        return np.concatenate(d), n_differ, len(tl.offsets)


@pytest.fixture(scope="module")
def he_ycbcr(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real H&E pixels re-encoded as a YCbCr 4:2:0 JPEG TIFF (256-px tiles, quality 90)."""
    p = tmp_path_factory.mktemp("he") / "he.tiff"
    write_pyramid_tiff(p, 2048, 2048, 0.25, _svs_tile_fn(shared_data), n_levels=1)
    return p


def test_simplejpeg_scaled_tiles_within_bound_on_real_he(shared_data: Path, he_ycbcr: Path) -> None:
    """Bound accepted against decode-then-resize: mean |diff| <= 1.5, 99th percentile <= 12 grey levels, on the
    real SVS's own RGB-coded tiles (1/2; 240-px tiles do not scale by 4) and on them re-encoded as YCbCr 4:2:0
    (1/2, 1/4). The decodes are really DCT-scaled (not the fallback, which would be exact): most tiles differ.
    Measured: SVS 1/2 mean 0.09, p99 2 (max 19); YCbCr 1/2 0.82, 9 (max 39); YCbCr 1/4 0.42, 4 (max 14)."""
    from hwsi.slide.jpeg_tiles import simplejpeg_module

    assert simplejpeg_module() is not None  # a default dependency
    for path, k in ((shared_data / "slides" / "cmu-1-small-region.svs", 2), (he_ycbcr, 2), (he_ycbcr, 4)):
        d, n_differ, n_tiles = _tile_diffs(path, k)
        mean, p99 = float(d.mean()), float(np.percentile(d, 99))
        assert mean <= 1.5 and p99 <= 12, (path.name, k, mean, p99, int(d.max()))
        assert n_differ >= n_tiles // 2, (path.name, n_differ, n_tiles)


def test_without_simplejpeg_scaled_reads_are_decode_then_resize_exactly(slides: dict[str, Path],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from hwsi.slide.jpeg_tiles import simplejpeg_module

    with monkeypatch.context() as m:
        m.setitem(sys.modules, "simplejpeg", None)  # `import simplejpeg` raises ImportError
        simplejpeg_module.cache_clear()
        assert simplejpeg_module() is None
        with open_slide(slides["m025"]) as s:
            g = all_tissue_grid(s)
            assert dct_factor_for(s, 0, g.scale, 0.02) == 2
            ref_cfg = ReaderConfig(dct_scale=False)  # integer ratio: one INTER_AREA of the whole box
            n = 0
            for rp, ref in zip(iter_regions(s, g, threads=2), iter_regions(s, g, ref_cfg, threads=2)):
                np.testing.assert_array_equal(rp.patches, ref.patches)
                n += 1
            assert n == g.n_regions
    simplejpeg_module.cache_clear()
    assert simplejpeg_module() is not None


def _write_with_truncated_tile(src: Path, dst: Path, bad: int) -> None:
    """Copy a one-level JPEG TIFF tile by tile, tile ``bad`` cut to its first half (byte count says so too)."""
    with tifffile.TiffFile(src) as tf:
        page = tf.pages[0]
        fh = tf.filehandle
        tiles = []
        for i, (off, n) in enumerate(zip(page.dataoffsets, page.databytecounts)):
            fh.seek(off)
            data = fh.read(n)
            tiles.append(data[: n // 2] if i == bad else data)
        xres = page.tags["XResolution"].value
        tifffile.imwrite(dst, iter(tiles), shape=page.shape, dtype=np.uint8, tile=(page.tilelength, page.tilewidth),
                         photometric="rgb", compression="jpeg", jpegtables=page.jpegtables,
                         resolution=(xres[0] / xres[1], xres[0] / xres[1]), resolutionunit="CENTIMETER",
                         metadata=None)


def test_truncated_tile_falls_back_to_the_full_decode(he_ycbcr: Path, tmp_path: Path) -> None:
    """simplejpeg (strict) refuses a truncated tile; that tile is then decoded at full size and shrunk, exactly
    what the full-decode path gives for it (imagecodecs fills the missing rows grey without an error, so neither
    path reports it corrupt), while the other tiles stay DCT-scaled."""
    import simplejpeg

    from hwsi.slide.jpeg_tiles import _stream

    bad = 8 * 2 + 3  # tile (col 3, row 2) of the 8 x 8 grid
    p = tmp_path / "trunc.tiff"
    _write_with_truncated_tile(he_ycbcr, p, bad)
    with open_slide(p) as s:
        tl = s.tiff_levels[0]
        data = os.pread(s.raw_fd(), int(tl.bytecounts[bad]), int(tl.offsets[bad]))
        with pytest.raises(ValueError):
            simplejpeg.decode_jpeg(_stream(tl, data), min_height=128, min_width=128, strict=True)
        g = all_tissue_grid(s, GridConfig(region_size=512, patch_size=128))
        assert g.scale == 2.0
        regions = {rp.coords: rp for rp in iter_regions(s, g)}
        refs = {rp.coords: rp for rp in iter_regions(s, g, ReaderConfig(dct_scale=False))}
        assert not any(r.corrupt_tiles for r in regions.values())
        rp, ref = regions[(0, 0)], refs[(0, 0)]  # region (0, 0) covers tiles 0..3 x 0..3 at 1/2
        ys, xs = slice(2 * 128, 3 * 128), slice(3 * 128, 4 * 128)
        np.testing.assert_array_equal(rp.image[ys, xs], ref.image[ys, xs])
        assert (rp.image[ys, xs][-8:] == 128).all()  # the rows the stream lacked: libjpeg's grey
        other = rp.image[:128, :128].astype(int) - ref.image[:128, :128]
        assert other.any()  # the intact tiles took the DCT-scaled path


def test_thumbnail_dct_scaled_within_bound(he_ycbcr: Path) -> None:
    with open_slide(he_ycbcr) as s:
        thumb = s.thumbnail(512)  # 4x down: 1/4 decodes
        ref = read_level_box(s, 0, 0, 0, 2048, 2048)[0]
        ref = cv2.resize(ref, (512, 512), interpolation=cv2.INTER_AREA)
        mean, p99 = stats(thumb, ref)
        assert thumb.shape == (512, 512, 3) and 0 < mean <= 1.5 and p99 <= 8, (mean, p99)


def test_strips_with_fast_upsampling_within_bound_on_real_he(he_ycbcr: Path) -> None:
    """The real H&E pixels (YCbCr 4:2:0) read as a 0.2631 µm/px slide at 0.5 (strips): with libjpeg-turbo's fast
    chroma upsampling (the default) and without, both within the strip bound of the whole box + INTER_AREA, and
    within 2 grey levels of each other on average. Measured (all regions): fast mean 0.42, p99 6 against INTER_AREA;
    without fast upsampling 0.33, 5; fast against not 0.23, 4."""
    with open_slide(he_ycbcr, mpp=0.2631) as s:
        g = all_tissue_grid(s)
        assert 1.89 < g.scale < 1.91 and g.read_level == 0
        fast = iter_regions(s, g)
        exact = iter_regions(s, g, ReaderConfig(fast_upsample=False))
        box = iter_regions(s, g, ReaderConfig(resample="box", dct_scale=False))
        n = 0
        for f, e, b in zip(fast, exact, box):
            for img in (f.image, e.image):
                mean, p99 = stats(img, b.image)
                assert mean <= 3 and p99 <= 16, (f.coords, mean, p99)
            mean, _ = stats(f.image, e.image)
            assert 0 < mean <= 2, mean  # fast upsampling really ran (the pixels differ), and little
            n += 1
        assert n == g.n_regions

"""Grid geometry and region reads on synthetic pyramids (written with hwsi.synth.pyramid) and real files.

Bounds: where no resampling happens, region pixels EQUAL OpenSlide's level-0 pixels (same JPEG tiles). Across
pyramid levels, a region read from a reduced level and resized agrees with the level-0 read resized the same way
within mean |diff| <= 3 and 99th percentile <= 16 grey levels (JPEG of the reduced level + box vs area filter).
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest

from hwsi.errors import SlideError
from hwsi.slide import GridConfig, ReaderConfig, build_grid, compute_tissue, iter_regions, open_slide, read_level_box
from hwsi.synth.pyramid import write_pyramid_tiff


def tissue_fn(split_x: int | None = None):
    """Pink textured 'tissue' everywhere (or left of ``split_x``), white glass elsewhere."""

    def fn(x0: int, y0: int, w: int, h: int) -> np.ndarray:
        yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w]
        r = 200 + 30 * np.sin(xx / 13.0) * np.cos(yy / 17.0)
        g = 110 + 40 * np.sin((xx + yy) / 29.0)
        b = 170 + 25 * np.cos(xx / 41.0)
        img = np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)
        if split_x is not None:
            img[xx >= split_x] = 243
        return img

    return fn


def os_read(path: Path, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
    s = openslide.OpenSlide(str(path))
    try:
        a = np.asarray(s.read_region((x, y), level, (w, h))).astype(np.int16)
        # composite OpenSlide's premultiplied RGBA on white (outside the slide = white background)
        return (a[..., :3] + 255 - a[..., 3:4]).clip(0, 255).astype(np.uint8)
    finally:
        s.close()


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("slides")
    out = {}
    for name, w, h, mpp in (("m050", 2000, 1500, 0.5), ("m025", 3000, 2100, 0.25), ("m2631", 2500, 1900, 0.2631),
                            ("tiny", 300, 200, 0.5)):
        out[name] = d / f"{name}.tiff"
        write_pyramid_tiff(out[name], w, h, mpp, tissue_fn(), min_level_side=256)
    out["half"] = d / "half.tiff"
    write_pyramid_tiff(out["half"], 2048, 1024, 0.5, tissue_fn(split_x=1024), min_level_side=256)
    return out


CFG = GridConfig(region_size=512, patch_size=64)


@pytest.mark.parametrize("name", ["m050", "m025", "m2631", "tiny"])
def test_grid_counts_and_coordinates_exact(slides: dict[str, Path], name: str) -> None:
    with open_slide(slides[name]) as s:
        t = compute_tissue(s, patch_size_level0=64)
        g = build_grid(s, t.mask, t.downsample, CFG)
        scale = 1.0 if abs(s.mpp / 0.5 - 1) <= 0.02 else 0.5 / s.mpp
        r0, p0 = 512 * scale, 64 * scale
        w, h = s.dimensions
        nx, ny = math.ceil(w / r0), math.ceil(h / r0)
        assert g.n_candidates == nx * ny
        assert g.region_size_level0 == pytest.approx(r0) and g.patch_size_level0 == pytest.approx(p0)
        assert g.effective_mpp == pytest.approx(0.5 if scale != 1 else s.mpp)
        assert g.read_level == s.best_level_for_downsample(scale)
        assert g.region_coords.dtype == np.int64 and g.patch_coords.dtype == np.int64
        # all-tissue slide: every region is kept (edge ones have >= 5 % inside the slide here)
        expect = {(round(j * r0), round(i * r0)) for i in range(ny) for j in range(nx)}
        assert {tuple(c) for c in g.region_coords.tolist()} == expect
        assert g.patch_coords.shape == (g.n_regions, 64, 2)
        for r in range(g.n_regions):
            x, y = g.region_coords[r]
            k = np.arange(8)
            np.testing.assert_array_equal(g.patch_coords[r, :, 0], x + np.tile(np.rint(k * p0), 8))
            np.testing.assert_array_equal(g.patch_coords[r, :, 1], y + np.repeat(np.rint(k * p0), 8))
        # patches outside the slide (padded edge regions) are not tissue; inside ones are
        inside = (g.patch_coords[..., 0] + p0 <= w) & (g.patch_coords[..., 1] + p0 <= h)
        outside = (g.patch_coords[..., 0] >= w) | (g.patch_coords[..., 1] >= h)
        assert g.patch_tissue[inside].mean() > 0.97
        assert not g.patch_tissue[outside].any()


def test_regions_without_tissue_are_dropped(slides: dict[str, Path]) -> None:
    with open_slide(slides["half"]) as s:
        t = compute_tissue(s, patch_size_level0=64)
        g = build_grid(s, t.mask, t.downsample, CFG)
        assert g.n_candidates == 8 and g.n_regions == 4
        assert (g.region_coords[:, 0] < 1024).all()
        left = g.patch_coords[..., 0] + 64 <= 1000
        assert g.patch_tissue[left].all()


def test_no_tissue_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "blank.tiff"
    write_pyramid_tiff(p, 1024, 1024, 0.5, lambda x, y, w, h: np.full((h, w, 3), 240, np.uint8))
    with open_slide(p) as s:
        t = compute_tissue(s)
        with pytest.raises(SlideError, match="no tissue"):
            build_grid(s, t.mask, t.downsample, CFG)


@pytest.mark.parametrize("fast", [True, False])
def test_pixels_equal_without_resampling(slides: dict[str, Path], fast: bool) -> None:
    p = slides["m050"]
    with open_slide(p) as s:
        t = compute_tissue(s, patch_size_level0=64)
        g = build_grid(s, t.mask, t.downsample, CFG)
        assert g.resample_free
        n = 0
        for rp in iter_regions(s, g, ReaderConfig(fast_path=fast), threads=2):
            x, y = rp.coords
            ref = os_read(p, x, y, 0, 512, 512)
            inside = ref[: max(0, 1500 - y), : max(0, 2000 - x)]
            np.testing.assert_array_equal(rp.image[: inside.shape[0], : inside.shape[1]], inside)
            assert (rp.image[inside.shape[0] :] == 255).all() and (rp.image[:, inside.shape[1] :] == 255).all()
            np.testing.assert_array_equal(rp.patches[9], rp.image[64:128, 64:128])
            n += 1
        assert n == g.n_regions


@pytest.mark.parametrize("name", ["m025", "m2631"])
def test_best_level_path_matches_level0_resized(slides: dict[str, Path], name: str) -> None:
    p = slides[name]
    with open_slide(p) as s:
        t = compute_tissue(s, patch_size_level0=64)
        g = build_grid(s, t.mask, t.downsample, CFG)
        assert g.read_level == (1 if name == "m025" else 0)
        r0 = int(round(g.region_size_level0))
        w, h = s.dimensions
        for rp in iter_regions(s, g, threads=2):
            x, y = rp.coords
            if x + r0 > w or y + r0 > h:
                continue  # edge regions: compared inside the slide only in the next test
            ref = cv2.resize(os_read(p, x, y, 0, r0, r0), (512, 512), interpolation=cv2.INTER_AREA).astype(int)
            d = np.abs(rp.image.astype(int) - ref)
            assert d.mean() <= 3 and np.percentile(d, 99) <= 16, (rp.coords, d.mean())


def test_cmu_grid_and_patch_pixels(shared_data: Path) -> None:
    p = shared_data / "slides" / "cmu-1-small-region.svs"
    with open_slide(p) as s:
        t = compute_tissue(s, patch_size_level0=256)
        g = build_grid(s, t.mask, t.downsample, GridConfig(region_size=1024, patch_size=256))
        assert g.scale == 1.0 and g.effective_mpp == pytest.approx(0.499) and g.region_size_level0 == 1024
        assert g.n_candidates == 3 * 3
        assert {tuple(c) for c in g.region_coords.tolist()} <= {(x, y) for x in (0, 1024, 2048) for y in (0, 1024, 2048)}
        checked = 0
        for rp in iter_regions(s, g, threads=2):
            for k in np.nonzero(g.patch_tissue[rp.index])[0][:4]:
                px, py = g.patch_coords[rp.index, k]
                ref = os_read(p, int(px), int(py), 0, 256, 256)
                np.testing.assert_array_equal(rp.patches[k], ref)
                checked += 1
        assert checked >= 8


@pytest.mark.parametrize("name,mpp", [("boxes.tiff", 0.125), ("small.svs", 0.5)])
def test_real_pyramids_best_level_vs_level0(shared_data: Path, name: str, mpp: float) -> None:
    p = shared_data / "slides" / name
    with open_slide(p, mpp=mpp) as s:
        for level in range(s.level_count):  # the fast path decodes every level exactly like OpenSlide
            w, h = s.level_dimensions[level]
            img, bad = read_level_box(s, level, 0, 0, w, h)
            assert not bad
            np.testing.assert_array_equal(img, os_read(p, 0, 0, level, w, h))
        if s.level_count > 1:  # boxes: 0.5 µm/px from 0.125 → scale 4 → level 1 (ds 2) + resize
            g = build_grid(s, np.ones((250, 300), bool), 1.0, GridConfig(region_size=64, patch_size=16))
            assert g.read_level == 1 and g.scale == 4.0
            rp = next(iter_regions(s, g, indices=[0]))
            same = cv2.resize(os_read(p, 0, 0, 1, 128, 128), (64, 64), interpolation=cv2.INTER_AREA)
            np.testing.assert_array_equal(rp.image, same)  # = OpenSlide's level 1, resized the same way
            ref = cv2.resize(os_read(p, 0, 0, 0, 256, 256), (64, 64), interpolation=cv2.INTER_AREA).astype(int)
            d = np.abs(rp.image.astype(int) - ref)
            # hard-edged boxes: the file's own level 1 is not an exact 2x reduction of level 0 along box edges
            assert d.mean() <= 8 and np.median(d) == 0


def test_corrupt_tile_recorded_black_and_fails_past_threshold(tmp_path: Path) -> None:
    import tifffile

    p = tmp_path / "c.tiff"
    write_pyramid_tiff(p, 1024, 1024, 0.5, tissue_fn(), n_levels=2)
    with tifffile.TiffFile(p) as tf:
        off = tf.pages[0].dataoffsets[5]  # level-0 tile (col 1, row 1)
    with open(p, "r+b") as fh:
        fh.seek(off)
        fh.write(b"\x00" * 64)  # destroy the JPEG header of the tile
    with open_slide(p) as s:
        g = build_grid(s, np.ones((64, 64), bool), 16.0, CFG)
        regions = list(iter_regions(s, g, ReaderConfig(max_corrupt_tiles=4)))
        bad = [r for r in regions if r.corrupt_tiles]
        assert len(bad) == 1 and bad[0].corrupt_tiles == [(0, 1, 1)]
        rp = bad[0]
        assert (rp.image[256:512, 256:512] == 0).all()  # black, never white
        assert rp.corrupt_patches is not None and rp.corrupt_patches.reshape(8, 8)[4:8, 4:8].all()
        assert rp.corrupt_patches.sum() == 16
        with pytest.raises(SlideError, match="corrupt tiles"):
            list(iter_regions(s, g, ReaderConfig(max_corrupt_tiles=0)))
        # the fallback path (OpenSlide) records it too, and keeps reading after reopening its handle
        regions = list(iter_regions(s, g, ReaderConfig(fast_path=False, max_corrupt_tiles=4)))
        assert sum(len(r.corrupt_tiles) for r in regions) >= 1
        good = [r for r in regions if not r.corrupt_tiles]
        assert len(good) == 3 and all(r.image.mean() < 250 for r in good)


# ---- direct patch path (tiles decoded straight into a (G, P, P, 3) buffer) vs the previous path / OpenSlide ------


def _tissue_grid(s, cfg: GridConfig = CFG):
    w, h = s.dimensions
    return build_grid(s, np.ones((-(-h // 16), -(-w // 16)), bool), 16.0, cfg)


def _check_against_openslide(p: Path, rp, size: tuple[int, int], r: int = 512) -> None:
    x, y = rp.coords
    ref = os_read(p, x, y, 0, r, r)
    inside = ref[: max(0, size[1] - y), : max(0, size[0] - x)]
    np.testing.assert_array_equal(rp.image[: inside.shape[0], : inside.shape[1]], inside)
    assert (rp.image[inside.shape[0] :] == 255).all() and (rp.image[:, inside.shape[1] :] == 255).all()


@pytest.mark.parametrize("tile", [64, 128, 80, 240])  # = patch (decoded in place), 2x patch, unaligned (SVS-like)
def test_direct_patches_equal_previous_path_and_openslide(tmp_path: Path, tile: int) -> None:
    p = tmp_path / f"t{tile}.tiff"
    size = (1100, 700)  # not a multiple of the region, patch or tile side: edge regions and border tiles
    write_pyramid_tiff(p, *size, 0.5, tissue_fn(), tile_size=tile, n_levels=1)
    with open_slide(p) as s:
        g = _tissue_grid(s)
        assert g.resample_free and g.n_regions == 6
        new = list(iter_regions(s, g, threads=2))
        old = list(iter_regions(s, g, ReaderConfig(direct_patches=False), threads=2))
        assert [r.index for r in new] == [r.index for r in old] == list(range(6))
        for a, b in zip(new, old):
            assert a._patches is not None and a._image is None  # produced in patch layout, no image assembled
            assert a.patches.shape == (64, 64, 64, 3) and a.patches.flags.c_contiguous
            np.testing.assert_array_equal(a.patches, b.patches)
            np.testing.assert_array_equal(a.patch_grid, b.patch_grid)
            for k in (0, 9, 63):
                np.testing.assert_array_equal(a.patch(k), b.patch(k))
            np.testing.assert_array_equal(a.image, b.image)
            assert a.corrupt_tiles == [] and a.corrupt_patches is None
            _check_against_openslide(p, a, size)
        # the public single-region read (no pool) gives the same pixels
        from hwsi.slide import read_region_pixels

        np.testing.assert_array_equal(read_region_pixels(s, g, 5).patches, old[5].patches)


def test_direct_patches_non_jpeg_tiles(tmp_path: Path) -> None:
    import tifffile

    p = tmp_path / "zlib.tiff"
    img = tissue_fn()(0, 0, 700, 600)
    tifffile.imwrite(p, img, tile=(64, 64), compression="zlib", photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(p) as s:
        assert s.tiff_levels is not None and s.tiff_levels[0].jpeg_colorspace is None
        g = _tissue_grid(s)
        for rp in iter_regions(s, g, threads=2):
            x, y = rp.coords
            ref = np.full((512, 512, 3), 255, np.uint8)
            part = img[y : y + 512, x : x + 512]
            ref[: part.shape[0], : part.shape[1]] = part
            np.testing.assert_array_equal(rp.image, ref)  # lossless: the stored pixels exactly


@pytest.mark.parametrize("tile", [64, 256])  # corrupt tile = one patch decoded in place / a tile of 16 patches
def test_direct_patches_corrupt_tile_black_and_recorded(tmp_path: Path, tile: int) -> None:
    import tifffile

    p = tmp_path / "c.tiff"
    write_pyramid_tiff(p, 1024, 1024, 0.5, tissue_fn(), tile_size=tile, n_levels=2)
    col, row = 320 // tile, 192 // tile
    with tifffile.TiffFile(p) as tf:
        off = tf.pages[0].dataoffsets[row * (1024 // tile) + col]
    with open(p, "r+b") as fh:
        fh.seek(off)
        fh.write(b"\x00" * 64)
    with open_slide(p) as s:
        g = build_grid(s, np.ones((64, 64), bool), 16.0, CFG)
        new = list(iter_regions(s, g, ReaderConfig(max_corrupt_tiles=4)))
        old = list(iter_regions(s, g, ReaderConfig(max_corrupt_tiles=4, direct_patches=False)))
        bad = [r for r in new if r.corrupt_tiles]
        assert len(bad) == 1 and bad[0].index == 0 and bad[0].corrupt_tiles == [(0, col, row)]
        rp = bad[0]
        assert (rp.image[row * tile : (row + 1) * tile, col * tile : (col + 1) * tile] == 0).all()  # black
        assert rp.corrupt_patches is not None and rp.corrupt_patches.sum() == (tile // 64) ** 2
        for a, b in zip(new, old):
            assert a.corrupt_tiles == b.corrupt_tiles
            np.testing.assert_array_equal(a.patches, b.patches)
            if b.corrupt_patches is not None:
                np.testing.assert_array_equal(a.corrupt_patches, b.corrupt_patches)
        with pytest.raises(SlideError, match="corrupt tiles"):
            list(iter_regions(s, g, ReaderConfig(max_corrupt_tiles=0)))


def test_buffer_lifetime_contract(tmp_path: Path) -> None:
    """Buffers are recycled only when unreferenced: a plain loop reuses a few; kept regions/views stay intact."""
    p = tmp_path / "many.tiff"
    write_pyramid_tiff(p, 2048, 2048, 0.5, tissue_fn(), tile_size=64, n_levels=1)
    with open_slide(p) as s:
        g = _tissue_grid(s)
        assert g.n_regions == 16
        ref = {rp.index: rp.patches.copy() for rp in iter_regions(s, g, ReaderConfig(direct_patches=False))}

        def ptr(a: np.ndarray) -> int:
            return a.__array_interface__["data"][0]

        # 1. a consumer that drops each region before the next: the pool's buffers circulate (≤ queue + 2)
        seen = set()
        for rp in iter_regions(s, g, threads=2):  # queue_size = 4 -> pool of 6
            np.testing.assert_array_equal(rp.patches, ref[rp.index])
            seen.add(ptr(rp.patches))
        assert len(seen) <= 6
        # 2. a consumer that keeps every region: each has its own buffer, none overwritten
        kept = list(iter_regions(s, g, threads=2))
        assert len({ptr(rp.patches) for rp in kept}) == 16
        for rp in kept:
            np.testing.assert_array_equal(rp.patches, ref[rp.index])
        del kept
        # 3. a consumer that keeps only views (one patch, the patch grid) and drops the regions: views stay valid
        views = []
        for rp in iter_regions(s, g, threads=2):
            views.append((rp.index, rp.patch(3), rp.patch_grid[7, 1]))
        for i, v, w in views:
            np.testing.assert_array_equal(v, ref[i][3])
            np.testing.assert_array_equal(w, ref[i][7 * 8 + 1])
        # 4. a kept region's pixels survive later iterations that recycle the other buffers
        it = iter_regions(s, g, threads=1)
        first = next(it)
        for _ in it:
            pass
        np.testing.assert_array_equal(first.patches, ref[first.index])

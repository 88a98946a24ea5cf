"""DZI tiles served each case the faster way (hwsi.serve.dzi.TileSource.route; numbers: benchmarks/tiles.py):
the route per level on 2x- and 4x-step pyramids and a small slide, the same geometry as openslide's
DeepZoomGenerator, and the pixels of each route against DeepZoomGenerator's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hwsi.serve.dzi import TileSource, open_reader
from hwsi.synth.pyramid import write_pyramid_tiff

W, H = 6144, 4608  # > TileSource.OVERVIEW_SIDE: the overview (ds 3) exists


def _texture(x0: int, y0: int, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w].astype(np.float32)
    base = 0.5 + 0.25 * np.sin(xx / 37.0) * np.cos(yy / 53.0)
    return np.clip(np.stack([230 - 60 * base, 170 - 90 * base, 210 - 50 * base], -1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    d = tmp_path_factory.mktemp("tiles")
    out = {}
    for step in (2, 4):
        out[step] = d / f"p{step}.tiff"
        write_pyramid_tiff(out[step], W, H, 0.5, _texture, level_step=step)  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize("step", [2, 4])
def test_route_per_level_and_pixels_against_deepzoom(slides: dict[int, Path], step: int) -> None:
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    src = TileSource("p", open_reader(slides[step], 0.5))
    osr = openslide.OpenSlide(str(slides[step]))
    dz = DeepZoomGenerator(osr, tile_size=256, overlap=0, limit_bounds=False)
    try:
        g = src.geometry
        assert dz.level_count == g.max_level + 1
        assert [dz.level_dimensions[L] for L in range(dz.level_count)] == [g.level_size(L) for L in range(dz.level_count)]
        assert [dz.level_tiles[L] for L in range(dz.level_count)] == [g.tile_grid(L) for L in range(dz.level_count)]
        slide_ds = [round(float(d)) for d in src.reader.level_downsamples]
        assert slide_ds[:3] == ([1, 2, 4] if step == 2 else [1, 4, 16])
        routes = {g.downsample(L): src.route(L) for L in range(g.max_level + 1)}
        ov_ds = max(W, H) / TileSource.OVERVIEW_SIDE  # 3
        for ds, route in routes.items():
            best = max(d for d in slide_ds if d <= ds)  # the slide level a tile is read from
            if ds >= ov_ds and best < ov_ds:
                want = "overview"  # no slide level as coarse as the in-memory overview
            elif best == ds:
                want = "openslide"  # a slide level of that downsample: DeepZoomGenerator returns it as it is
            else:
                want = "level"
            assert route == want, (ds, route, want)
        if step == 4:
            assert routes[2] == "level" and routes[8] == "level" and routes[32] == "level"  # between slide levels
        for L in range(g.max_level - 6, g.max_level + 1):
            cols, rows = g.tile_grid(L)
            for c, r in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2)}:
                a = src.tile(L, c, r).astype(np.int16)
                b = np.asarray(dz.get_tile(L, (c, r)).convert("RGB"), np.int16)
                assert a.shape == b.shape, (L, c, r)
                if src.route(L) == "openslide":
                    assert np.array_equal(a, b), (L, c, r)  # it IS DeepZoomGenerator's tile
                else:  # resampled another way (DCT-scaled decode, box filter): close, not equal
                    assert np.abs(a - b).mean() < 6, (L, c, r, np.abs(a - b).mean())
    finally:
        src.close()
        osr.close()


def test_a_small_slide_has_no_overview_route(tmp_path: Path) -> None:
    p = tmp_path / "small.tiff"
    write_pyramid_tiff(p, 1536, 1024, 0.5, _texture)  # type: ignore[arg-type]
    src = TileSource("s", open_reader(p, 0.5))
    try:
        assert "overview" not in {src.route(L) for L in range(src.geometry.max_level + 1)}
        assert src.thumbnail(128).shape == (85, 128, 3)
    finally:
        src.close()

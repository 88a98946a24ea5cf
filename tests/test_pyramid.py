"""hwsi.synth.pyramid: pyramidal JPEG TIFFs that OpenSlide opens as generic-tiff with the right µm/px.

JPEG tolerance used below (quality 90, smooth gradient content): mean |error| <= 2 grey levels, max <= 16.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import openslide
import pytest

from hwsi.errors import ConfigError
from hwsi.synth.pyramid import pyramid_level_dimensions, write_pyramid_tiff


def gradient(x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Smooth, position-dependent content (so misplaced tiles and wrong levels show)."""
    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w]
    return np.stack([(xx // 7) % 256, (yy // 5) % 256, ((xx + yy) // 11) % 256], -1).astype(np.uint8)


def box_mean(img: np.ndarray, f: int) -> np.ndarray:
    h, w = img.shape[0] // f * f, img.shape[1] // f * f
    return img[:h, :w].astype(float).reshape(h // f, f, w // f, f, 3).mean((1, 3))


@pytest.mark.parametrize("mpp", [0.25, 0.2631, 0.5])
def test_openslide_opens_generic_tiff_with_mpp(tmp_path: Path, mpp: float) -> None:
    p = tmp_path / "s.tiff"
    info = write_pyramid_tiff(p, 3001, 2001, mpp, gradient, min_level_side=300)
    s = openslide.OpenSlide(str(p))
    try:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-6)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(mpp, rel=1e-6)
        assert s.level_dimensions == ((3001, 2001), (1501, 1001), (751, 501), (376, 251), (188, 126))
        assert list(s.level_dimensions) == info.level_dimensions
        a = np.asarray(s.read_region((1000, 500), 0, (300, 300)).convert("RGB")).astype(int)
        err = np.abs(a - gradient(1000, 500, 300, 300).astype(int))
        assert err.mean() <= 2.0 and err.max() <= 16
        # bottom-right edge tile (partial) is right too
        a = np.asarray(s.read_region((2800, 1900), 0, (201, 101)).convert("RGB")).astype(int)
        err = np.abs(a - gradient(2800, 1900, 201, 101).astype(int))
        assert err.mean() <= 2.0 and err.max() <= 16
    finally:
        s.close()


def test_reduced_levels_are_box_averages(tmp_path: Path) -> None:
    p = tmp_path / "s.tiff"
    write_pyramid_tiff(p, 4096, 4096, 0.5, gradient, n_levels=4)
    s = openslide.OpenSlide(str(p))
    try:
        assert s.level_count == 4
        assert s.level_downsamples == pytest.approx((1, 2, 4, 8))
        ref = gradient(1024, 2048, 1024, 1024)
        for level, f in ((1, 2), (2, 4), (3, 8)):
            a = np.asarray(s.read_region((1024, 2048), level, (1024 // f, 1024 // f)).convert("RGB")).astype(float)
            err = np.abs(a - box_mean(ref, f))
            # the box average of a gradient with steps is smooth; JPEG adds the same small error as at level 0
            assert err.mean() <= 2.0, (level, err.mean())
    finally:
        s.close()


def test_tiffslide_reads_it_too(tmp_path: Path) -> None:
    import tiffslide

    p = tmp_path / "s.tiff"
    write_pyramid_tiff(p, 1000, 700, 0.25, gradient, tile_size=128, min_level_side=200)
    s = tiffslide.TiffSlide(str(p))
    assert s.level_dimensions[0] == (1000, 700)
    assert float(s.properties["tiffslide.mpp-x"]) == pytest.approx(0.25, rel=1e-6)
    a = np.asarray(s.read_region((0, 0), 0, (128, 128), as_array=True)).astype(int)
    assert np.abs(a[..., :3] - gradient(0, 0, 128, 128)).mean() <= 2.0


def test_level_dimensions_rule() -> None:
    assert pyramid_level_dimensions(1000, 500, min_level_side=512) == [(1000, 500), (500, 250)]
    assert pyramid_level_dimensions(1000, 500, n_levels=3) == [(1000, 500), (500, 250), (250, 125)]
    assert pyramid_level_dimensions(300, 200, min_level_side=512) == [(300, 200)]


def test_failure_leaves_no_file(tmp_path: Path) -> None:
    p = tmp_path / "s.tiff"

    def bad(x0: int, y0: int, w: int, h: int) -> np.ndarray:
        if y0 >= 512:
            raise RuntimeError("boom")
        return gradient(x0, y0, w, h)

    with pytest.raises(RuntimeError, match="boom"):
        write_pyramid_tiff(p, 1024, 1024, 0.5, bad)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mpp"):
        write_pyramid_tiff(tmp_path / "a.tiff", 100, 100, 0.0, gradient)
    with pytest.raises(ConfigError, match="tile_size"):
        write_pyramid_tiff(tmp_path / "a.tiff", 100, 100, 0.5, gradient, tile_size=100)
    with pytest.raises(ValueError, match="expected uint8"):
        write_pyramid_tiff(tmp_path / "a.tiff", 100, 100, 0.5, lambda x, y, w, h: np.zeros((h, w), np.uint8))
    assert not (tmp_path / "a.tiff").exists()


_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from hwsi.synth.pyramid import write_pyramid_tiff
    w, h = int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    write_pyramid_tiff(sys.argv[1], w, h, 0.5, lambda x, y, tw, th: noise[:th, :tw], threads=2)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def _peak_rss_kb(path: Path, w: int, h: int) -> int:
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), str(w), str(h)], check=True,
                         capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_memory_does_not_grow_with_height(tmp_path: Path) -> None:
    small = _peak_rss_kb(tmp_path / "a.tiff", 2048, 1024)
    tall = _peak_rss_kb(tmp_path / "b.tiff", 2048, 24576)  # 24x the pixels (150 MB raw at level 0)
    assert tall - small < 25 * 1024, (small, tall)


def test_four_times_step_pyramid(tmp_path: Path) -> None:
    p = tmp_path / "s4.tiff"
    info = write_pyramid_tiff(p, 2048, 1536, 0.5, gradient, n_levels=5, level_step=4)
    assert info.level_dimensions == [(2048, 1536), (512, 384), (128, 96)]
    s = openslide.OpenSlide(str(p))
    try:
        assert [round(d) for d in s.level_downsamples] == [1, 4, 16]
        lvl1 = np.asarray(s.read_region((0, 0), 1, (128, 96)))[..., :3].astype(float)
        assert np.abs(lvl1 - box_mean(gradient(0, 0, 512, 384), 4)).mean() <= 2.5  # the 4x box average of level 0
    finally:
        s.close()
    with pytest.raises(ConfigError, match="level_step must be 2 or 4"):
        write_pyramid_tiff(tmp_path / "x.tiff", 64, 64, 0.5, gradient, level_step=3)  # type: ignore[arg-type]

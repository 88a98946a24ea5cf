"""SynthPath renderer and scene: window independence, determinism, findable nuclei, written slides."""

from __future__ import annotations

import numpy as np
import pytest

from hwsi.synth.classes import GLAND, SOLID, SlideClasses, SynthError, parse_classes
from hwsi.synth.render import render_window
from hwsi.synth.scene import Scene, SceneConfig


def _scene(seed: int = 3, diag: str = "adenocarcinoma_high_grade", extent: str = "extensive", **kw) -> Scene:
    cfg = SceneConfig(width=kw.pop("width", 3072), height=kw.pop("height", 3072), seed=seed,
                      classes=SlideClasses(diag, extent), **kw)
    return Scene(cfg)


def test_window_independence() -> None:
    sc = _scene()
    big = render_window(sc, 1000, 1200, 600, 500)
    small = render_window(sc, 1137, 1301, 211, 190)
    assert big.dtype == np.uint8 and big.shape == (500, 600, 3)
    np.testing.assert_array_equal(big[101:291, 137:348], small)


def test_scene_deterministic_and_seed_dependent() -> None:
    a, b, c = _scene(5).nuclei(), _scene(5).nuclei(), _scene(6).nuclei()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["x"].size != c["x"].size or not np.array_equal(a["x"], c["x"])
    np.testing.assert_array_equal(render_window(_scene(5), 800, 800, 256, 256), render_window(_scene(5), 800, 800, 256, 256))


def test_pixels_look_like_he() -> None:
    sc = _scene()
    img = render_window(sc, 0, 0, 3072, 3072)[::4, ::4]
    corner = img[:20, :20].reshape(-1, 3).mean(0)
    assert corner.min() > 225  # white background outside the tissue outline
    centre = img[300:460, 300:460].reshape(-1, 3).astype(float)
    assert centre[:, 1].mean() < centre[:, 0].mean() - 30  # pink/purple: green absorbed most


def test_extent_and_lesions() -> None:
    for seed in range(3):
        f = _scene(seed, "dysplasia", "focal")
        assert f.region_lesion.sum() == 1
        e = _scene(seed, "solid_carcinoma", "extensive")
        assert e.region_lesion.sum() >= np.ceil(e.n_tissue_regions / 2)
        assert (e.region_atypia == e.region_lesion).all()
        assert (e.patterns == SOLID).any() and (e.patterns == GLAND).any()
    assert _scene(0, "benign", "none").region_lesion.sum() == 0


def test_bad_input_errors() -> None:
    with pytest.raises(SynthError):
        SlideClasses("benign", "focal")
    with pytest.raises(SynthError):
        parse_classes("carcinoid")
    with pytest.raises(SynthError, match="tissue region"):
        _scene(0, width=1024, height=1024)
    with pytest.raises(SynthError):
        Scene(SceneConfig(region_size=1000, patch_size=64))
    assert parse_classes("adenocarcinoma_low_grade,extensive") == SlideClasses("adenocarcinoma_low_grade", "extensive")


def test_nuclei_found_by_colour_deconvolution_watershed() -> None:
    from scipy import ndimage
    from scipy.spatial import cKDTree
    from skimage.color import rgb2hed
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.measure import regionprops
    from skimage.segmentation import watershed

    sc = _scene(4, "solid_carcinoma", "extensive")
    nuc = sc.nuclei()
    # a window inside a lesional region (solid sheets + atypical nuclei) and one in a normal region
    for lesion in (True, False):
        ry, rx = np.argwhere(sc.region_lesion == lesion)[np.argmax(sc.region_tissue[sc.region_lesion == lesion])]
        x0, y0, w = int(rx * 1024 + 256), int(ry * 1024 + 256), 512
        img = render_window(sc, x0, y0, w, w)
        h = rgb2hed(img)[..., 0]
        mask = ndimage.binary_opening(h > threshold_otsu(h), iterations=1)
        dist = ndimage.distance_transform_edt(mask)
        peaks = peak_local_max(dist, min_distance=4, labels=ndimage.label(mask)[0])
        markers = np.zeros(mask.shape, dtype=np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        lab = watershed(-dist, markers, mask=mask)
        found = np.array([p.centroid for p in regionprops(lab) if p.area >= 10])[:, ::-1] + [x0, y0]
        m = 8
        inside = (nuc["x"] >= x0 + m) & (nuc["x"] < x0 + w - m) & (nuc["y"] >= y0 + m) & (nuc["y"] < y0 + w - m)
        gt = np.stack([nuc["x"][inside], nuc["y"][inside]], 1)
        d, _ = cKDTree(found).query(gt)
        recall = float((d <= 4.0 / sc.cfg.mpp * 0.5 + 2).mean())
        assert gt.shape[0] > 20
        assert recall >= 0.8, (lesion, recall)


def test_written_slide_opens_with_openslide(tmp_path) -> None:
    openslide = pytest.importorskip("openslide")
    from hwsi.synth.cohort import write_slide
    from hwsi.synth.truth import read_truth

    cfg = SceneConfig(width=1536, height=1280, mpp=0.25, region_size=512, patch_size=64, seed=2,
                      classes=SlideClasses("adenocarcinoma_low_grade", "focal"))
    rec = write_slide(tmp_path, cfg, "s1")
    with openslide.OpenSlide(rec.path) as s:
        assert s.dimensions == (1536, 1280)
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25, rel=1e-3)
        assert s.level_count >= 2
        got = np.asarray(s.read_region((512, 512), 0, (256, 256)).convert("RGB")).astype(float)
    want = render_window(Scene(cfg), 512, 512, 256, 256).astype(float)
    assert np.abs(got - want).mean() < 6  # JPEG
    t = read_truth(rec.truth)
    G = 512 // 64
    R = 3 * 3
    assert t.data["patches/pattern"].shape == (R, G * G)
    assert t.data["patches/coords"].shape == (R, G * G, 2)
    assert t.data["cells/x"].size > 100 and t.data["cells/x"].max() < 1536 and t.data["cells/y"].max() < 1280
    assert t.facts["diagnosis"] == "adenocarcinoma_low_grade" and t.facts["n_lesion_regions"] == 1
    assert int(t.data["regions/lesion"].sum()) == 1

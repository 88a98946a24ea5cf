"""Each scale's evidence is hidden from the others: single-scale linear probes fail on facts another scale owns."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hwsi.synth.classes import ARCH_CROWDED, ARCH_REGULAR, GLAND, PATTERNS, SlideClasses
from hwsi.synth.render import render_window
from hwsi.synth.scene import Scene, SceneConfig, region_layout, same_neighbour_fraction


def _probe(X: np.ndarray, y: np.ndarray) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    return float(cross_val_score(clf, X, y, cv=5).mean())


def test_atypia_visible_at_full_resolution_not_in_downsampled_patch() -> None:
    import cv2
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    P = 256
    sc = Scene(SceneConfig(width=8192, height=8192, region_size=2048, patch_size=P, seed=1,
                           classes=SlideClasses("adenocarcinoma_low_grade", "extensive")))
    rr, cc = np.nonzero((sc.patterns == GLAND) & (sc.patch_tissue >= 1))
    idx = np.random.default_rng(0).permutation(rr.size)[:80]
    # same pool of gland patches; only the nuclei differ (normal vs atypical epithelium)
    sc.set_region_atypia(False)
    normal = [render_window(sc, cc[i] * P, rr[i] * P, P, P) for i in idx[:40]]
    sc.set_region_atypia(True)
    atypical = [render_window(sc, cc[i] * P, rr[i] * P, P, P) for i in idx[40:]]
    y = np.array([0] * 40 + [1] * 40)

    def low(img: np.ndarray) -> np.ndarray:  # what the patch encoder sees: 4x area downsample to 64 px
        s = cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA)
        f = s.reshape(-1, 3).astype(np.float32)
        h = rgb2hed(s)[..., 0]
        return np.concatenate([f.mean(0), f.std(0), np.percentile(f.mean(1), [5, 10, 25, 50]), [h.mean(), h.std()],
                               np.percentile(h, [50, 90, 95])])

    def full(img: np.ndarray) -> np.ndarray:  # nucleus segmentation at full resolution
        h = rgb2hed(img)[..., 0]
        lab = label(h > threshold_otsu(h))
        props = [p for p in regionprops(lab, intensity_image=h) if p.area >= 15]
        area = np.array([p.area for p in props], dtype=float)
        sol = np.array([p.solidity for p in props])
        tex = np.array([h[lab == p.label].std() / h[lab == p.label].mean() for p in props])
        return np.array([area.mean(), area.std() / area.mean(), sol.mean(), tex.mean(), len(props)])

    X_low = np.array([low(i) for i in normal + atypical])
    X_full = np.array([full(i) for i in normal + atypical])
    acc_low, acc_full = _probe(X_low, y), _probe(X_full, y)
    # same nuclear count and mean colour: density/colour statistics of the 64 px view stay near chance
    assert abs(X_low[:40, :3].mean() - X_low[40:, :3].mean()) < 1.0
    assert acc_low <= 0.75, acc_low
    assert acc_full >= 0.95, acc_full


def test_region_architecture_is_arrangement_not_patch_content() -> None:
    G = 16
    rng = np.random.default_rng(0)
    layouts = [region_layout(a, G, 0.5, rng) for a in [ARCH_REGULAR] * 30 + [ARCH_CROWDED] * 30]
    y = np.array([0] * 30 + [1] * 30)
    # per-patch view: how many patches of each pattern the region holds (a bag of patches)
    bag = np.array([[np.mean(lay == k) for k in range(len(PATTERNS))] for lay in layouts])
    assert np.ptp(bag, axis=0).max() == 0  # identical patch composition
    spatial = np.array([[same_neighbour_fraction(lay, GLAND)] for lay in layouts])
    assert _probe(bag + rng.normal(0, 1e-6, bag.shape), y) <= 0.6
    assert _probe(spatial, y) >= 0.95
    assert spatial[:30].max() < spatial[30:].min()


def test_extent_is_slide_level_only() -> None:
    # a lesional region looks the same in focal and extensive slides (same architecture and atypia);
    # only the count of lesional regions separates them
    per_region, counts, y = [], [], []
    for seed in range(6):
        for j, ext in enumerate(("focal", "extensive")):
            sc = Scene(SceneConfig(width=4096, height=4096, seed=seed,
                                   classes=SlideClasses("adenocarcinoma_high_grade", ext)))
            les = np.flatnonzero(sc.region_lesion.ravel())
            r = les[0]
            per_region.append([sc.region_arch.ravel()[r], sc.region_atypia.ravel()[r],
                               np.mean(sc.per_region(sc.layout)[r] == GLAND)])
            counts.append([les.size / sc.n_tissue_regions])
            y.append(j)
    per_region_a, y_a = np.array(per_region, dtype=float), np.array(y)
    assert np.ptp(per_region_a, axis=0).max() == 0
    assert (np.array(counts)[y_a == 0].max()) < 0.5 <= np.array(counts)[y_a == 1].min()

"""Built-in nucleus segmentation: synthetic scenes with known answers, empty tiles, real annotated tiles."""

from __future__ import annotations

import time
from dataclasses import replace

import cv2
import numpy as np
import pytest

from hwsi.cells import FEATURE_DIM, FEATURE_NAMES, TABLE_COLUMNS, SegmentConfig, segment_nuclei
from hwsi.cells.segmentation_metrics import match_instances, score_segmentation
from hwsi.cells.segment import held_out_config, plain_watershed
from hwsi.cells.watershed import adjacent_label_pairs, merge_convex_pieces
from hwsi.errors import HwsiError

PINK = (235, 170, 205)  # eosin-stained background
PURPLE = (80, 45, 135)  # haematoxylin-stained nucleus


def scene(mpp: float, size_um: float = 128.0, shapes: list[tuple] | None = None) -> np.ndarray:
    """Pink field with purple ellipses; shapes are (cx_um, cy_um, a_um, b_um, angle_deg) so the same physical
    scene can be drawn at any µm/px."""
    n = int(round(size_um / mpp))
    img = np.empty((n, n, 3), dtype=np.uint8)
    img[:] = PINK
    for cx, cy, a, b, ang in shapes or []:
        cv2.ellipse(img, (int(round(cx / mpp)), int(round(cy / mpp))), (int(round(a / mpp)), int(round(b / mpp))),
                    ang, 0, 360, PURPLE, -1)
    rng = np.random.default_rng(1)
    noisy = img.astype(np.int16) + rng.integers(-6, 7, size=img.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


ROUND = [(20, 20, 3.0, 3.0, 0), (60, 25, 3.0, 3.0, 0), (100, 30, 3.0, 3.0, 0)]  # lymphocyte-like, 28 µm²
BIG = [(30, 90, 6.5, 5.5, 0)]  # large, 112 µm²
LONG = [(90, 95, 9.0, 2.0, 30)]  # elongated, aspect 4.5


@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_known_scene_counts_areas_and_types(mpp: float) -> None:
    nuc = segment_nuclei(scene(mpp, shapes=ROUND + BIG + LONG), mpp)
    assert len(nuc) == 5
    assert nuc.labels.dtype == np.int32 and nuc.labels.max() == 5
    assert set(nuc.table) == set(TABLE_COLUMNS)
    assert all(len(v) == 5 for v in nuc.table.values())
    assert nuc.features.shape == (5, FEATURE_DIM) == (5, len(FEATURE_NAMES))
    assert nuc.features.dtype == np.float32 and np.isfinite(nuc.features).all()
    # find each drawn shape by centroid (µm) and check its measured area and type
    xy_um = np.stack([nuc.table["x"], nuc.table["y"]], axis=1) * mpp
    expected = [(s, 1) for s in ROUND] + [(BIG[0], 2), (LONG[0], 3)]
    for (cx, cy, a, b, _), want_type in expected:
        i = int(np.argmin(np.hypot(*(xy_um - [cx, cy]).T)))
        assert np.hypot(xy_um[i, 0] - cx, xy_um[i, 1] - cy) < 1.0
        # razor-sharp drawn edges come out ~20% large (the threshold is tuned on real, blurred edges, where the
        # median matched area ratio is 0.94-0.96: see test_real_tiles_f1_and_aji)
        assert np.pi * a * b * 0.9 <= nuc.table["area_um2"][i] <= np.pi * a * b * 1.4
        assert nuc.table["type"][i] == want_type
        assert 0.5 <= nuc.table["type_prob"][i] <= 1.0
    i_round = int(np.argmin(np.hypot(*(xy_um - [20, 20]).T)))
    assert nuc.table["eccentricity"][i_round] < 0.4
    assert nuc.table["solidity"][i_round] > 0.9
    assert 2 * np.pi * 3.0 * 0.95 <= nuc.table["perimeter_um"][i_round] <= 2 * np.pi * 3.0 * 1.25
    assert nuc.table["mean_h"][i_round] > 0.3


def test_same_config_same_physical_answer_at_both_resolutions() -> None:
    a = segment_nuclei(scene(0.5, shapes=ROUND + BIG + LONG), 0.5)
    b = segment_nuclei(scene(0.25, shapes=ROUND + BIG + LONG), 0.25)
    order_a = np.lexsort((a.table["x"], a.table["y"]))
    order_b = np.lexsort((b.table["x"], b.table["y"]))
    np.testing.assert_allclose(a.table["area_um2"][order_a], b.table["area_um2"][order_b], rtol=0.15)
    np.testing.assert_array_equal(a.table["type"][order_a], b.table["type"][order_b])


def test_touching_nuclei_are_split() -> None:
    mpp = 0.5
    pair = [(40, 40, 4.0, 4.0, 0), (46.5, 40, 4.0, 4.0, 0)]  # centres 6.5 µm apart, overlapping discs
    nuc = segment_nuclei(scene(mpp, shapes=pair), mpp)
    assert len(nuc) == 2


def test_convex_merge_keeps_an_elongated_nucleus_whole_and_touching_ones_apart() -> None:
    mpp = 0.25  # at 40x the 9 x 2 µm ellipse has two distance-transform domes
    cfg = held_out_config()
    long_img = scene(mpp, shapes=LONG)
    assert len(segment_nuclei(long_img, mpp, replace(cfg, merge_solidity=1.0))) == 2  # the watershed alone cuts it
    assert len(segment_nuclei(long_img, mpp, cfg)) == 1
    assert plain_watershed(long_img, mpp).max() == 2  # so does the baseline
    pair = [(40, 40, 4.0, 4.0, 0), (46.5, 40, 4.0, 4.0, 0)]  # union solidity ~0.93: a waist, not one nucleus
    assert len(segment_nuclei(scene(mpp, shapes=pair), mpp, cfg)) == 2


def test_merge_convex_pieces_by_hand() -> None:
    labels = np.zeros((12, 20), np.int32)
    labels[2:10, 2:6] = 1  # a 8 x 8 square cut in two halves: union solid, merged
    labels[2:10, 6:10] = 2
    labels[2:4, 10:18] = 3  # an L: the bar touches 2 only along 2 px, union far from convex, kept apart
    assert adjacent_label_pairs(labels).tolist() == [[1, 2], [2, 3]]
    merged = merge_convex_pieces(labels, 0.95)
    assert set(np.unique(merged).tolist()) == {0, 1, 3}
    assert (merged[labels == 2] == 1).all()
    np.testing.assert_array_equal(merge_convex_pieces(labels, 1.0), labels)


def test_held_out_config_and_baseline_on_scenes() -> None:
    for mpp in (0.5, 0.25):
        img = scene(mpp, shapes=ROUND + BIG + LONG)
        assert len(segment_nuclei(img, mpp, held_out_config())) == 5
        assert plain_watershed(img, mpp).max() >= 5
    assert plain_watershed(np.full((64, 64, 3), 255, np.uint8), 0.5).max() == 0
    assert len(segment_nuclei(scene(0.5), 0.5, held_out_config())) == 0


@pytest.mark.parametrize(
    "name,img",
    [
        ("white", np.full((256, 256, 3), 255, np.uint8)),
        ("eosin only", scene(0.5)),
        ("grey ink", cv2.line(np.full((256, 256, 3), 240, np.uint8), (0, 128), (255, 140), (60, 60, 60), 6)),
        ("black", np.zeros((64, 64, 3), np.uint8)),
        ("empty", np.zeros((0, 0, 3), np.uint8)),
    ],
)
def test_tiles_without_nuclei_give_none(name: str, img: np.ndarray) -> None:
    for cfg in (SegmentConfig(), held_out_config()):
        nuc = segment_nuclei(img, 0.5, cfg)
        assert len(nuc) == 0, name
        assert nuc.features.shape == (0, FEATURE_DIM)
        assert all(len(v) == 0 for v in nuc.table.values())


def test_bad_input_raises_hwsi_error() -> None:
    with pytest.raises(HwsiError, match="uint8"):
        segment_nuclei(np.zeros((8, 8, 3), np.float32), 0.5)
    with pytest.raises(HwsiError, match="RGB"):
        segment_nuclei(np.zeros((8, 8), np.uint8), 0.5)
    with pytest.raises(HwsiError, match="mpp"):
        segment_nuclei(np.zeros((8, 8, 3), np.uint8), 0.0)
    with pytest.raises(HwsiError, match="min_area"):
        segment_nuclei(np.zeros((8, 8, 3), np.uint8), 0.5, SegmentConfig(min_area_um2=10, max_area_um2=5))
    with pytest.raises(HwsiError, match="merge_solidity"):
        segment_nuclei(np.zeros((8, 8, 3), np.uint8), 0.5, SegmentConfig(merge_solidity=1.5))


def test_rgba_input_is_accepted() -> None:
    rgb = scene(0.5, shapes=ROUND)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    assert len(segment_nuclei(rgba, 0.5)) == len(segment_nuclei(rgb, 0.5)) == 3


# --- real annotated tiles (MICCAI CPM); same config for both, only mpp differs --------------------------------
REAL_TILES = [("image01", 0.5), ("image08", 0.25)]


@pytest.mark.parametrize("name,mpp", REAL_TILES)
def test_real_tiles_f1_and_aji(shared_data, name: str, mpp: float) -> None:
    from PIL import Image

    img = np.asarray(Image.open(shared_data / "nuclei" / f"{name}.png").convert("RGB"))
    true = np.asarray(Image.open(shared_data / "nuclei" / f"{name}_instance_mask.png")).astype(np.int32)
    nuc = segment_nuclei(img, mpp)
    s = score_segmentation(true, nuc.labels)
    print(f"{name} mpp={mpp}: n_true={s.n_true} n_pred={s.n_pred} P={s.precision:.3f} R={s.recall:.3f} "
          f"F1={s.f1:.3f} AJI={s.aji:.3f}")
    assert s.f1 >= 0.6
    assert s.aji >= 0.4
    assert 0.7 <= s.n_pred / s.n_true <= 1.3
    m = match_instances(true, nuc.labels)
    area_ratio = np.bincount(nuc.labels.ravel())[m.pairs[:, 1]] / np.bincount(true.ravel())[m.pairs[:, 0]]
    assert 0.8 <= float(np.median(area_ratio)) <= 1.2


# held_out_config() on the same tiles. Its parameters were chosen on 20 annotated tiles (these two among them) and
# its leave-one-tile-out figures are the bars (docs/cells.md; `benchmarks/cells.py --extra DIR --per-tile --select`):
# with image01 held out the other 19 tiles chose (0.5, 0.9, 0.2) and image01 scored cF1 0.726 / IoU-F1 0.561 /
# ratio 0.73, image08 the same way 0.879 / 0.793 / 0.85. Bars (min cF1, min IoU-F1, ratio range) are those figures
# rounded down, never above them; held_out_config() itself scores 0.760 / 0.623 / 0.75 and 0.887 / 0.835 / 0.86.
HELD_OUT_BARS = {"image01": (0.72, 0.55, 0.70, 0.80), "image08": (0.87, 0.79, 0.82, 0.90)}


@pytest.mark.parametrize("name,mpp", REAL_TILES)
def test_held_out_config_on_real_tiles_beats_the_plain_watershed(shared_data, name: str, mpp: float) -> None:
    from PIL import Image

    img = np.asarray(Image.open(shared_data / "nuclei" / f"{name}.png").convert("RGB"))
    true = np.asarray(Image.open(shared_data / "nuclei" / f"{name}_instance_mask.png")).astype(np.int32)
    s = score_segmentation(true, segment_nuclei(img, mpp, held_out_config()).labels)
    base = score_segmentation(true, plain_watershed(img, mpp))
    print(f"{name}: held-out config cF1={s.centroid_f1:.3f} IoU-F1={s.f1:.3f} ratio={s.count_ratio:.2f}; "
          f"plain watershed cF1={base.centroid_f1:.3f} IoU-F1={base.f1:.3f} ratio={base.count_ratio:.2f}")
    min_cf1, min_f1, lo, hi = HELD_OUT_BARS[name]
    assert s.centroid_f1 >= min_cf1
    assert s.f1 >= min_f1
    assert lo <= s.count_ratio <= hi
    assert s.centroid_f1 > base.centroid_f1 and s.f1 > base.f1 and s.aji > base.aji


def test_speed_of_a_256_patch(shared_data) -> None:
    from PIL import Image

    img = np.asarray(Image.open(shared_data / "nuclei" / "image08.png").convert("RGB"))[:256, :256]
    segment_nuclei(img, 0.25)
    times = []
    for _ in range(5):
        t = time.process_time()  # CPU time: robust to other jobs sharing the machine
        nuc = segment_nuclei(img, 0.25)
        times.append(time.process_time() - t)
    assert len(nuc) > 10
    # ~20 ms CPU measured on the 2-core dev machine; generous bound for noisy CI
    assert min(times) < 0.1, times


def test_features_are_standardised_on_real_tiles(shared_data) -> None:
    """FEATURE_CENTER/FEATURE_SCALE keep the continuous features near zero mean, unit spread on real H&E."""
    from PIL import Image

    feats = []
    for name, mpp in REAL_TILES:
        img = np.asarray(Image.open(shared_data / "nuclei" / f"{name}.png").convert("RGB"))
        feats.append(segment_nuclei(img, mpp).features)
    z = np.concatenate(feats)[:, : FEATURE_DIM - 4]
    assert np.all(np.abs(z.mean(axis=0)) < 0.25), z.mean(axis=0)
    assert np.all((z.std(axis=0) > 0.6) & (z.std(axis=0) < 1.5)), z.std(axis=0)

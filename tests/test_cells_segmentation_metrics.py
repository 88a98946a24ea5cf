"""Hand-computed checks of detection F1 (IoU ≥ 0.5, one-to-one) and AJI (Kumar et al. 2017)."""

from __future__ import annotations

import numpy as np
import pytest

from hwsi.cells.segmentation_metrics import (
    aggregated_jaccard_index,
    centroid_hits,
    match_instances,
    overlaps,
    score_segmentation,
)


def _two_object_case() -> tuple[np.ndarray, np.ndarray]:
    true = np.zeros((4, 6), dtype=np.int32)
    true[0:2, 0:2] = 1  # G1: 4 px
    true[2:4, 4:6] = 2  # G2: 4 px
    pred = np.zeros((4, 6), dtype=np.int32)
    pred[0:3, 0:2] = 5  # S5: 6 px, 4 inside G1 -> IoU 4/6
    pred[3, 5] = 7  # S7: 1 px inside G2 -> IoU 1/4
    pred[0, 4:6] = 9  # S9: 2 px on background
    return true, pred


def test_overlaps_table() -> None:
    true, pred = _two_object_case()
    ov = overlaps(true, pred)
    assert ov.true_ids.tolist() == [1, 2]
    assert ov.pred_ids.tolist() == [5, 7, 9]
    assert ov.inter.tolist() == [[4, 0, 0], [0, 1, 0]]
    assert ov.true_area.tolist() == [4, 4]
    assert ov.pred_area.tolist() == [6, 1, 2]
    np.testing.assert_allclose(ov.iou[0, 0], 4 / 6)
    np.testing.assert_allclose(ov.iou[1, 1], 1 / 4)


def test_f1_and_aji_hand_computed() -> None:
    true, pred = _two_object_case()
    m = match_instances(true, pred)
    assert (m.tp, m.fp, m.fn) == (1, 2, 1)
    assert m.pairs.tolist() == [[1, 5]]
    assert m.f1 == pytest.approx(2 * 1 / (2 * 1 + 2 + 1))
    assert m.precision == pytest.approx(1 / 3)
    assert m.recall == pytest.approx(1 / 2)
    assert m.mean_iou == pytest.approx(4 / 6)
    # AJI: G1->S5: C 4, U 6; G2->S7: C 1, U 4; unused S9 adds 2 -> 5 / 12
    assert aggregated_jaccard_index(true, pred) == pytest.approx(5 / 12)


def test_matching_is_one_to_one() -> None:
    true = np.zeros((1, 4), dtype=np.int32)
    true[0, :] = 1
    pred = np.array([[3, 3, 4, 4]], dtype=np.int32)  # both halves have IoU exactly 0.5 with G1
    m = match_instances(true, pred, 0.5)
    assert (m.tp, m.fp, m.fn) == (1, 1, 0)
    assert m.f1 == pytest.approx(2 / 3)
    # AJI: G1's best is S3 (first of the tie): C 2, U 4; S4 unused adds 2 -> 2 / 6
    assert aggregated_jaccard_index(true, pred) == pytest.approx(1 / 3)


def test_aji_reuses_a_prediction_like_kumar() -> None:
    # one prediction covering two true nuclei: chosen by both, counted in U once per choice (original AJI)
    true = np.array([[1, 1, 0, 2, 2]], dtype=np.int32)
    pred = np.array([[8, 8, 8, 8, 8]], dtype=np.int32)
    # G1: C 2, U 5; G2: C 2, U 5 -> 4 / 10
    assert aggregated_jaccard_index(true, pred) == pytest.approx(0.4)
    assert match_instances(true, pred).tp == 0


def test_perfect_permuted_and_empty() -> None:
    rng = np.random.default_rng(0)
    true = np.zeros((20, 20), dtype=np.int32)
    true[2:6, 2:6] = 1
    true[10:15, 3:9] = 2
    true[12:19, 12:18] = 3
    perm = np.array([0, 30, 10, 20], dtype=np.int32)
    pred = perm[true]
    s = score_segmentation(true, pred)
    assert (s.f1, s.aji, s.tp, s.n_true, s.n_pred) == (1.0, 1.0, 3, 3, 3)
    empty = np.zeros_like(true)
    assert score_segmentation(empty, empty).f1 == 1.0
    assert aggregated_jaccard_index(empty, empty) == 1.0
    assert aggregated_jaccard_index(true, empty) == 0.0
    assert match_instances(true, empty).f1 == 0.0
    noise = rng.integers(0, 2, size=true.shape).astype(np.int32) * 99
    assert score_segmentation(true, noise).f1 == 0.0


def test_centroid_hits_hand_computed() -> None:
    true, pred = _two_object_case()
    # S5 centroid (row 1, col 0.5 -> 0) lies in G1, S7 (3, 5) in G2, S9 (0, 4.5 -> 4) on background
    m = centroid_hits(true, pred)
    assert (m.tp, m.fp, m.fn) == (2, 1, 0)
    assert m.pairs.tolist() == [[1, 5], [2, 7]]
    assert score_segmentation(true, pred).centroid_f1 == pytest.approx(2 * 2 / (2 * 2 + 1))
    # one nucleus cut in two: both halves hit it, only one counts; the other nucleus is missed
    split = np.zeros_like(true)
    split[0, 0:2] = 3
    split[1, 0:2] = 4
    m = centroid_hits(true, split)
    assert (m.tp, m.fp, m.fn) == (1, 1, 1)
    assert score_segmentation(true, split).count_ratio == 1.0
    empty = np.zeros_like(true)
    assert centroid_hits(empty, empty).f1 == 1.0
    assert centroid_hits(true, empty).f1 == 0.0


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="shape"):
        overlaps(np.zeros((2, 2), np.int32), np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="integer"):
        overlaps(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="iou_threshold"):
        match_instances(np.zeros((2, 2), np.int32), np.zeros((2, 2), np.int32), 0.0)

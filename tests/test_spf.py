"""SPF (paper Eq. 1–2 + the diversity step of docs/design.md §5) against hand-computed values, and its degenerate cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hwsi.features.spf import (
    SPFConfig,
    SPFError,
    eq1_redundancy,
    farthest_point_sampling,
    l2_normalize,
    spf_select,
    spf_select_regions,
)


def feats_from_gram(s: np.ndarray) -> np.ndarray:
    """Unit vectors whose cosine matrix is exactly ``s`` (s must be PSD with unit diagonal)."""
    w, v = np.linalg.eigh(s)
    assert w.min() > -1e-12
    return v * np.sqrt(np.clip(w, 0, None))


def test_eq1_three_patches_hand_values() -> None:
    # f0 = f1 = (1, 0), f2 = (0, 1): S = [[1,1,0],[1,1,0],[0,0,1]] -> five 1s, four 0s.
    f = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])  # norms differ: Eq. 1 normalises first
    keep, row_mean, mu, tau = eq1_redundancy(l2_normalize(f))
    assert mu == pytest.approx(5 / 9)
    sigma = math.sqrt(5 / 9 * (4 / 9) ** 2 + 4 / 9 * (5 / 9) ** 2)  # population std over all 9 entries
    assert tau == pytest.approx(5 / 9 + sigma)
    np.testing.assert_allclose(row_mean, [2 / 3, 2 / 3, 1 / 3])
    assert keep.all()  # no row mean exceeds tau = 1.0525


def test_eq1_drops_the_hub_patch() -> None:
    # 10 patches: patch 0 has cosine 0.9 with all others, the others 0.8 among themselves.
    # mu = (10*1 + 18*0.9 + 72*0.8)/100 = 0.838; E[s^2] = (10 + 18*0.81 + 72*0.64)/100 = 0.7066
    # sigma = sqrt(0.7066 - 0.838^2) = 0.066 -> tau = 0.904; row means: hub 0.91 > tau, others 0.83 <= tau.
    s = np.full((10, 10), 0.8)
    s[0, :] = s[:, 0] = 0.9
    np.fill_diagonal(s, 1.0)
    f = feats_from_gram(s)
    keep, row_mean, mu, tau = eq1_redundancy(l2_normalize(f))
    assert mu == pytest.approx(0.838)
    assert tau == pytest.approx(0.904)
    assert row_mean[0] == pytest.approx(0.91)
    np.testing.assert_allclose(row_mean[1:], 0.83)
    assert keep.tolist() == [False] + [True] * 9
    text = np.eye(10)[:1]  # any text; relevance only ranks
    res = spf_select(f, text, k=16, n_div=32)
    assert res.kept_eq1.tolist() == [False] + [True] * 9
    assert 0 not in res.selected.tolist() and sorted(res.selected.tolist()) == list(range(1, 10))
    assert res.tau == pytest.approx(0.904) and res.mu == pytest.approx(0.838)


def test_eq2_relevance_hand_values_and_ranking() -> None:
    # patches (1,0), (0,1), (0.6,0.8); texts (1,0) and (0,2) -> unit (1,0), (0,1)
    f = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    t = np.array([[3.0, 0.0], [0.6, 0.8]])
    res = spf_select(f, t, k=2, n_div=0)
    # r_j = mean_m cos(f_j, t_m): [(1+0.6)/2, (0+0.8)/2, (0.6+1.0)/2]
    np.testing.assert_allclose(res.relevance, [0.8, 0.4, 0.8], rtol=1e-6)
    assert res.selected.tolist() == [0, 2]  # tie broken by lowest index, then decreasing relevance
    res1 = spf_select(f, t, k=1, n_div=0)
    assert res1.selected.tolist() == [0]


def test_non_tissue_patches_never_take_part() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(8, 4))
    cand = np.array([1, 0, 1, 1, 0, 1, 0, 1], dtype=bool)
    t = rng.normal(size=(3, 4))
    res = spf_select(f, t, k=16, n_div=32, candidates=cand)
    assert set(res.selected.tolist()) <= set(np.flatnonzero(cand).tolist())
    assert np.isnan(res.relevance[~cand]).all() and np.isfinite(res.relevance[cand]).all()
    assert not res.kept_eq1[~cand].any()
    # NaN in a NON-tissue patch is fine (its features are never read), in a tissue patch it is an error
    f2 = f.copy()
    f2[1] = np.nan
    spf_select(f2, t, candidates=cand)
    with pytest.raises(SPFError, match="NaN"):
        spf_select(f2, t)


def test_farthest_point_sampling_order() -> None:
    # points on a circle at angles 0, 10, 90, 180, 185 degrees; start at 0 -> farthest is 180 (distance 2),
    # then the point maximising its min distance to {0, 180}: 90 (distance 1 to both)
    ang = np.deg2rad([0, 10, 90, 180, 185])
    f = np.stack([np.cos(ang), np.sin(ang)], 1)
    assert farthest_point_sampling(f, 3, start=0).tolist() == [0, 3, 2]
    assert farthest_point_sampling(f, 10, start=1).tolist()[:2] == [1, 4]
    assert len(farthest_point_sampling(f, 10, start=0)) == 5


def _two_patterns(n_a: int, n_b: int, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a, b = np.zeros(d), np.zeros(d)
    a[0], b[1] = 1.0, 1.0
    fa = a + 0.05 * rng.normal(size=(n_a, d))
    fb = b + 0.05 * rng.normal(size=(n_b, d))
    f = np.concatenate([fa, fb])
    perm = rng.permutation(len(f))
    labels = np.array([0] * n_a + [1] * n_b)[perm]
    return f[perm], labels


def test_region_with_two_patterns_keeps_both() -> None:
    f, labels = _two_patterns(52, 12)
    neutral = np.zeros((1, 16))
    neutral[0, 5] = 1.0  # a text direction unrelated to either pattern
    res = spf_select(f, neutral, k=16, n_div=32)
    assert set(labels[res.diverse].tolist()) == {0, 1}
    assert set(labels[res.selected].tolist()) == {0, 1}
    assert res.diverse.sum() == 32 and res.selected.size == 16
    # the first diverse pick is the most atypical patch: one of the minority pattern
    fh = l2_normalize(f)
    assert labels[int(np.argmin((fh @ fh.T).mean(1)))] == 1
    # text pointing at pattern B ranks B first even though A is the majority
    tb = np.zeros((1, 16))
    tb[0, 1] = 1.0
    res_b = spf_select(f, tb, k=4, n_div=32)
    assert (labels[res_b.selected] == 1).all()


def test_diversity_avoids_near_duplicates() -> None:
    # without the diversity step, text favouring A picks only near-duplicate A patches
    f, labels = _two_patterns(52, 12)
    ta = np.zeros((1, 16))
    ta[0, 0] = 1.0
    plain = spf_select(f, ta, k=16, n_div=0)
    assert (labels[plain.selected] == 0).all()
    assert plain.diverse.sum() == 64
    div = spf_select(f, ta, k=16, n_div=32)
    assert div.diverse.sum() == 32
    assert (labels[div.diverse] == 1).any()


def test_single_patch_region() -> None:
    f = np.zeros((4, 3))
    f[2] = [0.0, 2.0, 0.0]
    cand = np.array([False, False, True, False])
    res = spf_select(f, np.ones((2, 3)), candidates=cand)
    assert res.selected.tolist() == [2]
    assert res.tau == pytest.approx(1.0) and res.mu == pytest.approx(1.0)
    assert res.kept_eq1.tolist() == [False, False, True, False]


def test_identical_patches_keep_all_and_pick_lowest_indices() -> None:
    f = np.tile(np.array([[0.3, -1.2, 0.7, 2.0]]), (40, 1))
    res = spf_select(f, np.array([[1.0, 0.0, 0.0, 0.0]]), k=16, n_div=32)
    assert res.kept_eq1.all()  # sigma = 0: rounding must not drop a random subset
    assert res.diverse.sum() == 32
    assert res.selected.tolist() == sorted(res.selected.tolist())
    assert res.selected.tolist() == list(range(16))
    assert not res.eq1_fallback


def test_everything_dropped_falls_back_to_all_candidates() -> None:
    rng = np.random.default_rng(1)
    f = rng.normal(size=(6, 5))
    res = spf_select(f, rng.normal(size=(2, 5)), k=3, n_div=0, eq1_atol=-10.0)  # force Eq. 1 to drop all
    assert res.eq1_fallback and res.kept_eq1.all() and res.selected.size == 3


def test_no_tissue_and_fewer_than_k() -> None:
    rng = np.random.default_rng(2)
    f = rng.normal(size=(2, 4, 8))
    tissue = np.array([[False] * 4, [True, True, False, True]])
    out = spf_select_regions(f, rng.normal(size=(3, 8)), tissue, SPFConfig(k=16, n_div=32))
    assert out.selected.shape == (2, 16) and out.selected.dtype == np.int32
    assert (out.selected[0] == -1).all() and np.isnan(out.relevance[0]).all()
    row = out.selected[1]
    assert sorted(row[row >= 0].tolist()) == [0, 1, 3] and (row[3:] == -1).all()
    assert np.isnan(out.tau[0]) and np.isfinite(out.tau[1])


def test_input_errors() -> None:
    with pytest.raises(SPFError, match="shares the text encoder"):
        spf_select(np.ones((3, 4)), np.ones((2, 5)))
    with pytest.raises(SPFError, match="M >= 1"):
        spf_select(np.ones((3, 4)), np.ones((0, 4)))
    with pytest.raises(SPFError, match="candidates mask"):
        spf_select(np.ones((3, 4)), np.ones((1, 4)), candidates=np.ones(2, bool))
    with pytest.raises(SPFError, match="n_div"):
        SPFConfig(k=16, n_div=8)
    with pytest.raises(SPFError, match="k must"):
        SPFConfig(k=0)


def test_zero_feature_vector_does_not_crash() -> None:
    f = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    res = spf_select(f, np.array([[1.0, 1.0]]), k=3, n_div=0)
    assert np.isfinite(res.relevance).all() and res.relevance[0] == 0.0

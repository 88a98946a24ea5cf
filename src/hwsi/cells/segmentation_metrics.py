"""Instance-segmentation metrics for nuclei: detection F1 at an IoU threshold and the aggregated Jaccard index.

Conventions (stated so numbers can be compared):

* Label images are integer arrays of the same shape; 0 is background, every other value one instance
  (values need not be consecutive).
* **Detection F1** (:func:`match_instances`): a predicted instance matches a true one when their IoU is at least
  ``iou_threshold`` (default 0.5); matching is one-to-one and maximises the number of matches, ties broken by the
  larger total IoU (Hungarian assignment over the eligible pairs). For ``iou_threshold > 0.5`` the matching is
  unique anyway. TP = matches, FP = unmatched predictions, FN = unmatched truths;
  F1 = 2TP / (2TP + FP + FN) (1.0 when both images are empty).
* **AJI** (:func:`aggregated_jaccard_index`), Kumar et al. 2017 (IEEE TMI 36(7)): for every true nucleus G_i
  take the predicted S_j with the largest IoU with it (an S_j may be chosen by several G_i — the original
  definition, not AJI+); C += |G_i ∩ S_j|, U += |G_i ∪ S_j| (with no overlapping prediction: C += 0, U += |G_i|);
  finally U += the area of every prediction never chosen. AJI = C / U (1.0 when both are empty, 0.0 when only
  one is).
* **Centroid-hit F1** (:func:`centroid_hits`): a predicted instance hits the true instance under its centroid
  (the mean of its pixel coordinates, rounded to the nearest pixel); each true instance counts once however many
  centroids land in it. TP = true instances hit, FP = predictions - TP (extra hits on one nucleus and
  centroids on background), FN = true instances not hit. It scores detection alone (a nucleus found with a poor
  outline still counts), which is what the cell-scale tokens (Eq. 3) mostly need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True)
class Overlaps:
    """Pairwise overlap of two label images, restricted to pairs that intersect.

    ``true_ids``/``pred_ids`` are the instance ids present; ``inter`` is a dense (n_true, n_pred) matrix of
    intersection areas, ``true_area``/``pred_area`` the instance areas (pixels).
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    inter: np.ndarray
    true_area: np.ndarray
    pred_area: np.ndarray

    @property
    def union(self) -> np.ndarray:
        return self.true_area[:, None] + self.pred_area[None, :] - self.inter

    @property
    def iou(self) -> np.ndarray:
        u = self.union
        return np.divide(self.inter, u, out=np.zeros(self.inter.shape, dtype=np.float64), where=u > 0)


def _check_pair(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    true = np.asarray(true)
    pred = np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"label images differ in shape: true {true.shape}, pred {pred.shape}")
    if true.ndim != 2:
        raise ValueError(f"label images must be 2-D, got {true.ndim}-D")
    for name, a in (("true", true), ("pred", pred)):
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} label image must be integer, got {a.dtype}")
        if a.size and a.min() < 0:
            raise ValueError(f"{name} label image has negative labels")
    return true, pred


def overlaps(true: np.ndarray, pred: np.ndarray) -> Overlaps:
    """Intersection areas of every (true, pred) instance pair, via one contingency table."""
    true, pred = _check_pair(true, pred)
    t_ids, t_inv = np.unique(true.ravel(), return_inverse=True)
    p_ids, p_inv = np.unique(pred.ravel(), return_inverse=True)
    nt, npred = len(t_ids), len(p_ids)
    table = np.bincount(t_inv.astype(np.int64) * npred + p_inv, minlength=nt * npred).reshape(nt, npred)
    t_keep = t_ids != 0
    p_keep = p_ids != 0
    true_area = table.sum(axis=1)[t_keep]
    pred_area = table.sum(axis=0)[p_keep]
    inter = table[np.ix_(t_keep, p_keep)]
    return Overlaps(t_ids[t_keep], p_ids[p_keep], inter.astype(np.int64), true_area.astype(np.int64),
                    pred_area.astype(np.int64))


@dataclass(frozen=True)
class MatchResult:
    """One-to-one matching of predicted to true instances at an IoU threshold."""

    tp: int
    fp: int
    fn: int
    pairs: np.ndarray  # (tp, 2) matched (true_id, pred_id)
    mean_iou: float  # mean IoU of the matched pairs (NaN when none)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else (1.0 if self.fn == 0 else 0.0)

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else (1.0 if self.fp == 0 else 0.0)

    @property
    def f1(self) -> float:
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else 1.0


def match_instances(true: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> MatchResult:
    """Match instances one-to-one where IoU ≥ ``iou_threshold`` (see the module docstring)."""
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    ov = overlaps(true, pred)
    iou = ov.iou
    eligible = iou >= iou_threshold
    nt, npred = iou.shape
    if not eligible.any():
        return MatchResult(0, npred, nt, np.zeros((0, 2), dtype=np.int64), float("nan"))
    # maximise the number of matches first (weight 1 per eligible pair), then the total IoU (< 1 in sum)
    rows = np.flatnonzero(eligible.any(axis=1))
    cols = np.flatnonzero(eligible.any(axis=0))
    sub_e = eligible[np.ix_(rows, cols)]
    sub_iou = iou[np.ix_(rows, cols)]
    weight = np.where(sub_e, 1.0 + sub_iou / (min(sub_e.shape) + 1.0), 0.0)
    r, c = linear_sum_assignment(weight, maximize=True)
    ok = sub_e[r, c]
    r, c = rows[r[ok]], cols[c[ok]]
    tp = int(len(r))
    pairs = np.stack([ov.true_ids[r], ov.pred_ids[c]], axis=1).astype(np.int64)
    return MatchResult(tp, npred - tp, nt - tp, pairs, float(iou[r, c].mean()))


def aggregated_jaccard_index(true: np.ndarray, pred: np.ndarray) -> float:
    """AJI of Kumar et al. 2017 (see the module docstring)."""
    ov = overlaps(true, pred)
    nt, npred = ov.inter.shape
    if nt == 0 and npred == 0:
        return 1.0
    if nt == 0 or npred == 0:
        return 0.0
    iou = ov.iou
    best = iou.argmax(axis=1)
    has = ov.inter[np.arange(nt), best] > 0
    c_sum = int(ov.inter[np.arange(nt), best][has].sum())
    u_sum = int(ov.union[np.arange(nt), best][has].sum()) + int(ov.true_area[~has].sum())
    used = np.zeros(npred, dtype=bool)
    used[best[has]] = True
    u_sum += int(ov.pred_area[~used].sum())
    return c_sum / u_sum if u_sum else 1.0


def centroid_hits(true: np.ndarray, pred: np.ndarray) -> MatchResult:
    """Centroid-hit detection of ``pred`` against ``true`` (see the module docstring); ``pairs`` are the
    (true_id, pred_id) hits, the first prediction (lowest id) kept where several hit one nucleus, ``mean_iou`` NaN."""
    true, pred = _check_pair(true, pred)
    n_true = int(np.count_nonzero(np.bincount(true.ravel())[1:]))
    flat = pred.ravel()
    count = np.bincount(flat)
    ids = np.flatnonzero(count[1:]) + 1
    if len(ids) == 0:
        return MatchResult(0, 0, n_true, np.zeros((0, 2), dtype=np.int64), float("nan"))
    ys, xs = np.indices(pred.shape)
    cy = np.bincount(flat, weights=ys.ravel(), minlength=len(count))[ids] / count[ids]
    cx = np.bincount(flat, weights=xs.ravel(), minlength=len(count))[ids] / count[ids]
    hit = true[np.rint(cy).astype(np.int64), np.rint(cx).astype(np.int64)]
    on = hit > 0
    hit_ids, first = np.unique(hit[on], return_index=True)
    pairs = np.stack([hit_ids, ids[on][first]], axis=1).astype(np.int64)
    tp = int(len(hit_ids))
    return MatchResult(tp, len(ids) - tp, n_true - tp, pairs, float("nan"))


@dataclass(frozen=True)
class SegmentationScores:
    """Per-tile scores of a predicted label image against the truth."""

    n_true: int
    n_pred: int
    tp: int
    precision: float
    recall: float
    f1: float
    aji: float
    mean_matched_iou: float
    centroid_f1: float  # centroid-hit F1 (see :func:`centroid_hits`)

    @property
    def count_ratio(self) -> float:
        """Predicted / true nucleus count (NaN on a tile with no true nucleus)."""
        return self.n_pred / self.n_true if self.n_true else float("nan")


def score_segmentation(true: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> SegmentationScores:
    """Detection precision/recall/F1 at ``iou_threshold``, AJI and centroid-hit F1 of one tile."""
    m = match_instances(true, pred, iou_threshold)
    return SegmentationScores(
        n_true=m.tp + m.fn,
        n_pred=m.tp + m.fp,
        tp=m.tp,
        precision=m.precision,
        recall=m.recall,
        f1=m.f1,
        aji=aggregated_jaccard_index(true, pred),
        mean_matched_iou=m.mean_iou,
        centroid_f1=centroid_hits(true, pred).f1,
    )

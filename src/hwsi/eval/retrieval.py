"""Retrieval scores: cross-modal Recall@K (image<->text pairs) and slide->slide Acc@K / top-1% majority vote.

Conventions (named in every output):

* similarity: cosine (embeddings are L2-normalised first);
* cross-modal: pair ``i <-> i`` is the only positive; the rank of the positive counts every other candidate whose
  similarity is ``>=`` the positive's (ties resolved *against* the query, so constant embeddings score chance,
  not 100%);
* slide->slide: the query slide is excluded from its own database; candidates ordered by decreasing similarity
  (stable: ties keep index order); ``Acc@K`` = at least one of the top K shares the query's label;
  ``MV@top1%`` = a strict majority of the top ``max(1, floor(1% of the database))`` share the query's label.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hwsi.errors import HwsiError


class RetrievalError(HwsiError):
    """Bad retrieval input (shape mismatch, too few items)."""


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _recall_from_sim(sim: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    pos = np.diag(sim)[:, None]
    others = sim >= pos
    np.fill_diagonal(others, False)
    rank = others.sum(axis=1)  # 0 = the positive is first
    return {f"R@{k}": float(np.mean(rank < k)) for k in ks}


def cross_modal_recall(
    img_emb: np.ndarray, txt_emb: np.ndarray, ks: Sequence[int] = (1, 3, 5, 10)
) -> dict[str, Any]:
    """Recall@K image->text and text->image where row i of each is a positive pair; also their mean."""
    a = np.asarray(img_emb, dtype=np.float64)
    b = np.asarray(txt_emb, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape != b.shape:
        raise RetrievalError(f"image {a.shape} and text {b.shape} embeddings must both be (N, D), same shape")
    if a.shape[0] < 2:
        raise RetrievalError("need at least two pairs")
    if any(k < 1 for k in ks):
        raise RetrievalError(f"K must be >= 1, got {list(ks)}")
    sim = _l2n(a) @ _l2n(b).T
    i2t = _recall_from_sim(sim, ks)
    t2i = _recall_from_sim(sim.T, ks)
    return {
        "convention": "cosine; pair i<->i positive; ties counted against the positive",
        "image_to_text": i2t,
        "text_to_image": t2i,
        "mean": {k: (i2t[k] + t2i[k]) / 2 for k in i2t},
        "n": int(a.shape[0]),
    }


def slide_retrieval(
    emb: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    ks: Sequence[int] = (1, 3, 5),
    top_fraction: float = 0.01,
) -> dict[str, Any]:
    """Slide->slide retrieval: ``Acc@K`` for each K and ``MV@top1%`` (majority vote of the top fraction)."""
    x = np.asarray(emb, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y):
        raise RetrievalError(f"embeddings {x.shape} must be (N, D) with N == len(labels) == {len(y)}")
    n = len(x)
    if n < 2:
        raise RetrievalError("need at least two slides")
    if not 0 < top_fraction <= 1:
        raise RetrievalError(f"top_fraction must be in (0, 1], got {top_fraction}")
    if any(k < 1 for k in ks):
        raise RetrievalError(f"K must be >= 1, got {list(ks)}")
    sim = _l2n(x) @ _l2n(x).T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, : n - 1]  # self (−inf) is last
    same = y[order] == y[:, None]
    m = max(1, int(np.floor(top_fraction * (n - 1))))
    out: dict[str, Any] = {f"Acc@{k}": float(np.mean(same[:, : min(k, n - 1)].any(axis=1))) for k in ks}
    pct = f"{top_fraction * 100:g}%"
    out[f"MV@top{pct}"] = float(np.mean(same[:, :m].sum(axis=1) * 2 > m))
    out.update(
        {
            "convention": "cosine; query excluded; Acc@K any of top-K same label; "
            f"MV@top{pct} strict majority of top max(1, floor({top_fraction:g}*(N-1))) = {m}",
            "top_m": m,
            "n": n,
        }
    )
    return out


__all__ = ["RetrievalError", "cross_modal_recall", "slide_retrieval"]

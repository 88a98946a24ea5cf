"""Cross-modal Recall@K and slide->slide retrieval against hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest

from hwsi.eval.retrieval import RetrievalError, cross_modal_recall, slide_retrieval


def test_cross_modal_recall_hand_example() -> None:
    txt = np.eye(3)
    img = np.array([[1.0, 0, 0], [0, 0.5, 1.0], [0.9, 0.1, 0.3]])
    # image->text ranks of the positive: 0, 1 (txt2 closer), 1 (txt0 closer)
    # text->image: txt0 -> img0 first; txt1 -> img1 (0.447) first; txt2 -> img1 (0.894) before img2 (0.314)
    r = cross_modal_recall(img, txt, ks=(1, 2, 3))
    assert r["image_to_text"] == pytest.approx({"R@1": 1 / 3, "R@2": 1.0, "R@3": 1.0})
    assert r["text_to_image"] == pytest.approx({"R@1": 2 / 3, "R@2": 1.0, "R@3": 1.0})
    assert r["mean"]["R@1"] == pytest.approx(0.5) and r["n"] == 3
    assert "ties counted against" in r["convention"]


def test_cross_modal_recall_default_ks_and_ties() -> None:
    rng = np.random.default_rng(1)
    e = rng.normal(size=(20, 16))
    perfect = cross_modal_recall(e, e * 3.0)  # scale does not matter (cosine)
    assert perfect["image_to_text"] == {"R@1": 1.0, "R@3": 1.0, "R@5": 1.0, "R@10": 1.0}
    const = cross_modal_recall(np.ones((4, 2)), np.ones((4, 2)), ks=(1, 3, 5))
    # all similarities tie: the positive is ranked behind the 3 others
    assert const["image_to_text"] == {"R@1": 0.0, "R@3": 0.0, "R@5": 1.0}
    with pytest.raises(RetrievalError):
        cross_modal_recall(np.ones((3, 2)), np.ones((4, 2)))


def _circle(deg: list[float]) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def test_slide_retrieval_hand_example() -> None:
    emb = _circle([0, 12, 20, 50, 90, 100])
    labels = ["a", "a", "a", "b", "b", "b"]
    # nearest other slide: 12,20,12,20(miss),100,90 -> Acc@1 = 5/6; 50's top 3 = 20, 12, 90 -> Acc@3 = 1
    r = slide_retrieval(emb, labels, ks=(1, 3))
    assert r["Acc@1"] == pytest.approx(5 / 6) and r["Acc@3"] == pytest.approx(1.0)
    assert r["top_m"] == 1 and r["MV@top1%"] == pytest.approx(5 / 6)
    # top 60% of the 5 others = 3: 50's top 3 has one 'b' -> no majority; 90's (100, 50, 20) has two 'b'
    r60 = slide_retrieval(emb, labels, ks=(1,), top_fraction=0.6)
    assert r60["top_m"] == 3 and r60["MV@top60%"] == pytest.approx(5 / 6)
    assert "query excluded" in r["convention"]


def test_slide_retrieval_excludes_query() -> None:
    r = slide_retrieval(np.ones((2, 4)), ["x", "y"], ks=(1, 5))
    assert r["Acc@1"] == 0.0 and r["Acc@5"] == 0.0  # only the other slide is a candidate
    r = slide_retrieval(np.ones((3, 4)), ["x", "y", "x"], ks=(1,))
    # all tie: stable order keeps index order among the others: 0->1 (y), 1->0 (x), 2->0 (x)
    assert r["Acc@1"] == pytest.approx(1 / 3)
    with pytest.raises(RetrievalError):
        slide_retrieval(np.ones((1, 4)), ["x"])
    with pytest.raises(RetrievalError):
        slide_retrieval(np.ones((3, 4)), ["x", "y"])

"""Generation metrics against hand computations and the reference implementations' own outputs."""

from __future__ import annotations

import math
import shutil

import pytest

from hwsi.eval.metrics import (
    MetricError,
    coco_scores_from_tokens,
    coco_tokenize,
    generation_scores,
    simple_coco_tokenize,
    wsi_bench_tokenize,
)

HYP = "The cat sat on the mat."
REF = "The cat is on the mat."


def test_wsi_bench_tokenizer() -> None:
    assert wsi_bench_tokenize("Grade II, no necrosis. The tumor's margin!") == [
        "grade", "ii", ",", "no", "necrosis", ".", "the", "tumor", "'s", "margin", "!"]
    assert wsi_bench_tokenize("") == []


def test_nltk_sentence_bleu_matches_hand_computation() -> None:
    """Modified n-gram precision and brevity penalty by hand on tiny examples (no smoothing involved)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    hyp, ref = "the cat sat on the mat".split(), "the cat is on the mat".split()
    sm = SmoothingFunction().method4
    # p1 = 5/6 (the x2 clipped, cat, on, mat), p2 = 3/5 (the cat, on the, the mat), p3 = 1/4 (on the mat), BP = 1
    assert sentence_bleu([ref], hyp, weights=(1.0,), smoothing_function=sm) == pytest.approx(5 / 6)
    assert sentence_bleu([ref], hyp, weights=(0.5, 0.5), smoothing_function=sm) == pytest.approx(math.sqrt(0.5))
    assert sentence_bleu([ref], hyp, weights=(1 / 3,) * 3, smoothing_function=sm) == pytest.approx(0.5)
    # shorter hypothesis: every unigram matches, BP = exp(1 - 6/5)
    short = "the cat on the mat".split()
    assert sentence_bleu([ref], short, weights=(1.0,)) == pytest.approx(math.exp(-0.2))


def test_wsi_bench_convention_known_values() -> None:
    s = generation_scores([HYP], [REF], convention="wsi-bench")
    assert s["convention"] == "wsi-bench" and s["n"] == 1 and "NLTKWordTokenizer" in s["tokenizer"]
    # tokens add "." to both: p1 = 6/7, p2 = 4/6, p3 = 2/5 (on the mat, the mat .)
    assert s["BLEU-1"] == pytest.approx(6 / 7)
    assert s["BLEU-2"] == pytest.approx(math.sqrt(6 / 7 * 4 / 6))
    assert s["BLEU-3"] == pytest.approx((6 / 7 * 4 / 6 * 2 / 5) ** (1 / 3))
    assert 0 < s["BLEU-4"] < s["BLEU-3"]
    # rouge-score drops punctuation: LCS "the cat on the mat" = 5 of 6 both ways
    assert s["ROUGE-L"] == pytest.approx(5 / 6)
    # identical text: one chunk over 7 matched tokens -> fragmentation penalty 0.5 * (1/7)^3
    same = generation_scores([REF, "No necrosis."], [REF, ["Tumour present.", "no necrosis ."]], "wsi-bench")
    assert same["BLEU-1"] == pytest.approx(1.0)
    assert same["ROUGE-L"] == pytest.approx(1.0)
    m1 = 1 - 0.5 * (1 / 7) ** 3
    m2 = 1 - 0.5 * (1 / 3) ** 3
    assert same["METEOR"] == pytest.approx((m1 + m2) / 2, abs=1e-6)
    quick = generation_scores([HYP], [REF], convention="wsi-bench", meteor=False)
    assert "METEOR" not in quick and quick["BLEU-1"] == s["BLEU-1"]
    # an empty prediction scores 0 (no exception) and drags the mean down
    half = generation_scores(["", REF], [REF, REF], "wsi-bench")
    assert half["BLEU-4"] == pytest.approx(0.5) and half["METEOR"] == pytest.approx(m1 / 2, abs=1e-6)


def test_coco_bleu_equals_pycocoevalcap() -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    preds = ["the tumour shows papillary architecture", "benign tissue", "sheets of squamous cells with keratin"]
    refs = [["papillary architecture is seen in the tumour", "papillary tumour"], ["benign breast tissue"],
            ["sheets of atypical squamous cells", "keratin pearls and squamous cells"]]
    gts = {i: [simple_coco_tokenize(r) for r in rl] for i, rl in enumerate(refs)}
    res = {i: [simple_coco_tokenize(p)] for i, p in enumerate(preds)}
    ref_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ours = generation_scores(preds, refs, convention="coco", tokenizer="simple", meteor=False)
    assert ours["convention"] == "coco" and "simple" in ours["tokenizer"]
    assert [ours[f"BLEU-{n}"] for n in range(1, 5)] == pytest.approx(ref_bleu)
    assert ours["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert "METEOR" not in ours
    # corpus-level BLEU is not the mean of sentence BLEUs: differs from the wsi-bench convention on these data
    assert coco_scores_from_tokens(gts, res, meteor=False, cider=False)["BLEU-1"] == pytest.approx(ref_bleu[0])


def test_simple_coco_tokenize() -> None:
    assert simple_coco_tokenize("Grade II, no necrosis (focal).") == "grade ii no necrosis focal"
    assert simple_coco_tokenize("tumour's margin") == "tumour's margin"


def test_bad_input() -> None:
    with pytest.raises(MetricError, match="2 predictions but 1 references"):
        generation_scores(["a", "b"], ["a"])
    with pytest.raises(MetricError, match="unknown convention"):
        generation_scores(["a"], ["a"], convention="bleu")  # type: ignore[arg-type]
    with pytest.raises(MetricError, match="not one string"):
        generation_scores("abc", ["a", "b", "c"])  # type: ignore[arg-type]
    with pytest.raises(MetricError, match="no predictions"):
        generation_scores([], [])
    with pytest.raises(MetricError, match="unknown coco tokenizer"):
        coco_tokenize(["a"], [["a"]], "spacy")


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer and METEOR need Java")
def test_coco_convention_with_java() -> None:
    """The one Java test: PTB tokenizer + METEOR jar (shared process), against the simple tokenizer and identity."""
    preds = ["The tumour shows papillary architecture.", "Benign tissue, no atypia."]
    refs = ["Papillary architecture is seen in the tumour.", "Benign breast tissue without atypia."]
    ptb = generation_scores(preds, refs, convention="coco", tokenizer="ptb")
    simple = generation_scores(preds, refs, convention="coco", tokenizer="simple", meteor=False)
    assert "PTBTokenizer" in ptb["tokenizer"]
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert ptb[k] == pytest.approx(simple[k]), k  # no tokens where PTB and the simple tokenizer disagree
    assert 0.2 < ptb["METEOR"] < 0.9
    ident = generation_scores(refs, refs, convention="coco", tokenizer="simple")  # reuses the METEOR process
    assert ident["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert ident["ROUGE-L"] == pytest.approx(1.0) and ident["METEOR"] > 0.95 and ident["METEOR"] > ptb["METEOR"]

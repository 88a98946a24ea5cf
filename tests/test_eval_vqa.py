"""Closed-ended answer parsing, VQA accuracy with parse-failure rate, open-ended matching."""

from __future__ import annotations

from pathlib import Path

import pytest

from hwsi.eval.vqa import VQAError, normalize_answer, open_answer_scores, parse_choice, token_f1, vqa_accuracy
from hwsi.data import QAItem, load_records

OPTS = ["Squamous cell carcinoma", "Small cell lung carcinoma", "Papillary adenocarcinoma", "Alveolar adenoma"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", 1), ("(B)", 1), ("B)", 1), ("B.", 1), ("b", 1), ("**C**", 2),
        ("Answer: B", 1), ("the answer is b", 1), ("The answer is d.", 3), ("I would pick option C, papillary.", 2),
        ("Answer: (C) papillary", 2), ("C) Papillary adenocarcinoma", 2), ("A. Squamous cell carcinoma", 0),
        ("papillary adenocarcinoma", 2), ("Papillary  Adenocarcinoma!", 2),
        ("It is a papillary adenocarcinoma of the lung.", 2),
        # 'a' after "is" is an article, not option A; the option text decides
        ("The answer is a squamous cell carcinoma", 0),
        ("carcinoma", None),  # in two options, equal to none
        ("squamous cell carcinoma or alveolar adenoma", None),  # two unrelated options named
        ("", None), ("I am not sure.", None), ("E", None),
    ],
)
def test_parse_choice(text: str, expected: int | None) -> None:
    assert parse_choice(text, OPTS) == expected


def test_parse_choice_longest_match_and_letter_prefixed_options() -> None:
    opts = ["carcinoma", "invasive ductal carcinoma", "lobular"]
    assert parse_choice("invasive ductal carcinoma", opts) == 1
    assert parse_choice("This is an invasive ductal carcinoma.", opts) == 1  # contains option 0 too: longest wins
    assert parse_choice("invasive ductal carcinoma, not lobular", opts) is None  # unrelated second hit
    assert parse_choice("It is carcinoma", opts) == 0
    assert parse_choice("acinar", ["A) Solid", "B) Acinar"]) == 1
    assert parse_choice("yes, clearly", ["yes", "no"]) == 0
    with pytest.raises(VQAError):
        parse_choice("A", [])


def _item(qid: str, options: list[str] | None, answer: str, idx: int | None, cat: str = "c") -> QAItem:
    return QAItem(qid, "s", "q?", answer, options, cat, answer_index=idx)


def test_vqa_accuracy_counts() -> None:
    items = [
        _item("1", OPTS, OPTS[2], 2, "dx"),
        _item("2", OPTS, OPTS[0], 0, "dx"),
        _item("3", ["G1", "G2"], "G2", 1, "grade"),
        _item("4", ["G1", "G2"], "G1", None, "grade"),  # gold from the answer text
        _item("5", ["yes", "no"], "Minimal glands are seen.", None, "m"),  # no gold -> left out
    ]
    preds = ["C", "I cannot tell", "G1", "The grade is G1.", "yes"]
    s = vqa_accuracy(preds, items)
    assert s["n"] == 4 and s["n_correct"] == 2 and s["accuracy"] == pytest.approx(0.5)
    assert s["parse_failures"] == 1 and s["parse_failure_rate"] == pytest.approx(0.25)
    assert s["no_gold"] == 1
    assert s["by_category"] == {"dx": {"accuracy": 0.5, "n": 2}, "grade": {"accuracy": 0.5, "n": 2}}
    assert "closed-choice" in s["convention"]
    with pytest.raises(VQAError, match="open-ended"):
        vqa_accuracy(["x"], [_item("9", None, "a", None)])
    with pytest.raises(VQAError, match="1 predictions but 2 items"):
        vqa_accuracy(["x"], items[:2])


def test_vqa_accuracy_on_real_slidebench(shared_data: Path) -> None:
    """Gold letters fed back score 100%; option texts too; a constant 'A' scores the share of A answers."""
    items = [r for r in load_records(shared_data / "text/slidebench/slidebench_test.json") if isinstance(r, QAItem)]
    letters = [r.metadata["answer_letter"] for r in items]
    assert vqa_accuracy(letters, items)["accuracy"] == 1.0
    texts = vqa_accuracy([r.answer for r in items], items)
    assert texts["accuracy"] == 1.0 and texts["parse_failures"] == 0
    const = vqa_accuracy(["A"] * len(items), items)
    assert const["n_correct"] == 224 and const["parse_failures"] == 0
    nonsense = vqa_accuracy(["unsure"] * len(items), items)
    assert nonsense["accuracy"] == 0.0 and nonsense["parse_failure_rate"] == 1.0


def test_open_answer_scores() -> None:
    assert normalize_answer("The  Luminal-B subtype.") == "luminal b subtype"
    # pred 2 tokens, ref "molecular subtype is luminal b" 5 tokens, 2 shared: P = 1, R = 0.4
    assert token_f1("luminal b", "The molecular subtype is Luminal B.") == pytest.approx(2 * 1 * 0.4 / 1.4)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("abc", "xyz") == 0.0
    s = open_answer_scores(["Negative", "negative.", "2+"], ["Negative", "Negative", "3+"])
    assert s["exact_match"] == pytest.approx(1 / 3)
    assert s["normalized_match"] == pytest.approx(2 / 3)
    assert s["token_f1"] == pytest.approx(2 / 3)
    assert s["n"] == 3 and "open-normalised" in s["convention"]
    with pytest.raises(VQAError):
        open_answer_scores(["a"], [])


def test_evaluate_items_on_real_wsi_bench(shared_data: Path) -> None:
    """WSI-Bench test, three categories: references fed back score perfectly; closed/open routing by options."""
    from hwsi.eval.vqa import evaluate_items

    items = [r for r in load_records(shared_data / "text/wsi-bench/WSI-Bench-test.jsonl")
             if isinstance(r, QAItem) and r.category in ("Prognosis", "Subtype", "Stage")]
    preds = [r.answer for r in items]
    s = evaluate_items(preds, items, generation_convention="coco", meteor=False)
    # Prognosis (48) is "good or poor?" (closed); 5 of its references state neither and are left out
    assert s["n_closed"] == 48 and s["n_open"] == 48 + 191
    assert s["closed"]["n"] == 43 and s["closed"]["accuracy"] == 1.0 and s["closed"]["no_gold"] == 5
    assert s["open"]["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and s["open"]["normalized_match"] == 1.0
    assert set(s["open_by_category"]) == {"Subtype", "Stage"} and s["open_by_category"]["Stage"]["n"] == 191
    swapped = evaluate_items(preds[::-1], items, generation_convention="coco", meteor=False)
    assert swapped["open"]["BLEU-4"] < 0.9

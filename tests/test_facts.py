"""hwsi.eval.facts: SynthPath fact parser on hand-written sentences (incl. negations) and on every synth template."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hwsi.eval.facts import DIAGNOSIS_GRADE, FACT_NAMES, FactError, fact_accuracy, parse_facts
from hwsi.synth.classes import DIAGNOSES, SlideClasses, all_classes
from hwsi.synth.text import _open_answer, make_caption, make_report


def _stated(text: str) -> dict[str, str | None]:
    p = parse_facts(text)
    return {f: p.values[f] for f in FACT_NAMES if p.source[f] == "stated"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No gland formation is seen.", {"glands": "no"}),
        ("The tumour grows in solid sheets without gland formation.", {"glands": "no", "architecture": "solid"}),
        ("Gland formation is absent.", {"glands": "no"}),
        ("The lesion lacks glandular differentiation.", {"glands": "no"}),
        ("Well-formed glands are present.", {"glands": "yes"}),
        ("There is no nuclear atypia.", {"atypia": "no"}),
        ("Nuclei are uniform and bland, without pleomorphism.", {"atypia": "no"}),
        ("The nuclei are pleomorphic with prominent nucleoli.", {"atypia": "yes"}),
        ("The glands are crowded, back to back.", {"glands": "yes", "architecture": "crowded"}),
        ("The glands are evenly spaced in fibrous stroma.", {"glands": "yes", "architecture": "regular"}),
        ("There is no focus of dysplasia or carcinoma anywhere in the tissue.", {"extent": "none"}),
        ("The process is multifocal, present in 6 of 9 tissue regions.", {"extent": "extensive"}),
        ("Only a single focus is involved.", {"extent": "focal"}),
        ("Diagnosis: adenocarcinoma, high grade, extensive.",
         {"diagnosis": "adenocarcinoma_high_grade", "grade": "high grade", "extent": "extensive"}),
        ("Final interpretation: high grade adenocarcinoma.",
         {"diagnosis": "adenocarcinoma_high_grade", "grade": "high grade"}),
        ("The dysplasia is high grade; no invasive growth pattern is seen.",
         {"diagnosis": "dysplasia", "grade": "high-grade dysplasia"}),
        # "high-grade nuclear features" describe atypia, not the grade
        ("High-grade nuclear features are seen.", {"atypia": "yes"}),
        ("No evidence of carcinoma. Benign glandular tissue.", {"diagnosis": "benign", "glands": "yes"}),
        ("C) solid", {"architecture": "solid"}),
        ("Grading does not apply: the tissue is benign.", {"diagnosis": "benign", "grade": "not applicable"}),
        ("Hello, how are you?", {}),
    ],
)
def test_hand_written_sentences(text: str, expected: dict[str, str]) -> None:
    assert _stated(text) == expected


def test_conflicts_and_implied_values() -> None:
    p = parse_facts("The tumour is low grade. The tumour is high grade.")
    assert p.values["grade"] is None and p.source["grade"] == "conflict"
    # a diagnosis conflict is resolved by the sentence with a diagnosis cue
    p = parse_facts("Solid carcinoma was considered. Diagnosis: adenocarcinoma, low grade.")
    assert p.values["diagnosis"] == "adenocarcinoma_low_grade"
    p = parse_facts("Solid carcinoma, focal.")
    assert (p.values["grade"], p.source["grade"]) == ("high grade", "implied")
    assert p.values["architecture"] is None  # the diagnosis name does not state the architecture
    p = parse_facts("Benign glandular tissue.")
    assert (p.values["extent"], p.source["extent"]) == ("none", "implied")
    assert "extent" not in p.stated()


def test_diagnosis_grade_mirrors_synth_classes() -> None:
    assert DIAGNOSIS_GRADE == {d: SlideClasses(d, "none" if d == "benign" else "focal").grade for d in DIAGNOSES}


def test_every_synth_template_parses_to_its_truth() -> None:
    """Reports state all six facts correctly; captions and open answers never state a wrong one."""
    for cls in all_classes():
        facts = cls.facts()
        facts.update(n_tissue_regions=9, n_lesion_regions=1 if cls.extent == "focal" else 5)
        for seed in range(25):
            rng = np.random.default_rng(seed)
            rep = parse_facts(make_report(facts, rng))
            assert rep.stated() == set(FACT_NAMES)
            assert all(rep.values[f] == facts[f] for f in FACT_NAMES), (cls, rep)
            cap = parse_facts(make_caption(facts, rng))
            assert all(cap.values[f] == facts[f] for f in ("diagnosis", "grade", "extent"))
            assert all(cap.values[f] in (None, facts[f]) for f in FACT_NAMES)
            for kind in ("glands", "atypia", "architecture", "diagnosis", "grade", "extent"):
                ans = parse_facts(_open_answer(kind, facts, rng))
                assert ans.values[kind] == facts[kind], (kind, cls)
                assert all(ans.values[f] in (None, facts[f]) for f in FACT_NAMES)


def test_fact_accuracy_counts_expected_facts_only() -> None:
    truth = SlideClasses("adenocarcinoma_high_grade", "focal").facts()
    refs = ["Diagnosis: adenocarcinoma, high grade, focal.", "No glands are formed.", "What?"]
    preds = [
        "Diagnosis: adenocarcinoma, low grade, focal.",  # diagnosis + grade wrong, extent right
        "Glands are crowded back to back.",  # glands right (truth: yes)
        "Diagnosis: solid carcinoma.",  # the reference states nothing: not scored
    ]
    res = fact_accuracy(preds, [truth] * 3, refs)
    f = res["facts"]
    assert f["diagnosis"] == {"n": 1, "stated": 1, "correct": 0, "accuracy": 0.0, "accuracy_when_stated": 0.0}
    assert f["grade"]["accuracy"] == 0.0 and f["extent"]["accuracy"] == 1.0
    assert f["glands"]["accuracy"] == 1.0 and "atypia" not in f
    assert res["mean_accuracy"] == pytest.approx(0.5)
    assert res["all_correct"] == pytest.approx(1 / 3)
    assert "synthpath-facts" in res["convention"]
    # an unstated expected fact counts as wrong, accuracy_when_stated is NaN then
    res = fact_accuracy(["nothing"], [truth], ["The glands are crowded."])
    assert res["facts"]["architecture"]["accuracy"] == 0.0
    assert math.isnan(res["facts"]["architecture"]["accuracy_when_stated"])
    # without references every ground-truth fact is expected
    res = fact_accuracy(["Diagnosis: adenocarcinoma, high grade, focal."], [truth])
    assert set(res["facts"]) == set(FACT_NAMES)
    with pytest.raises(FactError):
        fact_accuracy(["a"], [truth, truth])

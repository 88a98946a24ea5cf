"""Text from SynthPath ground truth: reports, captions and VQA pairs with varied wording.

Every fact has several paraphrases; reports pick one per fact and shuffle the order of the findings clauses, so
slides of the same class get different reports. Records are written in WSI-Bench format:

* train (LLaVA style, JSON list): ``{"id", "image": "<slide_id>", "conversations": [{"from": "human",
  "value": "<image>\\n<question>"}, {"from": "gpt", "value": "<answer>"}]}``
* val/test (JSONL): ``{"question_id", "image": "<slide_id>", "question", "T-answer", "metadata"}`` with metadata
  one of ``Morphology, Classification, Grade, Extent, Report, Caption`` (WSI-Bench's names; ``Extent`` is
  SynthPath's slide-scale category). Closed-ended records also carry ``"options"`` (list of option texts) and
  ``"answer_option"`` (the letter); their question ends with ``"A) ... B) ..."`` lines and ``T-answer`` is
  ``"<letter>) <option text>"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hwsi.synth.classes import DIAGNOSES, DISPLAY

CATEGORIES: tuple[str, ...] = ("Morphology", "Classification", "Grade", "Extent", "Location")

# SynthPath's SPF vocabulary (Eq. 2's text entities, fixed for the cohort: docs/design.md §5): the morphology its reports
# describe, as an organ-specific vocabulary file would for real slides. Written to COHORT/vocab.txt by `hwsi synth`
# and used by the demo's `hwsi extract --vocab`. Why not the built-in generic vocabulary: in the small patch
# encoder's space its mean relevance ranks gland patches BELOW stroma (measured on the test preset, 40 slides:
# selected patches 0.5 % gland / 90 % stroma with it, 70 % gland / 20 % stroma / 9 % solid with this one; nuclei
# per selected patch 2.8 -> 7.1), so CCAF would rarely see the epithelium whose atypia it must judge.
SYNTHPATH_VOCABULARY: tuple[str, ...] = (
    "glands", "tubular glands", "gland formation", "central lumina", "epithelial nuclei", "epithelial component",
    "nuclear pleomorphism", "coarse chromatin", "irregular nuclear contours", "marked atypia", "crowded glands",
    "confluent sheets", "solid carcinoma", "adenocarcinoma", "dysplasia", "fibrous stroma", "lymphocytes",
)

# SynthPath's stage-1 unit routing rules (hwsi.train.units; docs/design.md §5 v2), written to COHORT/unit_rules.yaml by
# `hwsi synth`: KEYWORD rules in the packaged default's format, with the words these paraphrases use for each
# level (nuclei -> cells, arrangement -> regions, diagnosis/extent/grade -> slide, glands/sheets/stroma -> patches).
SYNTHPATH_UNIT_RULES: dict[str, Any] = {
    "negations": ["no", "not", "without", "absent", "lack", "lacks", "none"],
    "rules": [
        {"scale": "cells", "keywords": ["nucle", "chromatin", "pleomorph", "cytolog", "atypi", "hyperchromat"]},
        {"scale": "regions", "keywords": ["crowd", "back-to-back", "back to back", "spaced", "spacing", "architect",
                                          "orderly", "arrangement", "coalesce", "confluent", "invasive"]},
        {"scale": "slide", "keywords": ["diagnosis", "consistent with", "interpretation", "appearances are",
                                        "extensive", "focal", "focus", "widespread", "involv", "grade", "grading",
                                        "lesional area", "dysplasia or carcinoma", "benign pattern"]},
        {"scale": "patches", "keywords": ["gland", "lumen", "lumin", "tubul", "solid", "sheet", "nest", "epitheli",
                                          "stroma"]},
    ],
}

_GLANDS = {
    "yes": [
        "The epithelium forms glands lined by columnar cells arranged around open, pale lumens.",
        "Gland formation is present: rings of epithelial cells surround clear central lumens.",
        "Well-formed glandular structures are seen, each a single layer of epithelium around a lumen.",
        "The epithelial component is glandular, with tubular glands showing central lumina.",
    ],
    "no": [
        "The lesional epithelium grows in solid sheets without gland formation or lumens.",
        "No glands are formed; the tumour cells are arranged in solid, confluent sheets.",
        "Gland formation is absent, the epithelial cells being packed in solid nests and sheets.",
        "The lesion lacks glandular differentiation and consists of solid sheets of cells.",
    ],
}
_ARCH = {
    "regular": [
        "The glands are evenly spaced and separated by ample intervening stroma.",
        "Glandular architecture is orderly, with regularly distributed glands in fibrous stroma.",
        "The glands keep a regular, well-spaced arrangement across the tissue.",
    ],
    "crowded": [
        "In the lesional areas the glands are crowded and arranged back to back with little intervening stroma.",
        "The lesional glands cluster in crowded, back-to-back groups, losing the normal regular spacing.",
        "Architecturally the glands are disorganised, crowded together in confluent back-to-back clusters.",
    ],
    "solid": [
        "The lesional areas show confluent solid growth replacing the normal glandular pattern.",
        "Architecturally, irregular solid tumour sheets coalesce across the lesional regions.",
        "The architecture of the lesion is solid, with confluent sheets in place of glands.",
    ],
}
_ATYPIA = {
    "no": [
        "The nuclei are small, uniform and oval, with fine, evenly distributed chromatin.",
        "Nuclear features are bland: uniform oval nuclei with smooth contours and fine chromatin.",
        "There is no significant nuclear atypia; nuclei are regular in size and shape.",
        "Cytologically the epithelial nuclei are monotonous and bland, without pleomorphism.",
    ],
    "yes": [
        "The epithelial nuclei show marked atypia, with pleomorphism, irregular contours and coarse chromatin.",
        "Significant nuclear atypia is present: nuclei vary in size, have irregular membranes and clumped chromatin "
        "with visible nucleoli.",
        "Cytologically the nuclei are pleomorphic and hyperchromatic, with irregular outlines and prominent nucleoli.",
        "High-grade nuclear features are seen, including nuclear pleomorphism, coarse chromatin and nucleoli.",
    ],
}
_EXTENT = {
    "none": [
        "No lesional area is identified in the section.",
        "There is no focus of dysplasia or carcinoma anywhere in the tissue.",
        "The whole section shows the same benign pattern, without a lesion.",
    ],
    "focal": [
        "The lesion is focal, confined to a single region of the section.",
        "Involvement is limited to one small focus; the remaining tissue is unremarkable.",
        "Only a single focus is involved, the rest of the section being benign.",
    ],
    "extensive": [
        "The lesion is extensive, involving {n} of {m} tissue regions (about {pct}% of the section).",
        "Lesional tissue is widespread, occupying {n} of the {m} regions of tissue.",
        "The process is extensive and multifocal, present in {n} of {m} tissue regions.",
    ],
}
_DIAG = [
    "Diagnosis: {dx}.",
    "The findings are consistent with {dx}.",
    "Overall, these features support a diagnosis of {dx}.",
    "Final interpretation: {dx}.",
    "Taken together, the appearances are those of {dx}.",
]
_GRADE_SENT = {
    "not applicable": ["No grade is assigned to benign tissue.", "Grading does not apply."],
    "high-grade dysplasia": [
        "The dysplasia is high grade; no invasive growth pattern is seen.",
        "The changes amount to high-grade dysplasia without invasive architecture.",
    ],
    "low grade": ["The tumour is low grade.", "Histological grade: low grade.", "It is graded as low grade."],
    "high grade": ["The tumour is high grade.", "Histological grade: high grade.", "It is graded as high grade."],
}
_STROMA = [
    "The background stroma is fibrous, with scattered spindle cells and a few lymphocytes.",
    "Intervening stroma is collagenous and contains sparse spindle cells and lymphocytes.",
    "",
    "",
]
_REPORT_OPEN = [
    "Microscopic examination of the whole slide shows the following.",
    "The section shows glandular tissue in a fibrous stroma.",
    "",
    "",
]

_Q = {
    "glands": [
        "Does the lesion form glands?",
        "Is gland formation present in this slide?",
        "Are glandular structures with lumens seen?",
        "Is the tissue glandular?",
    ],
    "atypia": [
        "Is there nuclear atypia in the epithelial cells?",
        "Do the epithelial nuclei show atypical features?",
        "Are the nuclei pleomorphic or atypical?",
        "How would you describe the nuclear features of the epithelium?",
    ],
    "architecture": [
        "How are the glands arranged?",
        "What is the architectural pattern of the lesion?",
        "Describe the arrangement of the epithelial structures.",
    ],
    "diagnosis": [
        "What is the diagnosis?",
        "What is the most likely diagnosis for this slide?",
        "Based on the slide, what is the histological classification?",
        "Which diagnosis best fits the whole slide image?",
    ],
    "grade": [
        "What is the grade of this lesion?",
        "How would you grade the lesion in this slide?",
        "What grade does the lesion have?",
    ],
    "extent": [
        "How extensive is the lesion?",
        "Is the lesion focal or extensive?",
        "What is the extent of involvement of the tissue?",
    ],
    # questions that the slide token alone cannot hold (docs/design.md §8): a count of lesional regions and where
    # a focal lesion lies need per-region evidence (region tokens, region identity of the cell/patch tokens)
    "count": [
        "How many tissue regions does the lesion involve?",
        "In how many regions of the section is the lesion present?",
        "How many of the tissue regions are lesional?",
    ],
    "location": [
        "In which part of the section is the lesion?",
        "Where in the section does the focal lesion lie?",
        "Which part of the tissue holds the lesion?",
    ],
}
_REPORT_Q = [
    "Write a pathology report for this whole slide image.",
    "What are the main observations in the whole slide image, and what is the likely diagnosis?",
    "Please describe the main features of the slide and give a diagnosis.",
    "Provide a detailed report of this slide.",
]
_CAPTION_Q = [
    "Can you provide an overall description of the whole slide image?",
    "Give a short caption of this slide.",
    "Summarise the slide in one or two sentences.",
]
_OPTION_SETS = {
    "diagnosis": [DISPLAY[d] for d in DIAGNOSES],
    "grade": ["not applicable", "low grade", "high grade", "high-grade dysplasia"],
    "extent": ["no lesion", "focal", "extensive"],
    "glands": ["yes", "no"],
    "atypia": ["yes", "no"],
    "architecture": ["regular", "crowded", "solid"],
    "count": ["none", "one", "two", "three", "four or more"],
    "location": ["upper left", "upper right", "lower left", "lower right", "central"],
}
_COUNT_WORDS = ("none", "one", "two", "three")


def question_stems(kind: str) -> list[str]:
    """Every phrasing of one kind of question (``atypia``, ``architecture``, ...), in a fixed order."""
    return list(_Q[kind])


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _fmt(s: str, facts: dict[str, Any]) -> str:
    n, m = facts.get("n_lesion_regions", 0), facts.get("n_tissue_regions", 0)
    return s.format(n=n, m=m, pct=int(round(100 * n / max(1, m))), dx=facts["diagnosis_text"])


def _dx_with_extent(facts: dict[str, Any]) -> str:
    if facts["extent"] == "none":
        return facts["diagnosis_text"]
    return f"{facts['diagnosis_text']}, {facts['extent']}"


def make_report(facts: dict[str, Any], rng: np.random.Generator) -> str:
    """A pathology-style report: findings in random order, then grade and diagnosis."""
    findings = [
        _pick(rng, _GLANDS[facts["glands"]]),
        _pick(rng, _ARCH[facts["architecture"]]),
        _pick(rng, _ATYPIA[facts["atypia"]]),
        _fmt(_pick(rng, _EXTENT[facts["extent"]]), facts),
    ]
    extra = _pick(rng, _STROMA)
    if extra:
        findings.append(extra)
    order = rng.permutation(len(findings))
    parts = [_pick(rng, _REPORT_OPEN)] + [findings[i] for i in order]
    parts.append(_pick(rng, _GRADE_SENT[facts["grade"]]))
    parts.append(_pick(rng, _DIAG).format(dx=_dx_with_extent(facts)))
    return " ".join(p for p in parts if p)


def make_caption(facts: dict[str, Any], rng: np.random.Generator) -> str:
    """One or two sentences naming the diagnosis and its key evidence."""
    dx = _dx_with_extent(facts)
    lead = _pick(rng, ["{dx}.", "Whole slide image of {dx}.", "H&E section showing {dx}."]).format(dx=dx)
    lead = lead[0].upper() + lead[1:]
    detail = [_pick(rng, _GLANDS[facts["glands"]]), _pick(rng, _ATYPIA[facts["atypia"]])]
    rng.shuffle(detail)
    return " ".join([lead, detail[0]])


def _open_answer(kind: str, facts: dict[str, Any], rng: np.random.Generator) -> str:
    if kind == "glands":
        yn = "Yes" if facts["glands"] == "yes" else "No"
        return f"{yn}. " + _pick(rng, _GLANDS[facts["glands"]])
    if kind == "atypia":
        yn = "Yes" if facts["atypia"] == "yes" else "No"
        return f"{yn}. " + _pick(rng, _ATYPIA[facts["atypia"]])
    if kind == "architecture":
        return _pick(rng, _ARCH[facts["architecture"]])
    if kind == "diagnosis":
        return _pick(rng, _DIAG).format(dx=_dx_with_extent(facts))
    if kind == "grade":
        g = facts["grade"]
        lead = _pick(rng, ["The grade is {g}.", "Grade: {g}.", "This lesion is {g}."]).format(g=g)
        if g == "not applicable":
            lead = "Grading does not apply: the tissue is benign."
        return lead + " " + _pick(rng, _ATYPIA[facts["atypia"]])
    if kind == "extent":
        return _fmt(_pick(rng, _EXTENT[facts["extent"]]), facts)
    if kind == "count":
        if facts["n_lesion_regions"] == 0:
            return "None: no region of the section is lesional."
        return _fmt(_pick(rng, ["The lesion involves {n} of the {m} tissue regions.",
                                "It is present in {n} of {m} tissue regions."]), facts)
    if kind == "location":
        return _pick(rng, ["The lesion lies in the {loc} part of the section.",
                           "It is located in the {loc} part of the tissue."]).format(loc=facts["lesion_location"])
    raise ValueError(kind)


def _closed_truth(kind: str, facts: dict[str, Any]) -> str:
    if kind == "diagnosis":
        return facts["diagnosis_text"]
    if kind == "extent":
        return "no lesion" if facts["extent"] == "none" else facts["extent"]
    if kind == "count":
        n = int(facts["n_lesion_regions"])
        return _COUNT_WORDS[n] if n < len(_COUNT_WORDS) else "four or more"
    if kind == "location":
        return str(facts["lesion_location"])
    return str(facts[kind])


_KIND_CATEGORY = {
    "glands": "Morphology",
    "atypia": "Morphology",
    "architecture": "Morphology",
    "diagnosis": "Classification",
    "grade": "Grade",
    "extent": "Extent",
    "count": "Extent",
    "location": "Location",
}


@dataclass
class QA:
    """One question–answer pair about a slide."""

    category: str
    kind: str
    question: str
    answer: str
    closed: bool = False
    options: list[str] = field(default_factory=list)
    answer_option: str = ""


def make_vqa(facts: dict[str, Any], rng: np.random.Generator) -> list[QA]:
    """Open- and closed-ended QAs covering every category (morphology, diagnosis, grade, extent, location).

    Every fact is asked closed-ended for every slide (docs/design.md §8); the location of a lesion only where it is
    focal (one region), and only for slides that carry ``lesion_location`` / ``n_lesion_regions`` facts."""
    out: list[QA] = []
    kinds = ["glands", "atypia", "architecture", "diagnosis", "grade", "extent"]
    if "n_lesion_regions" in facts:
        kinds.append("count")
    if facts.get("extent") == "focal" and facts.get("lesion_location", "none") != "none":
        kinds.append("location")
    for kind in kinds:
        cat = _KIND_CATEGORY[kind]
        if kind != "architecture" or rng.random() < 0.7:
            out.append(QA(cat, kind, _pick(rng, _Q[kind]), _open_answer(kind, facts, rng)))
        opts = list(_OPTION_SETS[kind])
        truth = _closed_truth(kind, facts)
        if len(opts) > 4:  # keep four options, always including the truth
            others = [o for o in opts if o != truth]
            keep = [others[i] for i in rng.choice(len(others), 3, replace=False)]
            opts = keep + [truth]
        opts = [opts[i] for i in rng.permutation(len(opts))]
        letters = "ABCD"[: len(opts)]
        letter = letters[opts.index(truth)]
        q = _pick(rng, _Q[kind if kind not in ("glands", "atypia") else kind][:3])
        q = q + "\n" + "\n".join(f"{lt}) {o}" for lt, o in zip(letters, opts, strict=True))
        out.append(QA(cat, kind, q, f"{letter}) {truth}", True, opts, letter))
    return out


@dataclass
class SlideText:
    """All text of one slide."""

    slide_id: str
    report: str
    caption: str
    qas: list[QA]
    facts: dict[str, Any]
    train_extra: list[QA] = field(default_factory=list)  # train records only (:func:`location_drill`)


def location_drill(facts: dict[str, Any], rng: np.random.Generator) -> list[QA]:
    """Every phrasing of the location question, open and closed, for a slide with a focal lesion (else none).

    Train records only. A focal lesion is one region of ~22 train slides at the test preset: with one location
    question each, the stage-0 LM given the true findings as words (``lesion location: upper left``) answered the
    held-out location questions at 0.205 (chance 0.25) — it never learned to read the location it was given, so no
    visual token could carry it either (docs/ablations.md, "Location")."""
    if facts.get("extent") != "focal" or facts.get("lesion_location", "none") == "none":
        return []
    truth = _closed_truth("location", facts)
    out: list[QA] = []
    for q in _Q["location"]:
        out.append(QA(_KIND_CATEGORY["location"], "location", q, _open_answer("location", facts, rng)))
        others = [o for o in _OPTION_SETS["location"] if o != truth]
        opts = [others[i] for i in rng.choice(len(others), 3, replace=False)] + [truth]
        opts = [opts[i] for i in rng.permutation(len(opts))]
        letter = "ABCD"[opts.index(truth)]
        closed = q + "\n" + "\n".join(f"{lt}) {o}" for lt, o in zip("ABCD", opts, strict=True))
        out.append(QA(_KIND_CATEGORY["location"], "location", closed, f"{letter}) {truth}", True, opts, letter))
    return out


def slide_text(slide_id: str, facts: dict[str, Any], seed: int, location_drills: bool = True) -> SlideText:
    """Report, caption and VQA of one slide, deterministic in (seed, slide_id); with ``location_drills`` the train
    records also get :func:`location_drill` (its own random stream: every other text is unchanged by it)."""
    key = [seed, 31337] + [ord(c) for c in slide_id]
    rng = np.random.default_rng(key)
    t = SlideText(slide_id, make_report(facts, rng), make_caption(facts, rng), make_vqa(facts, rng), facts)
    if location_drills:
        t.train_extra = location_drill(facts, np.random.default_rng(key + [7]))
    return t


def train_records(texts: list[SlideText], seed: int) -> list[dict[str, Any]]:
    """LLaVA-style records (WSI-Bench train format): one per QA, plus a report and a caption request per slide."""
    recs: list[dict[str, Any]] = []
    for t in texts:
        rng = np.random.default_rng([seed, 4242] + [ord(c) for c in t.slide_id])
        pairs = [(_pick(rng, _REPORT_Q), t.report), (_pick(rng, _CAPTION_Q), t.caption)]
        pairs += [(qa.question, qa.answer) for qa in t.qas + t.train_extra]
        for k, (q, a) in enumerate(pairs):
            recs.append({
                "id": f"{t.slide_id}_{k}",
                "image": t.slide_id,
                "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}],
            })
    return recs


def bench_records(texts: list[SlideText], seed: int) -> list[dict[str, Any]]:
    """WSI-Bench test records (``question_id, image, question, T-answer, metadata`` [+ options, answer_option])."""
    recs: list[dict[str, Any]] = []
    for t in texts:
        rng = np.random.default_rng([seed, 4243] + [ord(c) for c in t.slide_id])
        recs.append({"question_id": f"Report_{t.slide_id}_1", "image": t.slide_id,
                     "question": _pick(rng, _REPORT_Q), "T-answer": t.report, "metadata": "Report"})
        recs.append({"question_id": f"Caption_{t.slide_id}_1", "image": t.slide_id,
                     "question": _pick(rng, _CAPTION_Q), "T-answer": t.caption, "metadata": "Caption"})
        counts: dict[str, int] = {}
        for qa in t.qas:
            counts[qa.category] = counts.get(qa.category, 0) + 1
            r: dict[str, Any] = {
                "question_id": f"{qa.category}_{t.slide_id}_{counts[qa.category]}",
                "image": t.slide_id,
                "question": qa.question,
                "T-answer": qa.answer,
                "metadata": qa.category,
            }
            if qa.closed:
                r["options"] = qa.options
                r["answer_option"] = qa.answer_option
            recs.append(r)
    return recs

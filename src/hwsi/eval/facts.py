"""SynthPath FACT accuracy: parse diagnosis, grade, extent, glands, architecture and atypia from free text.

BLEU rewards any LM that learned the report templates; a fact parsed from the generated text and compared with the
slide's ground truth (``hwsi.synth.classes.SlideClasses.facts``) says whether the text is RIGHT about the slide.

Parser convention (``"synthpath-facts-v1"``):

* the text is lower-cased, whitespace collapsed, hyphens and spaces unified in ``high-grade``/``back-to-back``;
* each fact has an ORDERED list of ``(value, regex)`` rules over the SynthPath vocabulary (``hwsi.synth.text``'s
  paraphrases and the diagnosis display names). Negated forms come first (``"no gland formation"``, ``"without
  atypia"``, ``"no focus of dysplasia or carcinoma"``): a rule's match is blanked out of the text before later
  rules run, so the positive rule cannot see the words inside a negation. Rules with value ``None`` only blank
  text out (e.g. ``"high-grade nuclear features"`` is atypia, not the grade);
* a fact is *stated* when the rules give exactly one distinct value; several different values are a
  *conflict* (unparsed, counts as wrong); for the diagnosis a conflict is first resolved by the sentences that
  carry a diagnosis cue (``"diagnosis"``, ``"consistent with"``, ``"interpretation"``, ...);
* implied values: SynthPath's diagnosis fixes its grade (``"solid carcinoma"`` -> high grade, ``"benign"`` -> not
  applicable) and a benign diagnosis means extent ``none``; grade and extent are taken from the parsed diagnosis
  when the text states no grade / extent (``source = "implied"``). Glands, architecture and atypia are never
  implied: they must be written.

Scoring (:func:`fact_accuracy`): for each sample the EXPECTED facts are those its reference text states (parsed
with the same rules; a report states all six, a caption its diagnosis plus one detail, an open VQA answer the fact
asked about) or, without references, all facts of the ground truth. Per fact: ``n`` (samples expecting it),
``stated``, ``correct``, ``accuracy = correct / n`` (unstated or conflicting counts as wrong) and
``accuracy_when_stated = correct / stated``; ``mean_accuracy`` averages the facts' accuracies and
``all_correct`` is the fraction of samples with every expected fact right.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hwsi.errors import HwsiError

CONVENTION = "synthpath-facts-v1"
FACT_NAMES: tuple[str, ...] = ("diagnosis", "grade", "extent", "glands", "architecture", "atypia")

#: grade implied by each SynthPath diagnosis (mirrors hwsi.synth.classes; checked by a test)
DIAGNOSIS_GRADE: dict[str, str] = {
    "benign": "not applicable",
    "dysplasia": "high-grade dysplasia",
    "adenocarcinoma_low_grade": "low grade",
    "adenocarcinoma_high_grade": "high grade",
    "solid_carcinoma": "high grade",
}


class FactError(HwsiError):
    """Bad input to fact scoring (length mismatch, unknown fact)."""


Rule = tuple[str | None, str]

_NEG = r"(?:no|not|without|absent|lacks?|lacking|none|neither|nor)"
_HG = r"high-grade"
_LG = r"low-grade"

RULES: dict[str, list[Rule]] = {
    "diagnosis": [
        (None, r"no focus of dysplasia or carcinoma"),
        (None, rf"\b{_NEG}\b[^.;]{{0,25}}\b(?:dysplasia|carcinoma|adenocarcinoma|lesion)\w*"),
        (None, r"rest of the section being benign|remaining tissue is (?:unremarkable|benign)"),
        (None, r"without invasive (?:growth|architecture)|no invasive"),
        ("solid_carcinoma", r"\bsolid carcinoma"),
        ("adenocarcinoma_high_grade", rf"\badenocarcinoma,? (?:of )?{_HG}|{_HG} adenocarcinoma"),
        ("adenocarcinoma_low_grade", rf"\badenocarcinoma,? (?:of )?{_LG}|{_LG} adenocarcinoma"),
        ("dysplasia", rf"(?:{_HG} )?(?:glandular )?dysplasia"),
        ("benign", r"\bbenign\b"),
    ],
    "grade": [
        (None, rf"{_HG} nuclear (?:features|atypia)"),
        ("not applicable", r"no grade|grading does not apply|grade(?: is|:)? not applicable|not graded|"
                           r"^(?:[a-d]\) )?not applicable\.?$"),
        ("high-grade dysplasia", rf"{_HG} (?:glandular )?dysplasia|dysplasia is {_HG}|dysplasia,? {_HG}"),
        ("low grade", rf"\b{_LG}\b"),
        ("high grade", rf"\b{_HG}\b"),
    ],
    "extent": [
        ("none", r"\bno lesion(?:al)?\b|without (?:a |any )?lesion|no focus\b|no lesional|"
                 r"same benign pattern"),
        ("extensive", r"\bextensive\b|widespread|multifocal|\b\d+ of (?:the )?\d+ (?:tissue )?regions"),
        ("focal", r"\bfocal\b|single (?:region|focus)|one (?:small )?focus|limited to one"),
    ],
    "glands": [
        (None, r"glandular tissue in a fibrous stroma|normal glandular pattern"),
        ("no", rf"\b{_NEG}\b[^.;]{{0,30}}\bgland\w*|gland(?:ular)? (?:formation|differentiation|structures?)"
               r"[^.;]{0,15}\b(?:is|are) (?:absent|not (?:seen|present|identified))|in place of glands|"
               r"glands? (?:is|are) not formed"),
        ("yes", r"forms? glands|gland formation(?: is)? present|glandular structures|tubular glands|"
                r"\bglands (?:are|keep|cluster|lined)|lesional glands|epithelial component is glandular|"
                r"glandular architecture|\bglandular\b|well-formed glands"),
    ],
    "architecture": [
        (None, r"losing the normal regular spacing|replacing the normal glandular|regular in size"),
        ("crowded", r"\bcrowded\b|back-to-back|disorganised"),
        ("solid", r"solid (?:growth|sheets?|nests|tumour sheets)|architecture of the lesion is solid|"
                  r"confluent sheets|confluent solid|^(?:[a-d]\) )?solid\.?$"),
        ("regular", r"evenly spaced|regular(?:ly)? (?:distributed|spaced|spacing|arrangement)|orderly|well-spaced|"
                    r"^(?:[a-d]\) )?regular\.?$"),
    ],
    "atypia": [
        ("no", rf"\b{_NEG}\b[^.;]{{0,30}}\b(?:atypi\w*|pleomorph\w*)|\bbland\b|\buniform\b|monotonous|"
               r"regular in size and shape"),
        ("yes", rf"atypi\w*|pleomorph\w*|hyperchromatic|nucleoli|irregular (?:contours|membranes|outlines)|"
                rf"coarse(?:,? clumped)? chromatin|{_HG} nuclear"),
    ],
}
_COMPILED: dict[str, list[tuple[str | None, re.Pattern[str]]]] = {
    f: [(v, re.compile(p, re.MULTILINE)) for v, p in rules] for f, rules in RULES.items()
}
_DX_CUE = re.compile(r"diagnos|consistent with|interpretation|appearances are those of|support|whole slide image of|"
                     r"section showing")
_SENT = re.compile(r"(?<=[.!?])\s+")


def normalize_text(text: str) -> str:
    """Lower case, collapsed whitespace, ``high grade``/``high-grade`` and ``back to back`` unified."""
    t = " ".join(text.lower().replace("\u2013", "-").replace("\u2014", "-").split())
    t = re.sub(r"\b(high|low)[ -]grade\b", r"\1-grade", t)
    t = re.sub(r"back[ -]to[ -]back", "back-to-back", t)
    return t


def _scan(fact: str, text: str) -> list[str]:
    """Values the ordered rules of ``fact`` find in normalised ``text`` (each match blanked before later rules)."""
    values: list[str] = []
    for value, pat in _COMPILED[fact]:
        hits = list(pat.finditer(text))
        if not hits:
            continue
        for m in reversed(hits):
            text = text[: m.start()] + " " * (m.end() - m.start()) + text[m.end():]
        if value is not None:
            values.extend([value] * len(hits))
    return values


@dataclass
class ParsedFacts:
    """Facts read from one text: ``values[f]`` is the value or None; ``source[f]`` stated / implied / conflict."""

    values: dict[str, str | None] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)

    def stated(self) -> set[str]:
        """Facts the text itself states (not implied, not conflicting)."""
        return {f for f, s in self.source.items() if s == "stated"}


def parse_facts(text: str) -> ParsedFacts:
    """Read the SynthPath facts from ``text`` (rules and conventions: module docstring)."""
    t = normalize_text(text)
    out = ParsedFacts()
    for fact in FACT_NAMES:
        vals = set(_scan(fact, t))
        if fact == "diagnosis" and len(vals) > 1:
            cue = " ".join(s for s in _SENT.split(t) if _DX_CUE.search(s))
            cue_vals = set(_scan(fact, cue)) if cue else set()
            vals = cue_vals if len(cue_vals) == 1 else vals
        if len(vals) == 1:
            out.values[fact], out.source[fact] = vals.pop(), "stated"
        elif vals:
            out.values[fact], out.source[fact] = None, "conflict"
        else:
            out.values[fact], out.source[fact] = None, "absent"
    dx = out.values["diagnosis"]
    if dx is not None:
        if out.source["grade"] == "absent":
            out.values["grade"], out.source["grade"] = DIAGNOSIS_GRADE[dx], "implied"
        if out.source["extent"] == "absent" and dx == "benign":
            out.values["extent"], out.source["extent"] = "none", "implied"
    return out


def expected_facts(reference: str | None, truth: Mapping[str, Any]) -> set[str]:
    """Facts a sample is scored on: those ``reference`` states or implies (all of ``truth``'s facts without one)."""
    if reference is None:
        return {f for f in FACT_NAMES if f in truth}
    p = parse_facts(reference)
    return {f for f in FACT_NAMES if p.source[f] in ("stated", "implied") and f in truth}


def fact_accuracy(
    preds: Sequence[str],
    truths: Sequence[Mapping[str, Any]],
    references: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-fact accuracy of generated texts against ground-truth facts (convention: module docstring)."""
    if len(preds) != len(truths):
        raise FactError(f"{len(preds)} predictions but {len(truths)} ground-truth fact sets")
    if references is not None and len(references) != len(preds):
        raise FactError(f"{len(preds)} predictions but {len(references)} references")
    n = {f: 0 for f in FACT_NAMES}
    stated = dict.fromkeys(FACT_NAMES, 0)
    correct = dict.fromkeys(FACT_NAMES, 0)
    all_ok = 0
    per_sample: list[dict[str, Any]] = []
    for i, (pred, truth) in enumerate(zip(preds, truths, strict=True)):
        exp = expected_facts(references[i] if references is not None else None, truth)
        parsed = parse_facts(pred)
        ok_all = True
        row: dict[str, Any] = {}
        for f in sorted(exp, key=FACT_NAMES.index):
            n[f] += 1
            v = parsed.values[f]
            if v is not None:
                stated[f] += 1
            ok = v is not None and v == str(truth[f])
            correct[f] += int(ok)
            ok_all &= ok
            row[f] = {"pred": v, "truth": str(truth[f]), "ok": ok, "source": parsed.source[f]}
        all_ok += int(ok_all and bool(exp))
        per_sample.append(row)
    facts = {
        f: {
            "n": n[f],
            "stated": stated[f],
            "correct": correct[f],
            "accuracy": correct[f] / n[f],
            "accuracy_when_stated": correct[f] / stated[f] if stated[f] else float("nan"),
        }
        for f in FACT_NAMES
        if n[f]
    }
    return {
        "convention": f"{CONVENTION}: facts parsed from the text with SynthPath vocabulary rules (negations first); "
        "expected facts = those the reference states; unstated/conflicting counts as wrong",
        "facts": facts,
        "mean_accuracy": sum(v["accuracy"] for v in facts.values()) / len(facts) if facts else float("nan"),
        "all_correct": all_ok / len(preds) if preds else float("nan"),
        "n": len(preds),
        "per_sample": per_sample,
    }


__all__ = [
    "CONVENTION",
    "DIAGNOSIS_GRADE",
    "FACT_NAMES",
    "FactError",
    "ParsedFacts",
    "RULES",
    "expected_facts",
    "fact_accuracy",
    "normalize_text",
    "parse_facts",
]

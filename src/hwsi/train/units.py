"""Report clauses routed to the scales of the hierarchy: the text units of stage 1 (Eq. 6), docs/design.md §5 reading v2.

The paper pairs cells with words, patches with phrases, regions with sentences and the slide with the report, and
names the level of each kind of finding (§3.3): nuclear morphology belongs to cells, gland formation to patches,
organisation/arrangement to regions, distribution and diagnosis to the slide. Bare words and noun phrases lose what
a finding SAYS ("without pleomorphism" becomes "pleomorphism"), so the units here are CLAUSES that keep their
negation, each routed to one scale by keyword rules (:class:`UnitRules`, a YAML file: the packaged general
pathology default ``unit_rules.yaml``, or a cohort's own, e.g. the one `hwsi synth` writes)::

    rules = UnitRules.load()                       # or UnitRules.load("COHORT/unit_rules.yaml")
    units = route_report(report, rules)            # {"cells": [Unit], "patches": [...], "regions": [...], "slide": [...]}

Clauses: the report is split into sentences (``. ! ?``), each sentence at ``;``, and at ``:`` when at least four
words stand before it ("Diagnosis: adenocarcinoma" is one clause; "Nuclear atypia is present: nuclei vary ..." two). A clause's scale is the first rule, in file order, with a keyword (lower-case
substring) in the clause. A clause is an ABSENCE statement ("no glands are formed", "there is no nuclear atypia")
when a negation cue appears before its first keyword; otherwise a PRESENCE statement ("solid sheets without gland
formation" presents sheets). Stage 1 pools a slide's tokens differently for the two (:mod:`hwsi.model.losses`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hwsi.config import read_yaml
from hwsi.errors import ConfigError

Scale = Literal["cells", "patches", "regions", "slide"]
UNIT_SCALES: tuple[str, ...] = ("cells", "patches", "regions", "slide")
DEFAULT_RULES = Path(__file__).with_name("unit_rules.yaml")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_CLAUSE = re.compile(r"\s*;\s+")
_COLON = re.compile(r"\s*:\s+")
MIN_COLON_HEAD = 4  # words before a ':' for it to split ("Diagnosis: X" stays one clause)


@dataclass(frozen=True)
class Unit:
    """One clause of a report, its scale, and whether it states an absence."""

    text: str
    scale: str
    absence: bool = False


@dataclass
class UnitRules:
    """Ordered keyword rules ``[(scale, keywords)]`` and the negation cues; see the module docstring."""

    rules: list[tuple[str, tuple[str, ...]]]
    negations: tuple[str, ...] = ("no", "not", "without")
    source: str = "<built-in>"
    _neg: re.Pattern[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for scale, kws in self.rules:
            if scale not in UNIT_SCALES:
                raise ConfigError(f"{self.source}: rule scale {scale!r} is not one of {list(UNIT_SCALES)}")
            if not kws:
                raise ConfigError(f"{self.source}: the {scale!r} rule has no keywords")
        cues = "|".join(re.escape(n.lower()) for n in self.negations) or r"(?!x)x"
        self._neg = re.compile(rf"\b(?:{cues})\b")

    @classmethod
    def load(cls, path: str | Path | None = None) -> "UnitRules":
        """Read a rules YAML (``negations: [...]``, ``rules: [{scale, keywords}]``); None = the packaged default."""
        p = Path(path) if path else DEFAULT_RULES
        data = read_yaml(p)
        if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
            raise ConfigError(f"{p}: expected a mapping with a 'rules' list")
        rules = []
        for i, r in enumerate(data["rules"]):
            if not isinstance(r, dict) or not isinstance(r.get("keywords"), list) or "scale" not in r:
                raise ConfigError(f"{p}: rules[{i}] needs 'scale' and a 'keywords' list")
            rules.append((str(r["scale"]), tuple(str(k).lower() for k in r["keywords"])))
        neg = data.get("negations", ["no", "not", "without"])
        if not isinstance(neg, list):
            raise ConfigError(f"{p}: 'negations' must be a list")
        return cls(rules, tuple(str(n) for n in neg), str(p))

    def route(self, clause: str) -> Unit | None:
        """The :class:`Unit` of one clause, or None when no rule matches."""
        low = clause.lower()
        for scale, kws in self.rules:
            hits = [low.find(k) for k in kws if k in low]
            if hits:
                neg = self._neg.search(low)
                return Unit(clause, scale, bool(neg and neg.start() < min(hits)))
        return None


def split_clauses(report: str) -> list[str]:
    """Sentences, then clauses at ``;`` and long-headed ``:``; whitespace normalised, empty pieces dropped."""
    text = " ".join(report.split())
    out = []
    for sentence in _SENTENCE.split(text):
        for piece in _CLAUSE.split(sentence):
            parts = _COLON.split(piece, maxsplit=1)
            if len(parts) == 2 and len(parts[0].split()) < MIN_COLON_HEAD:
                parts = [piece]
            for c in parts:
                c = c.strip()
                if len(c) > 1 and any(ch.isalpha() for ch in c):
                    out.append(c)
    return out


def route_report(report: str, rules: UnitRules, cap: int = 32) -> dict[str, list[Unit]]:
    """The report's clauses by scale (each scale de-duplicated, at most ``cap``), unmatched clauses dropped."""
    out: dict[str, list[Unit]] = {s: [] for s in UNIT_SCALES}
    for clause in split_clauses(report):
        u = rules.route(clause)
        if u is not None and len(out[u.scale]) < cap and all(x.text != u.text for x in out[u.scale]):
            out[u.scale].append(u)
    return out

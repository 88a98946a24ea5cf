"""Report clauses routed to scales (hwsi.train.units) and the v2 banks built from them (hwsi.train.alignment)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from hwsi.errors import ConfigError
from hwsi.synth.text import SYNTHPATH_UNIT_RULES, slide_text
from hwsi.synth.classes import all_classes
from hwsi.train.alignment import BankBuilder, parse_same_fact
from hwsi.train.units import UnitRules, route_report, split_clauses


def test_clauses_keep_negation_and_short_colon_heads() -> None:
    text = ("Diagnosis: adenocarcinoma, low grade.  Significant nuclear atypia is present: nuclei vary in size. "
            "There is no significant nuclear atypia; nuclei are regular.")
    assert split_clauses(text) == ["Diagnosis: adenocarcinoma, low grade.", "Significant nuclear atypia is present",
                                   "nuclei vary in size.", "There is no significant nuclear atypia",
                                   "nuclei are regular."]


@pytest.mark.parametrize("clause, scale, absence", [
    ("Cytologically the epithelial nuclei are bland, without pleomorphism.", "cells", False),
    ("There is no significant nuclear atypia", "cells", True),
    ("High-grade nuclear features are seen", "cells", False),
    ("The glands are crowded and arranged back to back", "regions", False),
    ("No glands are formed", "patches", True),
    ("The lesional epithelium grows in solid sheets without gland formation", "patches", False),
    ("The lesion is focal, confined to a single region of the section.", "slide", False),
    ("The findings are consistent with benign glandular tissue.", "slide", False),
])
def test_default_rules_route_by_the_papers_level_vocabulary(clause: str, scale: str, absence: bool) -> None:
    u = UnitRules.load().route(clause)
    assert u is not None and (u.scale, u.absence) == (scale, absence)


@pytest.mark.parametrize("rules_source", ["default", "synthpath"])
def test_rules_route_every_synthpath_fact_to_its_scale(tmp_path: Path, rules_source: str) -> None:
    """Both the general default and SynthPath's own keyword file send each fact's clauses to the owning scale."""
    if rules_source == "synthpath":
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(SYNTHPATH_UNIT_RULES))
        rules = UnitRules.load(tmp_path / "r.yaml")
    else:
        rules = UnitRules.load()
    from hwsi.synth import text as T

    owner = {"cells": T._ATYPIA, "regions": T._ARCH}
    for scale, groups in owner.items():
        for sentences in groups.values():
            for s in sentences:
                for c in split_clauses(s):
                    u = rules.route(c)
                    assert u is not None and u.scale == scale, (c, u)
    for sentences in T._GLANDS.values():
        routed = [rules.route(c) for s in sentences for c in split_clauses(s)]
        assert all(u is not None and u.scale in ("patches", "regions") for u in routed), routed
    for cls in all_classes():
        units = route_report(slide_text("x", cls.facts() | {"n_tissue_regions": 4, "n_lesion_regions": 2,
                                                                "involved_fraction": 0.5}, 0).report, rules)
        assert units["cells"] and units["slide"], (cls, units)


def test_rules_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [{scale: nuclei, keywords: [x]}]\n")
    with pytest.raises(ConfigError, match="bad.yaml.*nuclei"):
        UnitRules.load(bad)
    bad.write_text("negations: [no]\n")
    with pytest.raises(ConfigError, match="bad.yaml.*rules"):
        UnitRules.load(bad)


def test_bank_positives_and_same_fact_masking() -> None:
    rules = UnitRules.load()
    reports = {"a": "There is no significant nuclear atypia. The findings are consistent with benign tissue.",
               "b": "The nuclei are small, uniform and oval. The findings are consistent with benign tissue.",
               "c": "The nuclei show marked atypia. The findings are consistent with dysplasia."}
    facts = {"a": {"atypia": "no", "diagnosis": "benign"}, "b": {"atypia": "no", "diagnosis": "benign"},
             "c": {"atypia": "yes", "diagnosis": "dysplasia"}}
    units = {s: route_report(r, rules) for s, r in reports.items()}
    bb = BankBuilder(units, reports, facts, parse_same_fact(["cells=atypia", "report=diagnosis"]), ("cells", "slide"))
    emb = torch.randn(len(bb.strings), 8)
    t = bb(["a", "c"], emb)
    cells = t.banks["cells"]
    texts = bb.banks["cells"].texts
    assert cells.emb.shape == (3, 8) and bool(cells.absence[texts.index("There is no significant nuclear atypia.")])
    # a's own unit is its positive; b's paraphrase of the same fact is masked; c's atypia unit stays a negative
    row = dict(zip(texts, zip(cells.positive[0].tolist(), cells.allowed[0].tolist())))
    assert row["There is no significant nuclear atypia."] == (True, True)
    assert row["The nuclei are small, uniform and oval."][1] is False
    assert row["The nuclei show marked atypia."] == (False, True)
    rep = t.banks["report"]
    assert rep.positive.sum().item() == 2 and not bool(rep.allowed[0, bb.banks["report"].texts.index(reports["b"])])
    with pytest.raises(ConfigError, match="same_fact"):
        parse_same_fact(["nuclei=atypia"])

"""The fixed SPF vocabulary (docs/design.md §5) and report-entity extraction (paper Eq. 2 variant)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hwsi.errors import ConfigError
from hwsi.features.vocab import (
    DEFAULT_VOCABULARY,
    entities_from_report,
    load_vocabulary,
    vocabulary_fingerprint,
)


def test_default_vocabulary() -> None:
    v = load_vocabulary(None)
    assert v is DEFAULT_VOCABULARY
    assert 30 <= len(v) <= 60
    assert len({t.lower() for t in v}) == len(v)
    for term in ("nuclear atypia", "gland formation", "cribriform architecture", "stroma", "necrosis"):
        assert term in v


def test_load_text_and_yaml(tmp_path: Path) -> None:
    txt = tmp_path / "v.txt"
    txt.write_text("# my terms\nstroma\n\n  necrosis   # dead tissue\nStroma\nmitotic   figures\n")
    assert load_vocabulary(txt) == ("stroma", "necrosis", "mitotic figures")
    y1 = tmp_path / "v.yaml"
    y1.write_text("- a b\n- c\n")
    assert load_vocabulary(y1) == ("a b", "c")
    y2 = tmp_path / "v2.yml"
    y2.write_text("terms: [x, y]\n")
    assert load_vocabulary(y2) == ("x", "y")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_vocabulary(tmp_path / "missing.txt")
    empty = tmp_path / "e.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match=r"e\.txt: the vocabulary is empty"):
        load_vocabulary(empty)
    bad = tmp_path / "b.yaml"
    bad.write_text("other: 1\n")
    with pytest.raises(ConfigError, match="terms"):
        load_vocabulary(bad)
    nums = tmp_path / "n.yaml"
    nums.write_text("- 3\n")
    with pytest.raises(ConfigError, match="strings"):
        load_vocabulary(nums)


def test_fingerprint() -> None:
    a = vocabulary_fingerprint(["stroma", "necrosis"])
    assert a == vocabulary_fingerprint(["Necrosis", "stroma"])
    assert a != vocabulary_fingerprint(["stroma", "necrosis", "mucin"])
    assert len(a) == 16


def test_entities_from_report() -> None:
    r = "Sections show invasive carcinoma with cribriform architecture and necrosis. Mitotic figures: 12 per 10 HPF."
    ents = entities_from_report(r)
    assert ents[:3] == ["invasive carcinoma", "cribriform architecture", "necrosis"]
    assert "mitotic figures" in ents
    assert all("12" not in e.split() for e in ents)
    assert entities_from_report("stroma. Stroma; STROMA") == ["stroma"]
    long = entities_from_report("moderately differentiated tubular adenocarcinoma colon tissue")
    assert long == ["moderately differentiated tubular adenocarcinoma", "colon tissue"]
    assert entities_from_report("") == []
    with pytest.raises(ConfigError):
        entities_from_report("x", max_words=0)

"""The one table of nucleus type codes: stable codes, every source's names, derived classes, unknown names."""

from __future__ import annotations

import pytest

from hwsi.cells.nucleus_types import (
    ALL_TYPE_NAMES,
    NUCLEUS_TYPES,
    PANNUKE_IDS,
    TYPE_NAMES,
    UNKNOWN_CODE,
    map_type_names,
    match_type_name,
)


def test_codes_are_stable_and_contiguous() -> None:
    assert [t.code for t in NUCLEUS_TYPES] == list(range(len(NUCLEUS_TYPES)))
    assert TYPE_NAMES == {0: "unknown", 1: "small_round", 2: "large_atypical", 3: "elongated"}  # built-in segmenter
    assert {c: ALL_TYPE_NAMES[c] for c in (4, 5, 6, 7, 8)} == {
        4: "neoplastic", 5: "inflammatory", 6: "connective", 7: "dead", 8: "epithelial"}
    assert UNKNOWN_CODE == 0
    aliases = [a for t in NUCLEUS_TYPES for a in (t.name, *t.aliases)]
    assert len(aliases) == len({a.lower() for a in aliases}), "a name maps to two codes"


@pytest.mark.parametrize(("name", "code"), [
    # CellViT PanNuke (ids 1-5 in its files), CellViT++ classifier label maps, QuPath's standard classes
    *[(n, c) for n, c in zip(PANNUKE_IDS.values(), (0, 4, 5, 6, 7, 8))],
    ("Connective tissue", 6), ("Spindle-Shaped", 6), ("Epithelial Cells", 8), ("Stromal Cells", 6), ("TILs", 5),
    ("Tumor Cell", 4), ("Other Cell", 0), ("Lymphocyte", 9), ("Plasma", 10), ("Neutrophil", 11),
    ("Eosinophil", 12), ("Mitotic", 13), ("Non-Mitotic", 14),
    ("Tumor", 4), ("Stroma", 6), ("Immune cells", 5), ("Necrosis", 7), ("Other", 0),
    ("  NEOPLASTIC ", 4), ("non_mitotic", 14), (None, 0), ("", 0),
])
def test_source_names(name: str | None, code: int) -> None:
    assert match_type_name(name).code == code


def test_derived_and_unknown_names_are_reported() -> None:
    m = map_type_names(["Tumor: Positive", "Tumor", "single_cells_demo", "Tumor", None, "Ignore*"])
    assert m.codes == {"Tumor: Positive": 4, "Tumor": 4, "single_cells_demo": 0, "": 0, "Ignore*": 0}
    assert m.by_base_class == ("Tumor: Positive",)
    assert m.unknown == ("single_cells_demo", "Ignore*")
    assert m.summary() == ("Tumor: Positive→neoplastic (by its base class), Tumor→neoplastic, "
                           "single_cells_demo→unknown (not in the table), (unclassified)→unknown, "
                           "Ignore*→unknown (not in the table)")

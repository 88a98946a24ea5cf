"""Nucleus types: ONE table of type codes for every source (docs/formats-cells.md "Type codes"), and the built-in
segmenter's rule-based classifier (:class:`TypeRules`, :func:`classify_types`).

Every cells backend writes the codes of :data:`NUCLEUS_TYPES` into the ``type`` column: the built-in segmenter its
rule types 0–3, an ingested CellViT or QuPath file the codes its class names map to through :func:`map_type_names`
(CellViT's PanNuke ids 1–5 are NOT kept: "Neoplastic" is code 4 whatever id the file gave it). Code 0 is
"other/unknown": CellViT's Background and "Other" classes, unclassified objects, and every name the table does not
know (those are reported, never silently renumbered). Names are matched case-, space-, ``_``- and ``-``-insensitively;
a QuPath derived class ("Tumor: Positive") that the table does not know is mapped by its base class ("Tumor").

:func:`hwsi.cells.morphology.measure_nuclei` calls :func:`classify_types` on the measured shapes; the type and its
membership become the ``type``/``type_prob`` columns of the per-nucleus table and the one-hot tail of c_ijk.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class NucleusType:
    """One row of the type table: its code, name, display colour (RGB) and the source names that map to it."""

    code: int
    name: str
    colour: tuple[int, int, int]
    aliases: tuple[str, ...] = ()  # source names (any case / separators) that mean this type


UNKNOWN_CODE = 0
# codes are stable (they are written into stores); colours of the PanNuke types are CellViT's own
NUCLEUS_TYPES: tuple[NucleusType, ...] = (
    NucleusType(0, "unknown", (150, 150, 150),
                ("other", "other cell", "other cells", "background", "unclassified", "cell", "nuclei", "nucleus")),
    NucleusType(1, "small_round", (40, 90, 230)),  # built-in rule types 1-3
    NucleusType(2, "large_atypical", (230, 40, 40)),
    NucleusType(3, "elongated", (30, 170, 60)),
    NucleusType(4, "neoplastic", (255, 0, 0), ("tumor", "tumour", "tumor cell", "tumor cells", "tumour cell")),
    NucleusType(5, "inflammatory", (34, 221, 77), ("immune cells", "immune cell", "tils", "til")),
    NucleusType(6, "connective", (35, 92, 236),
                ("connective tissue", "stroma", "stromal", "stromal cells", "spindle shaped")),
    NucleusType(7, "dead", (254, 255, 0), ("necrosis", "necrotic")),
    NucleusType(8, "epithelial", (255, 159, 68), ("epithelial cells", "epithelium")),
    NucleusType(9, "lymphocyte", (80, 56, 112), ("lymphocytes",)),
    NucleusType(10, "plasma", (87, 112, 56), ("plasma cell", "plasma cells")),
    NucleusType(11, "neutrophil", (110, 0, 0), ("neutrophils",)),
    NucleusType(12, "eosinophil", (255, 196, 196), ("eosinophils",)),
    NucleusType(13, "mitotic", (214, 255, 196), ("mitosis", "mitotic figure")),
    NucleusType(14, "non_mitotic", (120, 80, 40)),
)
ALL_TYPE_NAMES: dict[int, str] = {t.code: t.name for t in NUCLEUS_TYPES}
BUILTIN_CODES = (0, 1, 2, 3)
# the codes the built-in segmenter writes (what its stores and tables record as type_names)
TYPE_NAMES: dict[int, str] = {c: ALL_TYPE_NAMES[c] for c in BUILTIN_CODES}
TYPE_COLOURS: dict[str, tuple[int, int, int]] = {t.name: t.colour for t in NUCLEUS_TYPES}
# CellViT's PanNuke ids (its default taxonomy), used when a cells.json carries no type_map
PANNUKE_IDS: dict[int, str] = {0: "Background", 1: "Neoplastic", 2: "Inflammatory", 3: "Connective", 4: "Dead",
                               5: "Epithelial"}


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


_BY_NAME: dict[str, int] = {}
for _t in NUCLEUS_TYPES:
    for _n in (_t.name, *_t.aliases):
        _BY_NAME[_norm(_n)] = _t.code

Match = Literal["table", "base_class", "unknown"]


@dataclass(frozen=True)
class NameMatch:
    """How one source class name maps into the table: its code and whether by name, by base class, or unknown."""

    code: int
    how: Match


def match_type_name(name: str | None) -> NameMatch:
    """Code of one source class name (None = unclassified → 0). A derived QuPath class ``"A: B"`` the table does not
    know is mapped by its base class ``A``; a name neither way known is ``unknown`` (code 0)."""
    if name is None or not _norm(name):
        return NameMatch(UNKNOWN_CODE, "table")
    code = _BY_NAME.get(_norm(name))
    if code is not None:
        return NameMatch(code, "table")
    if ":" in name:
        base = _BY_NAME.get(_norm(name.split(":", 1)[0]))
        if base is not None:
            return NameMatch(base, "base_class")
    return NameMatch(UNKNOWN_CODE, "unknown")


@dataclass(frozen=True)
class TypeMapping:
    """Source class names → table codes, with the names mapped by their base class and those the table lacks."""

    codes: dict[str, int]
    by_base_class: tuple[str, ...]
    unknown: tuple[str, ...]

    def summary(self) -> str:
        """One line: ``"Neoplastic→neoplastic, X→unknown (not in the table)"``."""
        parts = []
        for src, code in self.codes.items():
            note = " (not in the table)" if src in self.unknown else " (by its base class)" \
                if src in self.by_base_class else ""
            parts.append(f"{src or '(unclassified)'}→{ALL_TYPE_NAMES[code]}{note}")
        return ", ".join(parts)


def map_type_names(names: Iterable[str | None]) -> TypeMapping:
    """Map source class names (CellViT type_map values, GeoJSON/QuPath classifications) into the table."""
    codes: dict[str, int] = {}
    base: list[str] = []
    unknown: list[str] = []
    for n in names:
        key = "" if n is None else str(n)
        if key in codes:
            continue
        m = match_type_name(n)
        codes[key] = m.code
        if m.how == "base_class":
            base.append(key)
        elif m.how == "unknown":
            unknown.append(key)
    return TypeMapping(codes, tuple(base), tuple(unknown))


@dataclass
class TypeRules:
    """Rule-based nucleus types. 0 unknown, 1 small round (lymphocyte-like), 2 large/atypical, 3 elongated (stromal).

    Each rule is a product of logistic memberships (softness ``*_soft``) so that ``type_prob`` says how clearly the
    nucleus satisfies its rule; the unknown class takes the remainder.
    """

    small_area_um2: float = 40.0  # type 1: area below this ...
    small_max_ecc: float = 0.8  # ... and eccentricity below this
    large_area_um2: float = 70.0  # type 2: area above this, or
    irregular_solidity: float = 0.82  # solidity below this with area above small_area_um2
    elongated_aspect: float = 2.3  # type 3: major/minor axis ratio above this
    area_soft: float = 0.15  # softness of area rules, in log-area units
    ratio_soft: float = 0.15  # softness of ratio / eccentricity / solidity rules


def classify_types(
    area: np.ndarray, ecc: np.ndarray, solidity: np.ndarray, aspect: np.ndarray, rules: TypeRules
) -> tuple[np.ndarray, np.ndarray]:
    """Type of each nucleus and its membership ``type_prob`` from area (µm²), eccentricity, solidity and the
    major/minor axis ratio: per rule a product of logistic memberships, the unknown class taking the remainder."""
    def sig(z: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))

    la = np.log(np.maximum(area, 1e-6))
    small = sig((math.log(rules.small_area_um2) - la) / rules.area_soft) * sig(
        (rules.small_max_ecc - ecc) / (rules.ratio_soft / 2)
    )
    large_by_size = sig((la - math.log(rules.large_area_um2)) / rules.area_soft)
    irregular = sig((rules.irregular_solidity - solidity) / (rules.ratio_soft / 3)) * sig(
        (la - math.log(rules.small_area_um2)) / rules.area_soft
    )
    large = np.maximum(large_by_size, irregular)
    elong = sig((np.log(aspect) - math.log(rules.elongated_aspect)) / rules.ratio_soft)
    scores = np.stack([np.zeros_like(area), small, large, elong], axis=1)
    best = scores[:, 1:].max(axis=1)
    scores[:, 0] = 1.0 - best
    t = scores.argmax(axis=1)
    prob = scores[np.arange(len(t)), t]
    return t.astype(np.int8), prob.astype(np.float32)

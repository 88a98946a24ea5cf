"""SynthPath vocabulary: diagnoses, the facts they imply, and which scale owns each fact.

Scale that owns each fact (the evidence of a fact lives ONLY at its scale; see ``docs/synthpath.md``):

=============  ===========================  ==============================================================
fact           scale                        evidence
=============  ===========================  ==============================================================
atypia         cell (full resolution)       pleomorphic nuclei: same count, same mean area and mean
                                            haematoxylin as normal nuclei, but wider size spread, irregular
                                            contours, coarse clumped chromatin, nucleoli (averages out when
                                            a 256 px patch is area-downsampled 4×)
glands         patch                        a patch shows a gland (ring of nuclei round a pale lumen) or a
                                            solid sheet of epithelial cells
architecture   region                       ARRANGEMENT of gland patches across the region's patch grid:
                                            regularly spaced (checkerboard-like) vs crowded back-to-back
                                            clusters; the patches and their proportions are identical
extent         slide                        number of lesional regions: focal (1) vs extensive (>= half
                                            of the tissue regions); each lesional region looks the same
=============  ===========================  ==============================================================

Diagnoses (``DIAGNOSES``) combine these facts so that no single scale suffices:

* ``benign`` — regular glands, normal nuclei, no lesion.
* ``dysplasia`` — regular glands, atypical nuclei (vs benign: cell scale only).
* ``adenocarcinoma_low_grade`` — crowded back-to-back glands, normal nuclei (vs benign: region scale only).
* ``adenocarcinoma_high_grade`` — crowded glands, atypical nuclei (vs low grade: cell scale only).
* ``solid_carcinoma`` — crowded solid sheets without glands, atypical nuclei (vs high grade: patch scale only).

Every non-benign diagnosis comes as ``focal`` or ``extensive`` (slide scale).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from hwsi.errors import HwsiError


class SynthError(HwsiError):
    """Bad SynthPath input (unknown class, slide too small for its classes, bad sizes)."""


DIAGNOSES: tuple[str, ...] = (
    "benign",
    "dysplasia",
    "adenocarcinoma_low_grade",
    "adenocarcinoma_high_grade",
    "solid_carcinoma",
)
EXTENTS: tuple[str, ...] = ("none", "focal", "extensive")

# patch patterns (per-patch ground truth); codes are the stored int8 values
PATTERNS: tuple[str, ...] = ("background", "stroma", "gland", "solid")
BACKGROUND, STROMA, GLAND, SOLID = range(4)

# region architectures (per-region ground truth)
ARCHITECTURES: tuple[str, ...] = ("background", "regular", "crowded", "solid")
ARCH_BACKGROUND, ARCH_REGULAR, ARCH_CROWDED, ARCH_SOLID = range(4)

# nucleus types (per-cell ground truth)
CELL_TYPES: tuple[str, ...] = ("stromal", "lymphocyte", "epithelial", "epithelial_atypical")
CELL_STROMAL, CELL_LYMPHOCYTE, CELL_EPITHELIAL, CELL_ATYPICAL = range(4)

# which scale owns which fact (for docs, tests and evaluation)
FACT_SCALE: dict[str, str] = {
    "atypia": "cell",
    "glands": "patch",
    "architecture": "region",
    "extent": "slide",
}

# lesion definition of each diagnosis: (architecture of lesional regions, atypia in lesional regions)
_LESION: dict[str, tuple[int, bool]] = {
    "benign": (ARCH_REGULAR, False),
    "dysplasia": (ARCH_REGULAR, True),
    "adenocarcinoma_low_grade": (ARCH_CROWDED, False),
    "adenocarcinoma_high_grade": (ARCH_CROWDED, True),
    "solid_carcinoma": (ARCH_SOLID, True),
}

_GRADE: dict[str, str] = {
    "benign": "not applicable",
    "dysplasia": "high-grade dysplasia",
    "adenocarcinoma_low_grade": "low grade",
    "adenocarcinoma_high_grade": "high grade",
    "solid_carcinoma": "high grade",
}

DISPLAY: dict[str, str] = {
    "benign": "benign glandular tissue",
    "dysplasia": "high-grade glandular dysplasia",
    "adenocarcinoma_low_grade": "adenocarcinoma, low grade",
    "adenocarcinoma_high_grade": "adenocarcinoma, high grade",
    "solid_carcinoma": "solid carcinoma",
}


@dataclass(frozen=True)
class SlideClasses:
    """The slide-level classes of one SynthPath slide: a diagnosis and, unless benign, an extent."""

    diagnosis: str = "benign"
    extent: str = "none"

    def __post_init__(self) -> None:
        if self.diagnosis not in DIAGNOSES:
            raise SynthError(f"unknown diagnosis {self.diagnosis!r}; choose one of {list(DIAGNOSES)}")
        if self.extent not in EXTENTS:
            raise SynthError(f"unknown extent {self.extent!r}; choose one of {list(EXTENTS)}")
        if (self.diagnosis == "benign") != (self.extent == "none"):
            raise SynthError(
                f"extent {self.extent!r} does not fit diagnosis {self.diagnosis!r}: "
                "benign slides have extent 'none', lesional slides 'focal' or 'extensive'"
            )

    @property
    def label(self) -> str:
        """One string naming the class, e.g. ``adenocarcinoma_high_grade:extensive``."""
        return self.diagnosis if self.diagnosis == "benign" else f"{self.diagnosis}:{self.extent}"

    @property
    def lesion_architecture(self) -> int:
        return _LESION[self.diagnosis][0]

    @property
    def atypia(self) -> bool:
        return _LESION[self.diagnosis][1]

    @property
    def grade(self) -> str:
        return _GRADE[self.diagnosis]

    @property
    def glands(self) -> bool:
        """Whether the lesion (or, if benign, the tissue) forms glands."""
        return self.lesion_architecture != ARCH_SOLID

    def facts(self) -> dict[str, Any]:
        """Structured slide facts (what evaluation parses and compares)."""
        return {
            "diagnosis": self.diagnosis,
            "diagnosis_text": DISPLAY[self.diagnosis],
            "grade": self.grade,
            "extent": self.extent,
            "glands": "yes" if self.glands else "no",
            "architecture": ARCHITECTURES[self.lesion_architecture],
            "atypia": "yes" if self.atypia else "no",
        }

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def parse_classes(text: str) -> SlideClasses:
    """Parse ``"diagnosis[:extent]"`` or ``"diagnosis,extent"`` (extent defaults to focal for lesions)."""
    parts = [p.strip() for p in text.replace(",", ":").split(":") if p.strip()]
    if not parts or len(parts) > 2:
        raise SynthError(f"cannot parse classes {text!r}; expected 'diagnosis[:extent]', e.g. 'dysplasia:focal'")
    diagnosis = parts[0]
    extent = parts[1] if len(parts) == 2 else ("none" if diagnosis == "benign" else "focal")
    return SlideClasses(diagnosis, extent)


def all_classes() -> list[SlideClasses]:
    """Every valid (diagnosis, extent) combination, benign first (9 classes)."""
    out = [SlideClasses("benign", "none")]
    for d in DIAGNOSES[1:]:
        for e in ("focal", "extensive"):
            out.append(SlideClasses(d, e))
    return out

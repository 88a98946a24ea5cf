"""Rule-based nucleus types: the rules (:class:`TypeRules`), their names (:data:`TYPE_NAMES`) and the classifier.

:func:`hwsi.cells.morphology.measure_nuclei` calls :func:`classify_types` on the measured shapes; the type and its
membership become the ``type``/``type_prob`` columns of the per-nucleus table and the one-hot tail of c_ijk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


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


TYPE_NAMES: dict[int, str] = {0: "unknown", 1: "small_round", 2: "large_atypical", 3: "elongated"}


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

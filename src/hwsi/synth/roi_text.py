"""Questions about one region of a SynthPath slide, for the train split (docs/roi.md "Training records").

A model trained on whole-slide records only answers a question about a region from the slide token: asked about a
benign quadrant of a slide with solid growth or atypia elsewhere, it says "solid" / "yes" (docs/roi.md: both ROIs
right on 12 of 44 held-out focal slides). :func:`region_records` gives each TRAIN slide whose tissue regions differ
(at least one lesional and one benign) the closed architecture and atypia questions of every tissue region, with
that region's truth (``regions/architecture``, ``regions/atypia`` of the truth sidecar) and the region's box as the
record's ``roi`` ([x, y, w, h], level-0 px: the key hwsi's LLaVA reader takes, hwsi.data.llava). The wording is
drawn from every phrasing of the two questions, the options in random order. Held-out records are unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hwsi.synth.classes import ARCH_BACKGROUND, ARCHITECTURES
from hwsi.synth.text import question_stems
from hwsi.synth.truth import Truth

MIN_TISSUE = 0.3  # a region with less tissue is not asked about (tests/test_ask_roi.py uses the same threshold)


def _closed(stem: str, options: list[str], truth: str, rng: np.random.Generator) -> tuple[str, str]:
    opts = [options[i] for i in rng.permutation(len(options))]
    letter = "ABCD"[opts.index(truth)]
    return stem + "\n" + "\n".join(f"{lt}) {o}" for lt, o in zip("ABCD", opts)), f"{letter}) {truth}"


def region_records(slide_id: str, truth: Truth, seed: int) -> list[dict[str, Any]]:
    """LLaVA-style train records (``id, image, roi, conversations``) about single regions (module docstring); none
    when the slide's tissue regions all have the same lesion status."""
    d = truth.data
    tissue = np.asarray(d["regions/tissue"], np.float64) > MIN_TISSUE
    lesion = np.asarray(d["regions/lesion"], bool)
    if not (lesion & tissue).any() or not (~lesion & tissue).any():
        return []
    side = int(truth.attrs["region_size"])
    rng = np.random.default_rng([seed, 5151] + [ord(c) for c in slide_id])
    arch_names = [a for a in ARCHITECTURES if a != ARCHITECTURES[ARCH_BACKGROUND]]
    recs: list[dict[str, Any]] = []
    for i in np.flatnonzero(tissue):
        x, y = (int(v) for v in d["regions/coords"][i])
        arch = int(d["regions/architecture"][i])
        pairs = []
        if arch != ARCH_BACKGROUND:
            stems = question_stems("architecture")
            pairs.append(_closed(stems[int(rng.integers(len(stems)))], arch_names, ARCHITECTURES[arch], rng))
        stems = question_stems("atypia")
        pairs.append(_closed(stems[int(rng.integers(len(stems)))], ["yes", "no"],
                             "yes" if bool(d["regions/atypia"][i]) else "no", rng))
        for q, a in pairs:
            recs.append({"id": f"{slide_id}_roi{len(recs)}", "image": slide_id, "roi": [x, y, side, side],
                         "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
    return recs

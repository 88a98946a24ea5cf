"""Held-out questions about one region: the scores of a trained run on questions only an ROI prefix can answer.

Every whole-slide SynthPath question can be answered from the slide token (docs/design.md §8), so Table 1's closed
VQA cannot show what the region tokens add. A question about ONE region of a slide whose regions differ can: the
slide token says "crowded" for the whole slide, the benign quadrant is "regular". :func:`roi_questions` builds,
for every held-out (val + test) slide with lesional and benign tissue regions, the same closed architecture and
atypia questions per tissue region that the train split gets as ROI records (:func:`hwsi.synth.roi_text
.region_records`, the region's truth, its box as the ROI); :func:`score_roi` answers each from the ROI's visual
prefix (:func:`hwsi.model.roi.roi_slide_inputs`, as ``hwsi ask --roi``) and scores it with the closed-choice
parser. ``roi_correct`` (question id -> 0/1) feeds the same paired comparisons as the whole-slide questions
(hwsi.demo.ablate_tables).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwsi.data.choices import parse_options_from_question
from hwsi.eval.vqa import parse_choice
from hwsi.model.chat import ChatSession
from hwsi.model.roi import roi_slide_inputs
from hwsi.slide.roi_geometry import parse_rect
from hwsi.synth.roi_text import region_records
from hwsi.synth.truth import read_truth
from hwsi.train.inference import run_config


@dataclass(frozen=True)
class RoiQuestion:
    """One closed question about one region of a held-out slide."""

    question_id: str
    slide_id: str
    roi: tuple[int, int, int, int]  # x, y, w, h level-0 px
    question: str  # with its lettered options
    options: list[str]
    answer: int  # index of the true option
    kind: str  # "architecture" | "atypia"


def roi_questions(cohort: Path, splits: tuple[str, ...] = ("val", "test")) -> list[RoiQuestion]:
    """The region questions of the held-out slides (module docstring), in cohort order."""
    meta = json.loads((cohort / "cohort.json").read_text())
    out: list[RoiQuestion] = []
    for s in meta["slides"]:
        if s["split"] not in splits:
            continue
        for rec in region_records(s["slide_id"], read_truth(cohort / s["truth"]), int(meta["seed"])):
            q = rec["conversations"][0]["value"].removeprefix("<image>\n")
            _, options, _ = parse_options_from_question(q)
            letter = rec["conversations"][1]["value"].split(")", 1)[0].strip()
            kind = "atypia" if sorted(options) == ["no", "yes"] else "architecture"
            out.append(RoiQuestion(rec["id"], s["slide_id"], tuple(int(v) for v in rec["roi"]), q, list(options),
                                   ord(letter) - ord("A"), kind))
    return out


def score_roi(model: Any, run: Path, cohort: Path, job: Path, max_new_tokens: int = 8) -> dict[str, Any]:
    """Accuracy of ``model`` (the run in ``run``) on :func:`roi_questions`: overall, by kind, and per question
    (``roi_correct``); chance is the mean of 1/len(options). Deterministic (greedy)."""
    cfg = run_config(run)
    m = cfg.model
    correct: dict[str, int] = {}
    by_kind: dict[str, list[int]] = {}
    chance = []
    key: tuple[str, tuple[int, ...]] | None = None
    session: ChatSession | None = None
    for q in roi_questions(cohort):  # one ROI's questions are consecutive: its prefix is built once
        if (q.slide_id, q.roi) != key:
            key = (q.slide_id, q.roi)
            x = roi_slide_inputs(job / "stores" / f"{q.slide_id}.h5", cfg.data.patch_encoder, cfg.data.region_input,
                                 parse_rect(",".join(str(v) for v in q.roi)), m.max_regions, m.k, m.max_cells)
            session = ChatSession(model, x.inputs, region_token_mask=x.region_token_mask,
                                  max_new_tokens=max_new_tokens)
        answer = session.ask_each([q.question])[0]
        ok = int(parse_choice(answer, q.options) == q.answer)
        correct[q.question_id] = ok
        by_kind.setdefault(q.kind, []).append(ok)
        chance.append(1.0 / len(q.options))
    n = len(correct)
    return {"roi_acc": sum(correct.values()) / n if n else float("nan"), "n_roi": n,
            "roi_chance": sum(chance) / n if n else float("nan"),
            "roi_by_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_kind.items())},
            "roi_correct": correct}

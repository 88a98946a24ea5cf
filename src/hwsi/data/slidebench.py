"""SlideBench-VQA: the reformatted json copy ``{"samples": [{"slide_id", "question", "choices": ["A) ..."],
"answer": "C", "category", "features_path"}]}`` and the released csv with columns :data:`SLIDEBENCH_CSV_COLUMNS`."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from hwsi import textio
from hwsi.data.choices import letter_index, strip_option_letter
from hwsi.data.records import BadRecords, QAItem, RecordError, fail, need, slide_from_ref

SLIDEBENCH_CSV_COLUMNS: tuple[str, ...] = (
    "ID",
    "Slide",
    "Tumor",
    "Broad Category",
    "Narrow Category",
    "Question",
    "A",
    "B",
    "C",
    "D",
    "Answer",
)


def parse_slidebench_json(data: dict[str, Any], path: Path, bad: BadRecords | None = None) -> list[QAItem]:
    """One closed :class:`QAItem` per sample of the reformatted json copy (``answer`` is an option letter);
    ``bad`` decides whether a malformed sample raises (default) or is skipped."""
    bad = bad or BadRecords()
    samples = data["samples"]
    if not isinstance(samples, list):
        raise fail(path, "top level", "'samples' must be a list")
    out: list[QAItem] = []
    per_slide: Counter[str] = Counter()
    for i, obj in enumerate(samples):
        with bad.guard():
            where = f"sample {i}"
            if not isinstance(obj, dict):
                raise fail(path, where, "expected an object")
            slide_raw = need(obj, "slide_id", path, where)
            question = need(obj, "question", path, where)
            choices = need(obj, "choices", path, where, list)
            if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise fail(path, where, "'choices' must be a list of at least two strings")
            options = [strip_option_letter(c) for c in choices]
            ans_letter = need(obj, "answer", path, where)
            idx = letter_index(ans_letter, len(options), path, where)
            category = need(obj, "category", path, where)
            slide_id, ids = slide_from_ref(slide_raw, path, where)
            per_slide[slide_id] += 1
            qid = obj.get("question_id") or obj.get("id") or f"{slide_id}_{per_slide[slide_id] - 1}"
            meta = {k: v for k, v in obj.items() if k not in ("slide_id", "question", "choices", "answer", "category")}
            meta.update({"answer_letter": ans_letter.strip().upper(), "option_kind": "lettered", "record_index": i})
            out.append(
                QAItem(
                    question_id=str(qid),
                    slide_id=slide_id,
                    question=question,
                    answer=options[idx],
                    options=options,
                    category=category,
                    metadata=meta,
                    source="slidebench",
                    answer_index=idx,
                )
            )
    return out


def parse_slidebench_csv(path: Path, bad: BadRecords | None = None) -> list[QAItem]:
    """One closed :class:`QAItem` per row of the released csv; errors name the csv line (``bad``: raise or skip)."""
    bad = bad or BadRecords()
    header, rows = textio.read_csv(path, RecordError)
    missing = [c for c in SLIDEBENCH_CSV_COLUMNS if c not in header]
    if missing:
        raise RecordError(path, f"missing column(s) {missing}; expected {list(SLIDEBENCH_CSV_COLUMNS)}", "line 1")
    out: list[QAItem] = []
    for line_num, row in rows:
        with bad.guard():
            where = f"line {line_num}"
            letters = [c for c in "ABCD" if row.get(c, "")]
            if len(letters) < 2 or letters != list("ABCD"[: len(letters)]):
                raise fail(path, where, "options A, B (C, D) must be filled from A on")
            options = [row[c] for c in letters]
            idx = letter_index(row["Answer"], len(options), path, where)
            if not row["Slide"]:
                raise fail(path, where, "empty 'Slide'")
            slide_id, ids = slide_from_ref(row["Slide"], path, where)
            broad, narrow = row["Broad Category"], row["Narrow Category"]
            category = f"{broad} - {narrow}" if broad and narrow else broad or narrow
            out.append(
                QAItem(
                    question_id=row["ID"] or f"{slide_id}_{line_num}",
                    slide_id=slide_id,
                    question=row["Question"],
                    answer=options[idx],
                    options=options,
                    category=category,
                    metadata={
                        "tumor": row["Tumor"],
                        "broad_category": broad,
                        "narrow_category": narrow,
                        "answer_letter": row["Answer"].strip().upper(),
                        "option_kind": "lettered",
                        "image": row["Slide"],
                    },
                    source="slidebench",
                    answer_index=idx,
                )
            )
    return out

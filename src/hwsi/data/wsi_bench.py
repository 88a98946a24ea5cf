"""WSI-Bench test items: jsonl (or a json list) of ``{"question_id", "image", "question", "T-answer", "metadata"}``.

The options of a closed-ended item are written inside its question; they are read by
:func:`hwsi.data.choices.parse_options_from_question` and the reference answer is resolved to one of them where
its wording tells which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hwsi.data.choices import parse_options_from_question, resolve_answer_index
from hwsi.data.records import BadRecords, QAItem, fail, need, slide_from_ref

#: WSI-Bench test metadata values, as spelled in the released jsonl (three are lower case there).
WSI_BENCH_CATEGORIES: tuple[str, ...] = (
    "Morphology",
    "Feature",
    "Classification",
    "Report",
    "Caption",
    "cellular",
    "tissue",
    "Stage",
    "infiltration",
    "Grade",
    "Subtype",
    "Treatment",
    "Prognosis",
)


def _category_of(meta: Any, path: Path, where: str) -> str:
    if isinstance(meta, str):
        return meta
    if isinstance(meta, dict):
        for key in ("category", "type", "task", "question_type"):
            if isinstance(meta.get(key), str):
                return meta[key]
    raise fail(path, where, f"cannot read a category from metadata {meta!r}")


def parse_wsi_bench_test(items: list[tuple[str, Any]], path: Path, bad: BadRecords | None = None) -> list[QAItem]:
    """One :class:`QAItem` per ``(where, record)``; options read from the question, the answer resolved where it
    can be. ``bad`` decides whether a malformed record raises (default) or is skipped."""
    bad = bad or BadRecords()
    out: list[QAItem] = []
    for where, obj in items:
        with bad.guard():
            if not isinstance(obj, dict):
                raise fail(path, where, "expected an object")
            qid = need(obj, "question_id", path, where, (str, int))
            where = f"{where} (question_id={qid})"
            image = need(obj, "image", path, where, (str, list))
            question = need(obj, "question", path, where)
            answer = need(obj, "T-answer", path, where)
            meta_raw = obj.get("metadata")
            if meta_raw is None:
                raise fail(path, where, "missing field 'metadata'")
            category = _category_of(meta_raw, path, where)
            slide_id, ids = slide_from_ref(image, path, where)
            stem, options, kind = parse_options_from_question(question)
            answer_index = resolve_answer_index(answer, options, kind) if options else None
            meta = {"image": image, "image_refs": ids, "option_kind": kind, "raw_metadata": meta_raw}
            if kind == "lettered":
                meta["question_stem"] = stem
            out.append(
                QAItem(
                    question_id=str(qid),
                    slide_id=slide_id,
                    question=question,
                    answer=answer,
                    options=options,
                    category=category,
                    metadata=meta,
                    source="wsi-bench",
                    answer_index=answer_index,
                )
            )
    return out

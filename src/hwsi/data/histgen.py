"""HistGen reports: ``{"train": [{"id", "report", "image_path": [...], "split"}], "val": [...], "test": [...]}``;
each report becomes a :class:`~hwsi.data.records.QAItem` answering :data:`HISTGEN_REPORT_PROMPT`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hwsi.data.records import BadRecords, QAItem, RecordError, fail, need, slide_from_ref

#: Instruction used for HistGen records, which hold only a report (no question).
HISTGEN_REPORT_PROMPT = "Write the pathology report for this whole slide image."


def parse_histgen(data: dict[str, Any], path: Path, split: str | None, bad: BadRecords | None = None) -> list[QAItem]:
    """One report item per record of ``split`` (default: every split, in file order); ``bad``: raise or skip a
    malformed record."""
    bad = bad or BadRecords()
    out: list[QAItem] = []
    splits = [s for s in data if isinstance(data[s], list)]
    if split is not None:
        if split not in data:
            raise RecordError(path, f"no split {split!r}; splits present: {splits}")
        splits = [split]
    for sp in splits:
        for i, obj in enumerate(data[sp]):
            with bad.guard():
                where = f"{sp}[{i}]"
                if not isinstance(obj, dict):
                    raise fail(path, where, "expected an object")
                rid = need(obj, "id", path, where, (str, int))
                where = f"{sp}[{i}] (id={rid})"
                report = need(obj, "report", path, where)
                image = obj.get("image_path") or str(rid)
                slide_id, ids = slide_from_ref(image, path, where)
                out.append(
                    QAItem(
                        question_id=str(rid),
                        slide_id=slide_id,
                        question=HISTGEN_REPORT_PROMPT,
                        answer=report,
                        options=None,
                        category="Report",
                        metadata={"split": obj.get("split", sp), "image": image, "image_refs": ids,
                                  "question_is_default": True},
                        source="histgen",
                    )
                )
    return out

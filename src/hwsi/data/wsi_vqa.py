"""WSI-VQA: a json list of ``{"Id": "<TCGA patient>", "Question", "Choice": [...] (closed only), "Answer"}``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hwsi.data.records import BadRecords, QAItem, fail, need, slide_from_ref

def parse_wsi_vqa(items: list[Any], path: Path, bad: BadRecords | None = None) -> list[QAItem]:
    """One :class:`QAItem` per record; closed when it has ``Choice`` (the answer's index found by text);
    ``bad`` decides whether a malformed record raises (default) or is skipped."""
    bad = bad or BadRecords()
    out: list[QAItem] = []
    for i, obj in enumerate(items):
        with bad.guard():
            where = f"record {i}"
            if not isinstance(obj, dict):
                raise fail(path, where, "expected an object")
            sid_raw = need(obj, "Id", path, where)
            question = need(obj, "Question", path, where)
            answer = need(obj, "Answer", path, where, (str, int, float))
            answer = str(answer)
            options: list[str] | None = None
            idx: int | None = None
            if obj.get("Choice"):
                choice = obj["Choice"]
                if not isinstance(choice, list) or not all(isinstance(c, str) for c in choice):
                    raise fail(path, where, "'Choice' must be a list of strings")
                options = list(choice)
                idx = options.index(answer) if answer in options else None
                if idx is None:
                    norm = [o.strip().lower() for o in options]
                    idx = norm.index(answer.strip().lower()) if answer.strip().lower() in norm else None
            slide_id, ids = slide_from_ref(sid_raw, path, where)
            out.append(
                QAItem(
                    question_id=f"{slide_id}_{i}",
                    slide_id=slide_id,
                    question=question,
                    answer=answer,
                    options=options,
                    category="closed" if options else "open",
                    metadata={"record_index": i, "id_level": "patient" if len(slide_id) == 12 else "slide"},
                    source="wsi-vqa",
                    answer_index=idx,
                )
            )
    return out

"""LLaVA-style conversation json: ``wsi-bench-train`` (``"image": "<dir>/<slide>.pt"``) and ``slidechat``
(``"image": ["<slide>.csv", ...]``), a list of ``{"id", "image", "conversations": [{"from", "value"}, ...]}``.
hwsi's one extension: an optional ``"roi": [x, y, w, h]`` (level-0 px) makes the record a question about that
rectangle of the slide (stage 2/3 train it on the ROI's visual tokens, docs/roi.md "Training records").

``wsi-llava-test``: WSI-LLaVA's per-task WSI-Bench test files (``Diagnosis_choice_test.json``, ...) have the same
shape, one human question and one gpt answer per record, the options written inside the question
(``"... ? A) x B) y C) z D) w"``) and the answer a letter (``"C"``); :func:`parse_llava_qa` reads them as
:class:`QAItem` (closed when the question has options, the answer resolved to one of them).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hwsi.data.choices import parse_options_from_question, resolve_answer_index, resolve_lettered_answer
from hwsi.data.records import (
    BadRecords,
    Conversation,
    QAItem,
    Turn,
    fail,
    need,
    parse_roi_field,
    slide_from_ref,
    strip_image_token,
)

_ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def parse_turns(conv: Any, path: Path, where: str) -> list[Turn]:
    """The alternating human/gpt turns of one record's ``conversations`` (``user``/``assistant`` accepted)."""
    if not isinstance(conv, list) or not conv:
        raise fail(path, where, "'conversations' must be a non-empty list")
    turns: list[Turn] = []
    for j, t in enumerate(conv):
        w = f"{where}, turn {j}"
        if not isinstance(t, dict):
            raise fail(path, w, "a turn must be an object with 'from' and 'value'")
        role_raw = need(t, "from", path, w)
        text = need(t, "value", path, w)
        role = _ROLE_ALIASES.get(role_raw.strip().lower())
        if role is None:
            raise fail(path, w, f"unknown role {role_raw!r} (expected human/gpt)")
        expected = "human" if j % 2 == 0 else "gpt"
        if role != expected:
            raise fail(path, w, f"turns must alternate human/gpt starting with human; got {role!r} here")
        turns.append(Turn(role=role, text=text))  # type: ignore[arg-type]
    return turns


def _record_head(obj: Any, i: int, path: Path) -> tuple[str, str, Any, str, list[str]]:
    """``(id, where, image, slide id, all slide ids)`` of record ``i``; a :class:`RecordError` when malformed."""
    where = f"record {i}"
    if not isinstance(obj, dict):
        raise fail(path, where, "expected an object")
    rid = obj.get("id")
    if rid is None:
        raise fail(path, where, "missing field 'id'")
    where = f"record {i} (id={rid})"
    if "image" not in obj:
        raise fail(path, where, "missing field 'image'")
    slide_id, ids = slide_from_ref(obj["image"], path, where)
    return str(rid), where, obj["image"], slide_id, ids


def parse_llava(items: list[Any], path: Path, source: str | None, bad: BadRecords | None = None) -> list[Conversation]:
    """One :class:`Conversation` per record; ``source`` None: ``slidechat`` for a list image reference, else
    ``wsi-bench``. ``bad`` decides whether a malformed record raises (default) or is skipped."""
    bad = bad or BadRecords()
    out: list[Conversation] = []
    for i, obj in enumerate(items):
        with bad.guard():
            rid, where, image, slide_id, ids = _record_head(obj, i, path)
            src = source or ("slidechat" if isinstance(image, list) else "wsi-bench")
            turns = parse_turns(obj.get("conversations"), path, where)
            meta = {k: v for k, v in obj.items() if k not in ("id", "image", "conversations")}
            meta["image"] = image
            meta["image_refs"] = ids
            if "roi" in obj:  # hwsi's extension: the question is about this rectangle of the slide (docs/roi.md)
                meta["roi"] = parse_roi_field(obj["roi"], path, where)
            out.append(Conversation(id=rid, slide_id=slide_id, turns=turns, source=src, metadata=meta))
    return out


def llava_task_category(path: Path) -> str:
    """The task a WSI-LLaVA file's name says: ``1_Report_test.json`` -> ``Report``, ``Diagnosis_choice_test.json``
    -> ``Diagnosis``, ``Staging_test.json`` -> ``Staging``."""
    name = re.sub(r"^\d+_", "", path.stem)
    name = re.sub(r"([_-](choice|test|open|close|closed))+$", "", name, flags=re.I)
    return name or path.stem


def parse_llava_qa(items: list[Any], path: Path, bad: BadRecords | None = None) -> list[QAItem]:
    """One :class:`QAItem` per record of a WSI-LLaVA test file: the human turn (without ``<image>``) is the
    question, the gpt turn the reference. Options written in the question make it closed; its answer must then
    name one of them (a letter, ``"C) text"`` or an option's text), else the record is bad. The item's ``answer``
    is the option text (the letter in ``metadata["answer_letter"]``, the file's text in ``metadata["raw_answer"]``),
    its category the task in the file name (:func:`llava_task_category`)."""
    bad = bad or BadRecords()
    category = llava_task_category(path)
    out: list[QAItem] = []
    for i, obj in enumerate(items):
        with bad.guard():
            rid, where, image, slide_id, ids = _record_head(obj, i, path)
            turns = parse_turns(obj.get("conversations"), path, where)
            if len(turns) != 2:
                raise fail(path, where, f"a test record holds one human question and one gpt answer; got {len(turns)} "
                                        "turns")
            question, raw_answer = strip_image_token(turns[0].text), turns[1].text.strip()
            stem, options, kind = parse_options_from_question(question)
            meta: dict[str, Any] = {"image": image, "image_refs": ids, "option_kind": kind, "raw_answer": raw_answer,
                                    "record_index": i}
            answer, idx = raw_answer, None
            if options and kind == "lettered":
                idx = resolve_lettered_answer(raw_answer, options)
                if idx is None:
                    raise fail(path, where, f"answer {raw_answer[:60]!r} names none of the {len(options)} options "
                                            f"A..{chr(ord('A') + len(options) - 1)} in the question")
                answer = options[idx]
                meta.update(question_stem=stem, answer_letter=chr(ord("A") + idx))
            elif options:
                idx = resolve_answer_index(raw_answer, options, kind)
            out.append(QAItem(question_id=rid, slide_id=slide_id, question=question, answer=answer, options=options,
                              category=category, metadata=meta, source="wsi-llava", answer_index=idx))
    return out

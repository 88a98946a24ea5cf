"""Read a record file of any known format: detect the format from extension and content, dispatch to its parser.

Formats (``load_records(path, fmt=...)``; ``fmt="auto"`` detects them from the content):


==================== ==================================================================================
``wsi-bench-train``  LLaVA json list ``{"id", "image": "<dir>/<slide>.pt", "conversations": [...]}``
``slidechat``        same shape with ``"image": ["<slide>.csv", ...]``
``wsi-bench-test``   jsonl (or json list) ``{"question_id", "image", "question", "T-answer", "metadata"}``
``wsi-llava-test``   WSI-LLaVA's per-task test json: the LLaVA shape with one question and one answer per record,
                     options inside the question (``"... A) x B) y"``), answer a letter -> closed :class:`QAItem`
                     (auto: a conversation list whose file name ends in ``_test``/``-test`` and whose records all
                     have two turns)
``slidebench-json``  ``{"samples": [{"slide_id", "question", "choices": ["A) ..."], "answer": "C", "category",
                     "features_path"}]}`` (the reformatted SlideBench-VQA copy)
``slidebench-csv``   SlideBench-VQA csv, columns ``ID, Slide, Tumor, Broad Category, Narrow Category, Question,
                     A, B, C, D, Answer``
``wsi-vqa``          json list ``{"Id": "<TCGA patient>", "Question", "Choice": [...] (closed only), "Answer"}``
``histgen``          ``{"train": [{"id", "report", "image_path": [...], "split"}], "val": [...], "test": [...]}``
==================== ==================================================================================

A malformed record is a :class:`RecordError` naming the file and the record (index and id). With
``skip_bad=True`` it is left out instead and reported by :func:`load_records_report` (count, where, why).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hwsi import textio
from hwsi.data.histgen import parse_histgen
from hwsi.data.llava import parse_llava, parse_llava_qa
from hwsi.data.records import FORMATS, BadRecords, Record, RecordError, RecordLoad
from hwsi.data.slidebench import parse_slidebench_csv, parse_slidebench_json
from hwsi.data.wsi_bench import parse_wsi_bench_test
from hwsi.data.wsi_vqa import parse_wsi_vqa

def _read_json(path: Path) -> Any:
    return textio.read_json(path, RecordError)


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    return [(f"line {n}", value) for n, value in textio.read_jsonl(path, RecordError)]


def _is_test_name(path: Path) -> bool:
    stem = path.stem.lower()
    return stem == "test" or stem.endswith(("_test", "-test"))


def _detect_from_data(data: Any, path: Path) -> str:
    if isinstance(data, dict):
        if "samples" in data:
            return "slidebench-json"
        lists = [v for v in data.values() if isinstance(v, list)]
        if lists and any(k in data for k in ("train", "val", "test")):
            first = next((x for v in lists for x in v), None)
            if first is None or (isinstance(first, dict) and "report" in first):
                return "histgen"
        raise RecordError(path, f"unknown record format: a JSON object with keys {sorted(data)[:10]}")
    if isinstance(data, list):
        if not data:
            raise RecordError(path, "empty record list; cannot tell its format (pass fmt=...)")
        first = data[0]
        if not isinstance(first, dict):
            raise RecordError(path, "unknown record format: the list does not hold objects", "record 0")
        if "conversations" in first:
            if _is_test_name(path) and all(isinstance(x, dict) and isinstance(x.get("conversations"), list)
                                           and len(x["conversations"]) == 2 for x in data):
                return "wsi-llava-test"
            return "slidechat" if isinstance(first.get("image"), list) else "wsi-bench-train"
        if "T-answer" in first:
            return "wsi-bench-test"
        if "Question" in first and "Id" in first:
            return "wsi-vqa"
        raise RecordError(path, f"unknown record format: first record has keys {sorted(first)}", "record 0")
    raise RecordError(path, f"unknown record format: top-level JSON {type(data).__name__}")


def detect_format(path: str | Path) -> str:
    """The format name (one of :data:`FORMATS`) of a record file, from its extension and content."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(path, "record file not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "slidebench-csv"
    if suffix == ".jsonl":
        rows = _read_jsonl(path)
        if not rows:
            raise RecordError(path, "empty jsonl file; cannot tell its format")
        return _detect_from_data([rows[0][1]], path)
    return _detect_from_data(_read_json(path), path)


def load_records(path: str | Path, fmt: str = "auto", split: str | None = None, skip_bad: bool = False
                 ) -> list[Record]:
    """Parse every record of a file into :class:`Conversation` / :class:`QAItem` objects.

    ``fmt`` is ``"auto"`` or one of :data:`FORMATS`. ``split`` selects one HistGen split (default: all, in file
    order). Malformed input raises :class:`RecordError` naming the file and the line (jsonl, csv) or record;
    ``skip_bad`` leaves malformed records out instead (:func:`load_records_report` says which).
    """
    return load_records_report(path, fmt, split, skip_bad).records


def load_records_report(path: str | Path, fmt: str = "auto", split: str | None = None, skip_bad: bool = False
                        ) -> RecordLoad:
    """:func:`load_records` with what was skipped: a :class:`RecordLoad` (records, skipped errors, summary)."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(path, "record file not found")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise RecordError(path, f"unknown format {fmt!r}; known: {list(FORMATS)}")
    bad = BadRecords(skip=skip_bad)
    records = _parse(path, fmt, split, bad)
    return RecordLoad(path=path, format=fmt, records=records, skipped=bad.errors)


def _parse(path: Path, fmt: str, split: str | None, bad: BadRecords) -> list[Record]:
    if fmt == "slidebench-csv":
        return list(parse_slidebench_csv(path, bad))
    if fmt == "wsi-bench-test":
        if path.suffix.lower() == ".jsonl":
            rows = _read_jsonl(path)
        else:
            data = _read_json(path)
            if not isinstance(data, list):
                raise RecordError(path, "expected a JSON list of WSI-Bench test records")
            rows = [(f"record {i}", x) for i, x in enumerate(data)]
        return list(parse_wsi_bench_test(rows, path, bad))
    if path.suffix.lower() == ".jsonl":
        data: Any = [x for _, x in _read_jsonl(path)]
    else:
        data = _read_json(path)
    if fmt in ("wsi-bench-train", "slidechat", "wsi-llava-test"):
        if not isinstance(data, list):
            raise RecordError(path, f"expected a JSON list of {fmt} records")
        if fmt == "wsi-llava-test":
            return list(parse_llava_qa(data, path, bad))
        return list(parse_llava(data, path, "wsi-bench" if fmt == "wsi-bench-train" else "slidechat", bad))
    if fmt == "slidebench-json":
        if not isinstance(data, dict) or "samples" not in data:
            raise RecordError(path, "expected an object with a 'samples' list")
        return list(parse_slidebench_json(data, path, bad))
    if fmt == "wsi-vqa":
        if not isinstance(data, list):
            raise RecordError(path, "expected a JSON list of WSI-VQA records")
        return list(parse_wsi_vqa(data, path, bad))
    if not isinstance(data, dict):
        raise RecordError(path, "expected an object with train/val/test lists (HistGen)")
    return list(parse_histgen(data, path, split, bad))

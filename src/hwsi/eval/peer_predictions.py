"""Answer files other tools write for the WSI benchmarks, read into :class:`PeerAnswer` rows (docs/scoring-peers.md).

Layouts (``fmt``; ``"auto"`` tells them apart by the file's extension and the first record's keys, in this order):

======================  =====================================================================================
``slidechat-csv``       csv ``(index), ID, Slide, Tumor, Broad Category, Narrow Category, Question, A, B, C, D,
                        Answer, Output``: SlideChat ``xtuner/tools/test.py`` (uni-medical/SlideChat @aa1ff55;
                        ``DataFrame.to_csv`` with its index). ``Answer`` is the TRUE letter, ``Output`` the model's.
``nlp-metric``          jsonl ``{"question_id", "T-answer", "Output"}``: what WSI-LLaVA's ``NLP_Metric.py`` reads by
                        default (``--pred-key Output``, yu5-kim/WSI-LLaVA @8714afc)
``wsi-relevance-csv``   csv ``question_id, model_output, metadata``: the input of WSI-LLaVA's
                        ``WSI-Metric/WSI-Relevance_stage_1.py`` (@8714afc)
``llava``               jsonl ``{"question_id", "prompt", "text", "answer_id", ["model_id"], "metadata"}``: WSI-LLaVA's
                        first ``model_vqa.py`` (XinhengLyu/WSI-LLaVA @4935038 ``Code/eval/model_vqa.py``,
                        yu5-kim/WSI-LLaVA @d94f22b) and ``model_vqa_loader.py`` (LLaVA's own)
``wsi-llava``           jsonl ``{"question_id", "image", "question", "answer", "T-answer", "metadata"}``: WSI-LLaVA
                        ``WSI_LLAVA/llava/eval/model_vqa.py`` (yu5-kim/WSI-LLaVA @7a98bbc .. @8714afc)
``hwsi-eval``           ``hwsi eval``'s ``<task>.json`` (``{"task", "predictions": [{"id", "prediction"}]}``)
``generic``             json list / jsonl / csv of objects with an id (``question_id``, ``id``, ``qid``) and an
                        answer (``prediction``, ``pred``, ``answer``, ``output``, ``response``, ``text``), or one
                        json object ``{question_id: answer}``
======================  =====================================================================================

``id_key`` / ``answer_key`` name the columns of any other layout (like ``NLP_Metric.py --id-key/--pred-key``).
Where a record names its slide and question (``Slide``+``Question``, ``image``+``question``, ``image``+``prompt``) the
pair is kept too, so rows whose ids the benchmark file does not carry (SlideChat's csv ``ID`` against the
reformatted SlideBench json) can be joined by content (:mod:`hwsi.eval.score`).

A file that cannot be read as one of these is a :class:`PredictionFileError` naming the file (and line / record);
a record without an id or with an empty answer is kept and counted by the scorer, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hwsi import textio
from hwsi.data import slide_id_from_image_ref
from hwsi.errors import InputFileError

PeerFormat = Literal["auto", "slidechat-csv", "nlp-metric", "wsi-relevance-csv", "llava", "wsi-llava", "hwsi-eval",
                     "generic"]
PEER_FORMATS: tuple[str, ...] = ("auto", "slidechat-csv", "nlp-metric", "wsi-relevance-csv", "llava", "wsi-llava",
                                 "hwsi-eval", "generic")

#: (id key, answer key) of each named layout
_KEYS: dict[str, tuple[str, str]] = {
    "slidechat-csv": ("ID", "Output"),
    "nlp-metric": ("question_id", "Output"),
    "wsi-relevance-csv": ("question_id", "model_output"),
    "llava": ("question_id", "text"),
    "wsi-llava": ("question_id", "answer"),
    "hwsi-eval": ("id", "prediction"),
}
_GENERIC_IDS: tuple[str, ...] = ("question_id", "id", "qid", "ID")
_GENERIC_ANSWERS: tuple[str, ...] = ("prediction", "pred", "answer", "output", "Output", "response", "text")
#: (slide key, question key) pairs a record may carry, for joining by content
_CONTENT_KEYS: tuple[tuple[str, str], ...] = (("Slide", "Question"), ("slide_id", "question"), ("image", "question"),
                                              ("image", "prompt"))


class PredictionFileError(InputFileError):
    """A predictions file cannot be read as any layout of :mod:`hwsi.eval.peer_predictions`."""


@dataclass(frozen=True)
class PeerAnswer:
    """One answer of another tool: its question id (None when the record has none), the answer text ("" when empty
    or null), where it is in the file, and ``(slide id, question)`` when the record names them."""

    question_id: str | None
    answer: str
    where: str
    content: tuple[str, str] | None = None


@dataclass
class PeerPredictions:
    """The answers of one file and the layout they were read as."""

    path: Path
    fmt: str
    id_key: str
    answer_key: str
    answers: list[PeerAnswer]


def _records(path: Path) -> tuple[list[tuple[str, Any]], str]:
    """``([(where, record)], container)`` of a csv / jsonl / json file; container is csv, jsonl, json-list,
    json-dict (an id -> answer object) or hwsi-eval."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        _, rows = textio.read_csv(path, PredictionFileError)
        return [(f"line {n}", row) for n, row in rows], "csv"
    if suffix == ".jsonl":
        return [(f"line {n}", v) for n, v in textio.read_jsonl(path, PredictionFileError)], "jsonl"
    data = textio.read_json(path, PredictionFileError)
    if isinstance(data, list):
        return [(f"record {i}", v) for i, v in enumerate(data)], "json-list"
    if isinstance(data, dict) and isinstance(data.get("predictions"), list):
        return [(f"predictions[{i}]", v) for i, v in enumerate(data["predictions"])], "hwsi-eval"
    if isinstance(data, dict) and data and all(isinstance(v, (str, type(None))) for v in data.values()):
        return [(f"key {k!r}", {"question_id": k, "answer": v}) for k, v in data.items()], "json-dict"
    kind = type(data).__name__ if not isinstance(data, dict) else f"object with keys {sorted(data)[:8]}"
    raise PredictionFileError(path, f"expected a list of answer records, an id -> answer object or hwsi eval's "
                                    f"<task>.json, got a JSON {kind}")


def _detect(first: dict[str, Any], container: str) -> str:
    keys = set(first)
    if container == "hwsi-eval":
        return "hwsi-eval"
    if {"ID", "Slide", "Question", "Output"} <= keys:
        return "slidechat-csv"
    if {"question_id", "Output"} <= keys:
        return "nlp-metric"
    if {"question_id", "model_output"} <= keys:
        return "wsi-relevance-csv"
    if {"question_id", "text"} <= keys and keys & {"prompt", "answer_id"}:
        return "llava"
    if {"question_id", "answer", "T-answer"} <= keys:
        return "wsi-llava"
    return "generic"


def _answer_text(value: Any, path: Path, where: str, key: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise PredictionFileError(path, f"answer {key!r} is a {type(value).__name__}, expected text", where)
    return str(value).strip()


def _content(rec: dict[str, Any]) -> tuple[str, str] | None:
    for sk, qk in _CONTENT_KEYS:
        slide, question = rec.get(sk), rec.get(qk)
        if isinstance(slide, (str, list)) and slide and isinstance(question, str) and question.strip():
            try:
                return slide_id_from_image_ref(slide), question
            except (ValueError, TypeError):
                return None
    return None


def read_peer_predictions(path: str | Path, fmt: str = "auto", id_key: str = "",
                          answer_key: str = "") -> PeerPredictions:
    """Every answer of a predictions file (layouts: module docstring). ``id_key`` / ``answer_key`` override the
    layout's columns. A file that is not one of the layouts -> :class:`PredictionFileError` naming it."""
    path = Path(path)
    if fmt not in PEER_FORMATS:
        raise PredictionFileError(path, f"unknown predictions format {fmt!r}; known: {list(PEER_FORMATS)}")
    rows, container = _records(path)
    if not rows:
        raise PredictionFileError(path, "holds no answer records")
    for where, rec in rows:
        if not isinstance(rec, dict):
            raise PredictionFileError(path, f"expected an object per answer, got {type(rec).__name__}", where)
    first = rows[0][1]
    if fmt == "auto":
        fmt = "generic" if container == "json-dict" else _detect(first, container)
    ik, ak = _KEYS.get(fmt, ("", ""))
    if fmt == "generic":
        ik = next((k for k in _GENERIC_IDS if k in first), "")
        ak = next((k for k in _GENERIC_ANSWERS if k in first), "")
    ik, ak = id_key or ik, answer_key or ak
    if not ak or ak not in first:
        raise PredictionFileError(path, f"no answer column {ak or '(none of ' + ', '.join(_GENERIC_ANSWERS) + ')'} in "
                                        f"the first record (keys: {sorted(first)}); name it with --answer-key",
                                  rows[0][0])
    if (not ik or ik not in first) and _content(first) is None:
        raise PredictionFileError(path, f"no question id column {ik or '(none of ' + ', '.join(_GENERIC_IDS) + ')'} "
                                        f"in the first record (keys: {sorted(first)}); name it with --id-key",
                                  rows[0][0])
    answers = []
    for where, rec in rows:
        raw_id = rec.get(ik) if ik else None
        qid = None if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()) else str(raw_id).strip()
        answers.append(PeerAnswer(qid, _answer_text(rec.get(ak), path, where, ak), where, _content(rec)))
    return PeerPredictions(path, fmt, ik, ak, answers)


__all__ = [
    "PEER_FORMATS",
    "PeerAnswer",
    "PeerFormat",
    "PeerPredictions",
    "PredictionFileError",
    "read_peer_predictions",
]

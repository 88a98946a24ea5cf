"""Text records of the public WSI instruction / VQA / report data sets, parsed into one typed model.

Two record types cover every format:

* :class:`Conversation` -- multi-turn instruction data (WSI-Bench train, SlideChat instruction json). The text of each
  turn is kept verbatim, including the ``<image>`` placeholder (use :func:`strip_image_token` to drop it).
* :class:`QAItem` -- one question with a reference answer (WSI-Bench test jsonl, SlideBench-VQA json/csv, WSI-VQA,
  HistGen reports). Closed-ended items carry ``options`` and, where the reference can be resolved, ``answer_index``.

Formats (``load_records(path, fmt=...)``; ``fmt="auto"`` detects them from the content):

==================== ==================================================================================
``wsi-bench-train``  LLaVA json list ``{"id", "image": "<dir>/<slide>.pt", "conversations": [...]}``
``slidechat``        same shape with ``"image": ["<slide>.csv", ...]``
``wsi-bench-test``   jsonl (or json list) ``{"question_id", "image", "question", "T-answer", "metadata"}``
``slidebench-json``  ``{"samples": [{"slide_id", "question", "choices": ["A) ..."], "answer": "C", "category",
                     "features_path"}]}`` (the reformatted SlideBench-VQA copy)
``slidebench-csv``   SlideBench-VQA csv, columns ``ID, Slide, Tumor, Broad Category, Narrow Category, Question,
                     A, B, C, D, Answer``
``wsi-vqa``          json list ``{"Id": "<TCGA patient>", "Question", "Choice": [...] (closed only), "Answer"}``
``histgen``          ``{"train": [{"id", "report", "image_path": [...], "split"}], "val": [...], "test": [...]}``
==================== ==================================================================================

Slide ids. Our per-slide stores are named by the slide file stem (``docs/ARCHITECTURE.md``).
:func:`slide_id_from_image_ref` turns an image reference (``"TCGA-LUSC/TCGA-21-1083-01Z-00-DX1.<uuid>.pt"``,
``["TCGA-A7-A0CJ-01Z-00-DX2.csv"]``) into that stem: the folder part is dropped and one *known* file extension
is removed (TCGA file names contain dots, so ``Path.stem`` would be wrong for an extension-less name).
:func:`match_records_to_stores` then matches each record to an available store at the finest level that exists:

1. ``exact``: the record's slide id equals a store id;
2. ``slide``: TCGA slide barcode (``TCGA-TSS-PPPP-SSV-PPR-DXn``, the part before the ``.<uuid>``) equal;
3. ``patient``: the record names only a TCGA patient (``TCGA-TSS-PPPP``, as WSI-VQA does) and a store of that
   patient exists. Several candidate stores -> the lexicographically first one is used and the record is listed
   under ``ambiguous`` in the report (``on_multiple="skip"`` leaves such records unmatched instead).

Records without any store are reported, never raised on.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

from hwsi import textio
from hwsi.errors import InputFileError

Role = Literal["human", "gpt"]

FORMATS: tuple[str, ...] = (
    "wsi-bench-train",
    "slidechat",
    "wsi-bench-test",
    "slidebench-json",
    "slidebench-csv",
    "wsi-vqa",
    "histgen",
)

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

#: Instruction used for HistGen records, which hold only a report (no question).
HISTGEN_REPORT_PROMPT = "Write the pathology report for this whole slide image."

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

#: File extensions removed from image references (lower case, compared case-insensitively).
KNOWN_EXTENSIONS: tuple[str, ...] = (
    ".pt",
    ".pth",
    ".csv",
    ".h5",
    ".hdf5",
    ".npy",
    ".npz",
    ".pkl",
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".bif",
    ".vsi",
    ".dcm",
    ".jpg",
    ".jpeg",
    ".png",
    ".zarr",
)

_ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
_IMAGE_TOKEN = "<image>"
_TCGA_RE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})((?:-[A-Z0-9]{2,4}){0,3})", re.IGNORECASE)


class RecordError(InputFileError):
    """A text record file is missing, of an unknown format, or malformed; names the file and the line/record."""


@dataclass(frozen=True)
class Turn:
    """One message of a conversation; ``role`` is ``"human"`` or ``"gpt"`` (LLaVA naming)."""

    role: Role
    text: str


@dataclass
class Conversation:
    """A multi-turn instruction record bound to one slide."""

    id: str
    slide_id: str
    turns: list[Turn]
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def record_id(self) -> str:
        return self.id


@dataclass
class QAItem:
    """One question about a slide with its reference answer.

    ``options`` is None for open-ended questions. ``answer_index`` is the index of the correct option when it is
    known (given as a letter, equal to an option's text, or resolvable from the reference answer's wording).
    """

    question_id: str
    slide_id: str
    question: str
    answer: str
    options: list[str] | None
    category: str
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    answer_index: int | None = None

    @property
    def record_id(self) -> str:
        return self.question_id

    @property
    def closed(self) -> bool:
        """True when the item has options (closed-ended)."""
        return bool(self.options)


Record = Conversation | QAItem


# --------------------------------------------------------------------------------------------------- slide ids
def _strip_known_extension(name: str) -> str:
    low = name.lower()
    for ext in KNOWN_EXTENSIONS:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


def slide_ids_from_image_ref(ref: str | Sequence[str]) -> list[str]:
    """All slide ids named by an image reference (a path string or a list of them), in order, without repeats."""
    refs = [ref] if isinstance(ref, str) else list(ref)
    out: list[str] = []
    for r in refs:
        if not isinstance(r, str) or not r.strip():
            raise ValueError(f"image reference must be a non-empty string, got {r!r}")
        r = r.strip().rstrip("/\\")
        name = PureWindowsPath(r).name if "\\" in r else PurePosixPath(r).name
        sid = _strip_known_extension(name)
        if sid not in out:
            out.append(sid)
    if not out:
        raise ValueError("empty image reference list")
    return out


def slide_id_from_image_ref(ref: str | Sequence[str]) -> str:
    """The store slide id of an image reference: file name without folder and without a known extension.

    ``"TCGA-LUSC/TCGA-21-1083-01Z-00-DX1.8288ca92-...pt"`` -> ``"TCGA-21-1083-01Z-00-DX1.8288ca92-..."``;
    ``["TCGA-A7-A0CJ-01Z-00-DX2.csv"]`` -> ``"TCGA-A7-A0CJ-01Z-00-DX2"``. For a list naming several slides the
    first one is returned (all are kept in the record's ``metadata["image_refs"]`` by the loaders).
    """
    return slide_ids_from_image_ref(ref)[0]


def tcga_barcode(slide_id: str) -> tuple[str, str] | None:
    """``(patient, slide_barcode)`` of a TCGA id, upper case, or None for a non-TCGA id.

    ``"TCGA-21-1083-01Z-00-DX1.8288ca92-..."`` -> ``("TCGA-21-1083", "TCGA-21-1083-01Z-00-DX1")``;
    ``"TCGA-LD-A74U"`` -> ``("TCGA-LD-A74U", "TCGA-LD-A74U")``.
    """
    base = slide_id.split(".", 1)[0]
    m = _TCGA_RE.match(base)
    if not m:
        return None
    return m.group(1).upper(), (m.group(1) + m.group(2)).upper()


def strip_image_token(text: str) -> str:
    """Remove the ``<image>`` placeholder (and the newline next to it) from a turn's text."""
    return text.replace(_IMAGE_TOKEN + "\n", "").replace("\n" + _IMAGE_TOKEN, "").replace(_IMAGE_TOKEN, "").strip()


# ----------------------------------------------------------------------------------------- closed-ended options
_LETTER_LINE_RE = re.compile(r"^\s*\(?([A-Ha-h])[\)\.:]\s+(.+?)\s*$")
_INLINE_OPT_RE = re.compile(r"(?:^|\s)\(([A-H])\)\s*")
_EITHER_OR_RE = re.compile(r"\bis\s+(?:the|it|this)\b[^?]*?\b([\w-]+)\s+or\s+([\w-]+)\s*\?\s*$", re.I)
_POLAR_RE = re.compile(r"^\s*(is|are|do|does|did|can|could|was|were|has|have|had|will|would|should)\b", re.I)
_REQUEST_RE = re.compile(r"^\s*(can|could|would|will)\s+you\b", re.I)
_YES_RE = re.compile(r"^\W*(yes|indeed|absolutely|correct|true)\b", re.I)
_NO_RE = re.compile(r"^\W*(no|neither|none|not|false|there (?:is|are) no)\b", re.I)


def strip_option_letter(option: str) -> str:
    """``"A) Squamous cell carcinoma"`` -> ``"Squamous cell carcinoma"`` (also ``"A." / "(A)" / "A:"``)."""
    m = re.match(r"^\s*\(?[A-Ha-h][\)\.:]\s+(.*)$", option, re.S)
    return m.group(1).strip() if m else option.strip()


def parse_options_from_question(question: str) -> tuple[str, list[str] | None, str]:
    """Find the answer options written inside a question.

    Returns ``(stem, options, kind)`` with kind one of:

    * ``"lettered"`` -- option lines ``A. text`` / ``(A) text`` / ``A) text`` (at least two, consecutive
      letters from A) or inline ``(A) x (B) y``; the stem is the text before the options;
    * ``"either-or"`` -- a final ``... is the prognosis good or poor?`` -> ``["good", "poor"]``;
    * ``"yes-no"`` -- a polar question (starts with is/are/do/does/can/...; not a request such as
      "Can you describe ...") -> ``["yes", "no"]``;
    * ``"open"`` -- none of these (options None).
    """
    lines = question.splitlines()
    opts: list[str] = []
    first_opt_line = None
    for i, line in enumerate(lines):
        m = _LETTER_LINE_RE.match(line)
        if m and m.group(1).upper() == chr(ord("A") + len(opts)):
            if first_opt_line is None:
                first_opt_line = i
            opts.append(m.group(2).strip())
        elif opts and line.strip():
            break
    if len(opts) >= 2 and first_opt_line is not None:
        return "\n".join(lines[:first_opt_line]).strip(), opts, "lettered"
    parts = _INLINE_OPT_RE.split(question)
    # parts = [stem, "A", text, "B", text, ...]
    if len(parts) >= 5:
        letters = parts[1::2]
        if letters == [chr(ord("A") + i) for i in range(len(letters))]:
            return parts[0].strip(), [p.strip() for p in parts[2::2]], "lettered"
    m = _EITHER_OR_RE.search(question)
    if m:
        return question.strip(), [m.group(1).lower(), m.group(2).lower()], "either-or"
    if _POLAR_RE.match(question) and not _REQUEST_RE.match(question):
        return question.strip(), ["yes", "no"], "yes-no"
    return question.strip(), None, "open"


def _resolve_answer_index(answer: str, options: Sequence[str], kind: str) -> int | None:
    """Index of the option a free-text reference answer states, or None when it cannot be told unambiguously."""
    if kind == "yes-no":
        if _YES_RE.match(answer):
            return 0
        if _NO_RE.match(answer):
            return 1
        return None
    low = " " + re.sub(r"[^a-z0-9]+", " ", answer.lower()) + " "
    hits = [i for i, o in enumerate(options) if " " + re.sub(r"[^a-z0-9]+", " ", o.lower()).strip() + " " in low]
    return hits[0] if len(hits) == 1 else None


# ------------------------------------------------------------------------------------------------------ parsing
def _fail(path: Path, where: str, reason: str) -> RecordError:
    return RecordError(path, reason, where)


def _need(obj: dict[str, Any], key: str, path: Path, where: str, types: type | tuple[type, ...] = str) -> Any:
    if key not in obj:
        raise _fail(path, where, f"missing field {key!r} (fields present: {sorted(obj)})")
    val = obj[key]
    if not isinstance(val, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise _fail(path, where, f"field {key!r} has type {type(val).__name__}, expected {names}")
    return val


def _slide_from_ref(ref: Any, path: Path, where: str) -> tuple[str, list[str]]:
    try:
        ids = slide_ids_from_image_ref(ref)
    except (ValueError, TypeError) as exc:
        raise _fail(path, where, f"bad image reference {ref!r}: {exc}") from exc
    return ids[0], ids


def _parse_turns(conv: Any, path: Path, where: str) -> list[Turn]:
    if not isinstance(conv, list) or not conv:
        raise _fail(path, where, "'conversations' must be a non-empty list")
    turns: list[Turn] = []
    for j, t in enumerate(conv):
        w = f"{where}, turn {j}"
        if not isinstance(t, dict):
            raise _fail(path, w, "a turn must be an object with 'from' and 'value'")
        role_raw = _need(t, "from", path, w)
        text = _need(t, "value", path, w)
        role = _ROLE_ALIASES.get(role_raw.strip().lower())
        if role is None:
            raise _fail(path, w, f"unknown role {role_raw!r} (expected human/gpt)")
        expected = "human" if j % 2 == 0 else "gpt"
        if role != expected:
            raise _fail(path, w, f"turns must alternate human/gpt starting with human; got {role!r} here")
        turns.append(Turn(role=role, text=text))  # type: ignore[arg-type]
    return turns


def _parse_llava(items: list[Any], path: Path, source: str | None) -> list[Conversation]:
    out: list[Conversation] = []
    for i, obj in enumerate(items):
        where = f"record {i}"
        if not isinstance(obj, dict):
            raise _fail(path, where, "expected an object")
        rid = obj.get("id")
        if rid is None:
            raise _fail(path, where, "missing field 'id'")
        where = f"record {i} (id={rid})"
        if "image" not in obj:
            raise _fail(path, where, "missing field 'image'")
        image = obj["image"]
        slide_id, ids = _slide_from_ref(image, path, where)
        src = source or ("slidechat" if isinstance(image, list) else "wsi-bench")
        turns = _parse_turns(obj.get("conversations"), path, where)
        meta = {k: v for k, v in obj.items() if k not in ("id", "image", "conversations")}
        meta["image"] = image
        meta["image_refs"] = ids
        out.append(Conversation(id=str(rid), slide_id=slide_id, turns=turns, source=src, metadata=meta))
    return out


def _category_of(meta: Any, path: Path, where: str) -> str:
    if isinstance(meta, str):
        return meta
    if isinstance(meta, dict):
        for key in ("category", "type", "task", "question_type"):
            if isinstance(meta.get(key), str):
                return meta[key]
    raise _fail(path, where, f"cannot read a category from metadata {meta!r}")


def _parse_wsi_bench_test(items: list[tuple[str, Any]], path: Path) -> list[QAItem]:
    out: list[QAItem] = []
    for where, obj in items:
        if not isinstance(obj, dict):
            raise _fail(path, where, "expected an object")
        qid = _need(obj, "question_id", path, where, (str, int))
        where = f"{where} (question_id={qid})"
        image = _need(obj, "image", path, where, (str, list))
        question = _need(obj, "question", path, where)
        answer = _need(obj, "T-answer", path, where)
        meta_raw = obj.get("metadata")
        if meta_raw is None:
            raise _fail(path, where, "missing field 'metadata'")
        category = _category_of(meta_raw, path, where)
        slide_id, ids = _slide_from_ref(image, path, where)
        stem, options, kind = parse_options_from_question(question)
        answer_index = _resolve_answer_index(answer, options, kind) if options else None
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


def _letter_index(letter: str, n: int, path: Path, where: str) -> int:
    s = letter.strip().strip("().:").upper()
    if len(s) != 1 or not ("A" <= s <= chr(ord("A") + n - 1)):
        raise _fail(path, where, f"answer {letter!r} is not one of the option letters A..{chr(ord('A') + n - 1)}")
    return ord(s) - ord("A")


def _parse_slidebench_json(data: dict[str, Any], path: Path) -> list[QAItem]:
    samples = data["samples"]
    if not isinstance(samples, list):
        raise _fail(path, "top level", "'samples' must be a list")
    out: list[QAItem] = []
    per_slide: Counter[str] = Counter()
    for i, obj in enumerate(samples):
        where = f"sample {i}"
        if not isinstance(obj, dict):
            raise _fail(path, where, "expected an object")
        slide_raw = _need(obj, "slide_id", path, where)
        question = _need(obj, "question", path, where)
        choices = _need(obj, "choices", path, where, list)
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise _fail(path, where, "'choices' must be a list of at least two strings")
        options = [strip_option_letter(c) for c in choices]
        ans_letter = _need(obj, "answer", path, where)
        idx = _letter_index(ans_letter, len(options), path, where)
        category = _need(obj, "category", path, where)
        slide_id, ids = _slide_from_ref(slide_raw, path, where)
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


def _parse_slidebench_csv(path: Path) -> list[QAItem]:
    header, rows = textio.read_csv(path, RecordError)
    missing = [c for c in SLIDEBENCH_CSV_COLUMNS if c not in header]
    if missing:
        raise RecordError(path, f"missing column(s) {missing}; expected {list(SLIDEBENCH_CSV_COLUMNS)}", "line 1")
    out: list[QAItem] = []
    for line_num, row in rows:
        where = f"line {line_num}"
        letters = [c for c in "ABCD" if row.get(c, "")]
        if len(letters) < 2 or letters != list("ABCD"[: len(letters)]):
            raise _fail(path, where, "options A, B (C, D) must be filled from A on")
        options = [row[c] for c in letters]
        idx = _letter_index(row["Answer"], len(options), path, where)
        if not row["Slide"]:
            raise _fail(path, where, "empty 'Slide'")
        slide_id, ids = _slide_from_ref(row["Slide"], path, where)
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


def _parse_wsi_vqa(items: list[Any], path: Path) -> list[QAItem]:
    out: list[QAItem] = []
    for i, obj in enumerate(items):
        where = f"record {i}"
        if not isinstance(obj, dict):
            raise _fail(path, where, "expected an object")
        sid_raw = _need(obj, "Id", path, where)
        question = _need(obj, "Question", path, where)
        answer = _need(obj, "Answer", path, where, (str, int, float))
        answer = str(answer)
        options: list[str] | None = None
        idx: int | None = None
        if obj.get("Choice"):
            choice = obj["Choice"]
            if not isinstance(choice, list) or not all(isinstance(c, str) for c in choice):
                raise _fail(path, where, "'Choice' must be a list of strings")
            options = list(choice)
            idx = options.index(answer) if answer in options else None
            if idx is None:
                norm = [o.strip().lower() for o in options]
                idx = norm.index(answer.strip().lower()) if answer.strip().lower() in norm else None
        slide_id, ids = _slide_from_ref(sid_raw, path, where)
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


def _parse_histgen(data: dict[str, Any], path: Path, split: str | None) -> list[QAItem]:
    out: list[QAItem] = []
    splits = [s for s in data if isinstance(data[s], list)]
    if split is not None:
        if split not in data:
            raise RecordError(path, f"no split {split!r}; splits present: {splits}")
        splits = [split]
    for sp in splits:
        for i, obj in enumerate(data[sp]):
            where = f"{sp}[{i}]"
            if not isinstance(obj, dict):
                raise _fail(path, where, "expected an object")
            rid = _need(obj, "id", path, where, (str, int))
            where = f"{sp}[{i}] (id={rid})"
            report = _need(obj, "report", path, where)
            image = obj.get("image_path") or str(rid)
            slide_id, ids = _slide_from_ref(image, path, where)
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


# ------------------------------------------------------------------------------------------------ file reading
def _read_json(path: Path) -> Any:
    return textio.read_json(path, RecordError)


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    return [(f"line {n}", value) for n, value in textio.read_jsonl(path, RecordError)]


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


def load_records(path: str | Path, fmt: str = "auto", split: str | None = None) -> list[Record]:
    """Parse every record of a file into :class:`Conversation` / :class:`QAItem` objects.

    ``fmt`` is ``"auto"`` or one of :data:`FORMATS`. ``split`` selects one HistGen split (default: all, in file
    order). Malformed input raises :class:`RecordError` naming the file and the line (jsonl, csv) or record.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError(path, "record file not found")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise RecordError(path, f"unknown format {fmt!r}; known: {list(FORMATS)}")
    if fmt == "slidebench-csv":
        return list(_parse_slidebench_csv(path))
    if fmt == "wsi-bench-test":
        if path.suffix.lower() == ".jsonl":
            rows = _read_jsonl(path)
        else:
            data = _read_json(path)
            if not isinstance(data, list):
                raise RecordError(path, "expected a JSON list of WSI-Bench test records")
            rows = [(f"record {i}", x) for i, x in enumerate(data)]
        return list(_parse_wsi_bench_test(rows, path))
    if path.suffix.lower() == ".jsonl":
        data: Any = [x for _, x in _read_jsonl(path)]
    else:
        data = _read_json(path)
    if fmt in ("wsi-bench-train", "slidechat"):
        if not isinstance(data, list):
            raise RecordError(path, f"expected a JSON list of {fmt} records")
        return list(_parse_llava(data, path, "wsi-bench" if fmt == "wsi-bench-train" else "slidechat"))
    if fmt == "slidebench-json":
        if not isinstance(data, dict) or "samples" not in data:
            raise RecordError(path, "expected an object with a 'samples' list")
        return list(_parse_slidebench_json(data, path))
    if fmt == "wsi-vqa":
        if not isinstance(data, list):
            raise RecordError(path, "expected a JSON list of WSI-VQA records")
        return list(_parse_wsi_vqa(data, path))
    if not isinstance(data, dict):
        raise RecordError(path, "expected an object with train/val/test lists (HistGen)")
    return list(_parse_histgen(data, path, split))


# ---------------------------------------------------------------------------------------------------- matching
@dataclass
class MatchReport:
    """What :func:`match_records_to_stores` did with each record."""

    n_records: int
    n_matched: int
    levels: dict[str, int]
    unmatched: list[tuple[str, str]]
    ambiguous: dict[str, list[str]]

    @property
    def n_unmatched(self) -> int:
        return len(self.unmatched)

    @property
    def missing_slide_ids(self) -> list[str]:
        """Distinct record slide ids without a store, sorted."""
        return sorted({sid for _, sid in self.unmatched})

    def summary(self) -> str:
        """One line for logs."""
        lv = ", ".join(f"{k} {v}" for k, v in sorted(self.levels.items()))
        return (
            f"{self.n_matched}/{self.n_records} records matched to stores ({lv or 'none'}); "
            f"{self.n_unmatched} unmatched on {len(self.missing_slide_ids)} slide ids; "
            f"{len(self.ambiguous)} ids with several candidate stores"
        )


def _store_index(available: Iterable[str]) -> tuple[set[str], dict[str, list[str]], dict[str, list[str]]]:
    exact: set[str] = set()
    by_slide: dict[str, list[str]] = {}
    by_patient: dict[str, list[str]] = {}
    for sid in available:
        exact.add(sid)
        bc = tcga_barcode(sid)
        if bc:
            by_patient.setdefault(bc[0], []).append(sid)
            if bc[1] != bc[0]:
                by_slide.setdefault(bc[1], []).append(sid)
    for d in (by_slide, by_patient):
        for k in d:
            d[k].sort()
    return exact, by_slide, by_patient


def match_records_to_stores(
    records: Sequence[Record],
    available_slide_ids: Iterable[str],
    on_multiple: Literal["first", "skip"] = "first",
) -> tuple[list[Record], MatchReport]:
    """Keep the records whose slide has a store; the returned copies carry the store's slide id.

    Matching order: exact id, then TCGA slide barcode, then TCGA patient (see the module docstring). The record's
    own id is kept in ``metadata["record_slide_id"]`` when it differs. Unmatched records are listed in the report
    as ``(record_id, slide_id)``.
    """
    exact, by_slide, by_patient = _store_index(available_slide_ids)
    matched: list[Record] = []
    levels: Counter[str] = Counter()
    unmatched: list[tuple[str, str]] = []
    ambiguous: dict[str, list[str]] = {}
    for rec in records:
        sid = rec.slide_id
        target: str | None = None
        level = ""
        if sid in exact:
            target, level = sid, "exact"
        else:
            bc = tcga_barcode(sid)
            cands: list[str] = []
            if bc and bc[1] != bc[0]:
                cands, level = by_slide.get(bc[1], []), "slide"
            elif bc:
                cands, level = by_patient.get(bc[0], []), "patient"
            if len(cands) > 1:
                ambiguous[sid] = list(cands)
                if on_multiple == "first":
                    target = cands[0]
            elif cands:
                target = cands[0]
        if target is None:
            unmatched.append((rec.record_id, sid))
            continue
        levels[level] += 1
        if target != sid:
            meta = dict(rec.metadata)
            meta["record_slide_id"] = sid
            rec = dataclasses.replace(rec, slide_id=target, metadata=meta)
        matched.append(rec)
    report = MatchReport(
        n_records=len(records), n_matched=len(matched), levels=dict(levels), unmatched=unmatched, ambiguous=ambiguous
    )
    return matched, report


__all__ = [
    "FORMATS",
    "HISTGEN_REPORT_PROMPT",
    "WSI_BENCH_CATEGORIES",
    "Conversation",
    "MatchReport",
    "QAItem",
    "Record",
    "RecordError",
    "Turn",
    "detect_format",
    "load_records",
    "match_records_to_stores",
    "parse_options_from_question",
    "slide_id_from_image_ref",
    "slide_ids_from_image_ref",
    "strip_image_token",
    "strip_option_letter",
    "tcga_barcode",
]

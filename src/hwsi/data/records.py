"""The typed model every record format parses into, slide ids of image references, and the parsers' shared checks.

Two record types cover every format (one parser module per format in :mod:`hwsi.data`):

* :class:`Conversation` -- multi-turn instruction data (WSI-Bench train, SlideChat instruction json). The text of each
  turn is kept verbatim, including the ``<image>`` placeholder (use :func:`strip_image_token` to drop it).
* :class:`QAItem` -- one question with a reference answer (WSI-Bench test jsonl, SlideBench-VQA json/csv, WSI-VQA,
  HistGen reports). Closed-ended items carry ``options`` and, where the reference can be resolved, ``answer_index``.

Slide ids. Our per-slide stores are named by the slide file stem (``docs/ARCHITECTURE.md``).
:func:`slide_id_from_image_ref` turns an image reference (``"TCGA-LUSC/TCGA-21-1083-01Z-00-DX1.<uuid>.pt"``,
``["TCGA-A7-A0CJ-01Z-00-DX2.csv"]``) into that stem: the folder part is dropped and one *known* file extension
is removed (TCGA file names contain dots, so ``Path.stem`` would be wrong for an extension-less name).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

from hwsi.errors import InputFileError

Role = Literal["human", "gpt"]

FORMATS: tuple[str, ...] = (
    "wsi-bench-train",
    "slidechat",
    "wsi-bench-test",
    "wsi-llava-test",
    "slidebench-json",
    "slidebench-csv",
    "wsi-vqa",
    "histgen",
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


@dataclass
class BadRecords:
    """The per-record errors of one file. By default (``skip`` False) the first one is raised; with ``skip`` each
    bad record is left out and its :class:`RecordError` kept in ``errors`` (the parsers wrap each record in
    :meth:`guard`). Errors of the file as a whole (not JSON, unknown format) are always raised."""

    skip: bool = False
    errors: list[RecordError] = field(default_factory=list)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Parse one record inside this block: a :class:`RecordError` is raised, or recorded when skipping."""
        try:
            yield
        except RecordError as exc:
            if not self.skip:
                raise
            self.errors.append(exc)


@dataclass
class RecordLoad:
    """What :func:`hwsi.data.load_records_report` read from one file: the records and the bad ones it skipped."""

    path: Path
    format: str
    records: list[Record]
    skipped: list[RecordError] = field(default_factory=list)

    @property
    def skipped_where(self) -> list[str]:
        """Where each skipped record is (``"record 1814 (id=...)"``), in file order."""
        return [str(e.where) for e in self.skipped]

    def summary(self, most: int = 5) -> str:
        """``"2749 records (wsi-bench-train); skipped 1 bad record(s): record 1814 (id=...): <reason>"``."""
        text = f"{len(self.records)} records ({self.format})"
        if self.skipped:
            shown = "; ".join(f"{e.where}: {e.reason}" for e in self.skipped[:most])
            more = f"; ... and {len(self.skipped) - most} more" if len(self.skipped) > most else ""
            text += f"; skipped {len(self.skipped)} bad record(s): {shown}{more}"
        return text.replace("\r", " ").replace("\n", " ")


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


# ------------------------------------------------------------------------------- checks shared by the parsers
def fail(path: Path, where: str, reason: str) -> RecordError:
    """The error for a malformed record: ``where`` names the line or record (``"line 3"``, ``"record 0 (id=7)"``)."""
    return RecordError(path, reason, where)


def need(obj: dict[str, Any], key: str, path: Path, where: str, types: type | tuple[type, ...] = str) -> Any:
    """``obj[key]``, checked present and of one of ``types``; else a :class:`RecordError` naming file and place."""
    if key not in obj:
        raise fail(path, where, f"missing field {key!r} (fields present: {sorted(obj)})")
    val = obj[key]
    if not isinstance(val, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise fail(path, where, f"field {key!r} has type {type(val).__name__}, expected {names}")
    return val


def parse_roi_field(value: Any, path: Path, where: str) -> tuple[float, float, float, float]:
    """A record's optional ``"roi": [x, y, w, h]`` (level-0 px of its slide, docs/roi.md "Training records"): the
    rectangle the question is about; four finite numbers with ``w, h > 0``, else a :class:`RecordError`."""
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise fail(path, where, f"field 'roi' must be [x, y, w, h] (four numbers, level-0 px), got {value!r}"[:200])
    x, y, w, h = (float(v) for v in value)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise fail(path, where, f"field 'roi' {list(value)}: x, y must be finite and w, h > 0 (level-0 px)")
    return x, y, w, h


def slide_from_ref(ref: Any, path: Path, where: str) -> tuple[str, list[str]]:
    """``(first slide id, all slide ids)`` of a record's image reference; a bad reference is a :class:`RecordError`."""
    try:
        ids = slide_ids_from_image_ref(ref)
    except (ValueError, TypeError) as exc:
        raise fail(path, where, f"bad image reference {ref!r}: {exc}") from exc
    return ids[0], ids

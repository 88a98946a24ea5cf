"""Reading the text files people give hwsi (YAML, JSON, JSONL, CSV), with errors that say which file and where.

Every input text file is read through :func:`read_text`: it refuses what is not a regular file (a FIFO named like
a record file would block forever), decodes UTF-8 (a leading BOM is dropped) and, for bytes that are not UTF-8,
raises :class:`~hwsi.errors.InputFileError` naming the file, the line and the byte offset. The parsers on top of
it turn every failure of the format into the same error type:

* :func:`read_json` -- invalid JSON names the line and column; JSON nested too deeply for Python's parser
  (``RecursionError``) is reported as such;
* :func:`read_jsonl` -- one JSON value per non-blank line; errors name the line;
* :func:`read_csv` -- a header row and records as dicts keyed by the (stripped) header; a record with more fields
  than the header is an error naming its line (a shorter one is padded with ``""``);
* :func:`read_yaml` -- ``yaml.safe_load``; errors (including too-deep nesting) name the line where PyYAML knows it.

``error`` selects the subclass raised (e.g. :class:`hwsi.data.RecordError`); it is called as
``error(path, reason, where)``.
"""

from __future__ import annotations

import csv
import io
import json
import stat
from pathlib import Path
from typing import Any

from hwsi.errors import InputFileError

ErrorType = type[InputFileError]


def read_bytes(path: str | Path, error: ErrorType = InputFileError) -> bytes:
    """The bytes of a regular file; a missing file, a folder, a FIFO or device, or an OS error -> ``error``."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise error(path, "file not found") from None
    except OSError as exc:
        raise error(path, f"cannot read ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(st.st_mode):
        raise error(path, "is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise error(path, "not a regular file (a FIFO, socket or device); give a file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise error(path, f"cannot read ({exc.strerror or exc})") from exc


def decode_utf8(data: bytes, path: str | Path, error: ErrorType = InputFileError) -> str:
    """``data`` decoded as UTF-8 (BOM dropped); bytes that are not UTF-8 -> ``error`` with line and byte offset."""
    skip = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = skip + exc.start  # offset in the file, BOM included
        line = data.count(b"\n", 0, at) + 1
        raise error(path, f"not UTF-8 text: byte 0x{data[at]:02x} at byte offset {at} (save the file as UTF-8)",
                    f"line {line}") from None


def read_text(path: str | Path, error: ErrorType = InputFileError) -> str:
    """A regular file's text, decoded as UTF-8 (see the module docstring)."""
    return decode_utf8(read_bytes(path, error), path, error)


def parse_json(text: str, path: str | Path, where: str | None = None, error: ErrorType = InputFileError) -> Any:
    """``json.loads(text)``; invalid or too deeply nested JSON -> ``error`` naming the file (and ``where``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        loc = f"line {exc.lineno}, column {exc.colno}" if where is None else f"{where}, column {exc.colno}"
        raise error(path, f"not valid JSON: {exc.msg}", loc) from None
    except RecursionError:
        raise error(path, "JSON nested too deeply to read", where) from None


def read_json(path: str | Path, error: ErrorType = InputFileError) -> Any:
    """The JSON value of a file."""
    return parse_json(read_text(path, error), path, None, error)


def read_jsonl(path: str | Path, error: ErrorType = InputFileError) -> list[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a JSON-lines file."""
    out: list[tuple[int, Any]] = []
    for n, line in enumerate(read_text(path, error).splitlines(), start=1):
        if line.strip():
            out.append((n, parse_json(line, path, f"line {n}", error)))
    return out


def read_csv(path: str | Path, error: ErrorType = InputFileError) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """``(header, [(line, row), ...])`` of a CSV file with a header row; header names and values are stripped.

    Blank lines are skipped. A row with more fields than the header -> ``error`` naming its line.
    """
    text = read_text(path, error)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        rows: list[tuple[int, dict[str, str]]] = []
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue
            if len(fields) > len(header):
                raise error(path, f"row has {len(fields)} fields but the header has {len(header)} "
                                  f"({', '.join(header) or 'no columns'}); quote values that contain commas",
                            f"line {reader.line_num}")
            vals = [f.strip() for f in fields] + [""] * (len(header) - len(fields))
            rows.append((reader.line_num, dict(zip(header, vals))))
    except csv.Error as exc:
        raise error(path, f"not valid CSV: {exc}", f"line {reader.line_num}") from None
    return header, rows


def read_yaml(path: str | Path, error: ErrorType = InputFileError) -> Any:
    """``yaml.safe_load`` of a file; invalid or too deeply nested YAML -> ``error`` naming the file and line."""
    import yaml

    text = read_text(path, error)
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else None
        reason = " ".join(str(x) for x in (exc.context, exc.problem) if x) or type(exc).__name__
        raise error(path, f"not valid YAML: {reason}", where) from None
    except yaml.YAMLError as exc:
        raise error(path, f"not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise error(path, "YAML nested too deeply to read") from None

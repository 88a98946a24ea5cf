"""Property-based tests: arbitrary bytes and structures given to hwsi's input readers never raise anything but
hwsi's own error type (the typed config reader, every record loader, the slide CSV of `hwsi tile`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hwsi.config import from_dict, load_config
from hwsi.errors import ConfigError, HwsiError
from hwsi.slide.tile import collect_slides
from hwsi.train.config import TrainConfig
from hwsi.data import FORMATS, RecordError, load_records

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values: scalars (with the awkward ones: huge ints, NaN, control characters) nested in lists and objects
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)

# Records shaped like each format: every field usually of the right kind, sometimes anything or missing, so the
# parsers past the format checks (options, answer letters, turns, image references) are reached
_text = st.text(max_size=16)
_ref = st.sampled_from(["TCGA-21-1083-01Z-00-DX1.ab12.pt", "dir/s1.svs", "s2.csv", "TCGA-LD-A74U", "", "/", "a\\b"])
_question = st.sampled_from(["Is there necrosis?", "What is the grade?\nA) 1\nB) 2\nC) 3",
                             "Is the prognosis good or poor?", "(A) x (B) y (C) z"]) | _text
_letter = st.sampled_from(["A", "b", "(C)", "D.", "E", "", "AB"])
_turn = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "user", "assistant", "x"]), "value": _text})
_FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "wsi-bench-train": {"id": _text | st.integers(), "image": _ref | st.lists(_ref, max_size=3),
                        "conversations": st.lists(_turn, max_size=4)},
    "wsi-bench-test": {"question_id": _text | st.integers(), "image": _ref | st.lists(_ref, max_size=2),
                       "question": _question, "T-answer": st.sampled_from(["Yes.", "No", "grade 2", "A"]) | _text,
                       "metadata": st.sampled_from(["Grade", "Report"]) | st.fixed_dictionaries({"category": _text})},
    "wsi-vqa": {"Id": _ref, "Question": _question, "Choice": st.lists(_text, max_size=4),
                "Answer": _text | st.integers() | st.floats()},
    "slidebench-json": {"slide_id": _ref, "question": _question, "answer": _letter, "category": _text,
                        "choices": st.lists(st.sampled_from(["A) x", "B) y", "C) z", "w"]), max_size=4)},
    "histgen": {"id": _text | st.integers(), "report": _text, "split": _text,
                "image_path": _ref | st.lists(_ref, max_size=2)},
}


@st.composite
def _record(draw: st.DrawFn, fmt: str) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    for key, good in _FIELDS[fmt].items():
        kind = draw(st.integers(0, 9))
        if kind == 0:
            continue  # missing
        rec[key] = draw(json_values) if kind == 1 else draw(good)
    return rec


def _document(fmt: str) -> st.SearchStrategy[Any]:
    recs = st.lists(_record(fmt), max_size=4)
    if fmt == "slidebench-json":
        return st.fixed_dictionaries({"samples": recs | json_values})
    if fmt == "histgen":
        return st.dictionaries(st.sampled_from(["train", "val", "test"]), recs | json_values, max_size=3)
    return recs | json_values


_DIR = tempfile.TemporaryDirectory(prefix="hwsi-prop-")  # removed when the test process ends


def _tmp(name: str, data: bytes) -> Path:
    """``data`` written to ``name`` in this module's scratch folder (each example overwrites the last)."""
    p = Path(_DIR.name) / name
    p.write_bytes(data)
    return p


def _load_never_crashes(path: Path, fmt: str) -> None:
    try:
        out = load_records(path, fmt)
    except RecordError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    else:
        assert isinstance(out, list)


@SETTINGS
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".json", ".jsonl", ".csv"]),
       fmt=st.sampled_from(("auto",) + FORMATS))
def test_record_loaders_arbitrary_bytes(data: bytes, suffix: str, fmt: str) -> None:
    _load_never_crashes(_tmp("records" + suffix, data), fmt)


@pytest.mark.parametrize("fmt", ["wsi-bench-train", "slidechat", "wsi-bench-test", "wsi-vqa", "slidebench-json",
                                 "histgen"])
@SETTINGS
@given(st.data())
def test_record_loaders_arbitrary_structures(fmt: str, data: st.DataObject) -> None:
    shape = "wsi-bench-train" if fmt == "slidechat" else fmt
    doc = data.draw(_document(shape))
    text = json.dumps(doc)
    _load_never_crashes(_tmp("records.json", text.encode()), data.draw(st.sampled_from([fmt, "auto"])))
    if isinstance(doc, list) and fmt == "wsi-bench-test":  # the jsonl form: one record per line
        lines = "\n".join(json.dumps(x) for x in doc)
        _load_never_crashes(_tmp("records.jsonl", lines.encode()), fmt)


_csv_cell = st.text(alphabet=st.characters(codec="utf-8"), max_size=10) | st.sampled_from(["A", "B", "C", "a", ""])


@SETTINGS
@given(rows=st.lists(st.lists(_csv_cell, max_size=13), max_size=5), header=st.booleans())
def test_slidebench_csv_arbitrary_rows(rows: list[list[str]], header: bool) -> None:
    import csv
    import io

    from hwsi.data import SLIDEBENCH_CSV_COLUMNS

    buf = io.StringIO()
    w = csv.writer(buf)
    if header:
        w.writerow(SLIDEBENCH_CSV_COLUMNS)
    w.writerows(rows)
    _load_never_crashes(_tmp("bench.csv", buf.getvalue().encode()), "slidebench-csv")


# ------------------------------------------------------------------------------------------- the typed config reader
_numberish = st.sampled_from(["1e-3", "4", "abc", "", " 2.5 ", "nan", "inf", "1e400", "0x10", "yes", "no"])


def _value_for(tp: Any) -> st.SearchStrategy[Any]:
    """Values mostly of the kind the type hint asks for (so the checks past the type are reached), or anything."""
    import dataclasses
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _value_for(args[0])
    if dataclasses.is_dataclass(tp):
        return _shaped(tp)
    if tp is bool:
        good: st.SearchStrategy[Any] = st.booleans()
    elif tp is int:
        good = st.integers(-3, 70) | st.integers()
    elif tp is float:
        good = st.floats() | st.integers(-2, 10) | _numberish
    elif origin is typing.Literal:
        good = st.sampled_from(args)
    elif origin is tuple:
        inner = args[0] if args else Any
        good = st.lists(_value_for(inner), max_size=4)
    else:
        good = st.text(max_size=10)
    return st.one_of(good, good, json_values)


@st.composite
def _shaped(draw: st.DrawFn, cls: type) -> dict[str, Any]:
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls, include_extras=True)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if draw(st.integers(0, 3)) == 0:
            out[f.name] = draw(_value_for(hints[f.name]))
    if draw(st.integers(0, 19)) == 0:
        out[draw(st.text(max_size=6))] = draw(json_scalars)  # an unknown key, now and then
    return out


def _config_classes() -> list[type]:
    from hwsi.cells.segment import SegmentConfig

    return [TrainConfig, SegmentConfig]


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
@SETTINGS
@given(st.data())
def test_config_reader_arbitrary_structures(cls: type, data: st.DataObject) -> None:
    from dataclasses import asdict

    raw = data.draw(_shaped(cls) | json_values)
    try:
        cfg = from_dict(cls, raw, "c.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("c.yaml: ") and "\n" not in str(exc)
    else:
        _assert_conforms(cfg)
        assert from_dict(cls, asdict(cfg), "again") == cfg  # what was accepted is a valid config


def _assert_conforms(obj: Any) -> None:
    """Every field of an accepted config holds a value of its declared type (and within its declared Range)."""
    import dataclasses
    import math
    import typing

    from hwsi.config import Range

    def check(tp: Any, v: Any, key: str) -> None:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is typing.Annotated:
            check(args[0], v, key)
            for r in (a for a in args[1:] if isinstance(a, Range)):
                assert r.check(v) is None, (key, v)
        elif dataclasses.is_dataclass(tp):
            _assert_conforms(v)
        elif origin is typing.Literal:
            assert v in args and type(v) in {type(a) for a in args}, (key, v)
        elif origin is tuple:
            assert isinstance(v, tuple), (key, v)
            inner = [args[0]] * len(v) if len(args) == 2 and args[1] is Ellipsis else list(args)
            assert len(inner) == len(v), (key, v)
            for i, (t, x) in enumerate(zip(inner, v)):
                check(t, x, f"{key}[{i}]")
        elif tp is float:
            assert type(v) is float and math.isfinite(v), (key, v)
        elif tp in (int, bool, str):
            assert type(v) is tp, (key, v)

    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        check(hints[f.name], getattr(obj, f.name), f.name)


@SETTINGS
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_config_file_arbitrary_bytes(data: bytes) -> None:
    p = _tmp("c.yaml", data)
    try:
        load_config(p, TrainConfig)
    except ConfigError as exc:
        assert str(p) in str(exc) and "\n" not in str(exc)


@SETTINGS
@given(doc=_shaped(TrainConfig))
def test_config_file_yaml_documents(doc: dict[str, Any]) -> None:
    p = _tmp("c.yaml", yaml.safe_dump(doc, allow_unicode=True).encode())
    try:
        cfg = load_config(p, TrainConfig)
    except ConfigError as exc:
        assert str(p) in str(exc)
    else:
        _assert_conforms(cfg)


# ----------------------------------------------------------------------------------------------- slide CSV of tile
@SETTINGS
@given(data=st.binary(max_size=200))
def test_slide_csv_arbitrary_bytes(data: bytes) -> None:
    p = _tmp("slides.csv", data)
    try:
        specs = collect_slides(p)
    except HwsiError as exc:
        assert str(p) in str(exc) and "\n" not in str(exc)
    else:
        assert all(s.mpp is None or s.mpp > 0 for s in specs)


_csv_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)


_slide_name = st.sampled_from(["a.svs", "dir/b.tiff", " c.ndpi ", "", "a.svs"]) | _csv_text
_mpp_text = _numberish | st.floats().map(repr) | st.just("")


@SETTINGS
@given(header=st.sampled_from(["slide,mpp", "Slide , MPP", "slide", "mpp,slide", "path"]),
       rows=st.lists(st.tuples(_slide_name, _mpp_text).map(list) | st.lists(_csv_text | _numberish, max_size=3),
                     max_size=5))
def test_slide_csv_arbitrary_rows(header: str, rows: list[list[str]]) -> None:
    import csv
    import io
    import math

    buf = io.StringIO()
    buf.write(header + "\n")
    csv.writer(buf).writerows(rows)
    p = _tmp("slides.csv", buf.getvalue().encode())
    try:
        specs = collect_slides(p, mpp=0.5)
    except HwsiError as exc:
        assert str(p) in str(exc) and "\n" not in str(exc)
    else:
        assert all(s.mpp is not None and math.isfinite(s.mpp) and s.mpp > 0 for s in specs)
        assert len({s.slide_id for s in specs}) == len(specs)

"""The typed config reader (hwsi.config.from_dict) and the text-file reader (hwsi.textio): the rules, one by one."""

from __future__ import annotations

import os
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from hwsi import textio
from hwsi.config import NonNegInt, PositiveFloat, from_dict, load_config
from hwsi.errors import ConfigError, InputFileError



@dataclass
class Inner:
    mode: Literal["no", "fast"] = "no"
    sizes: tuple[NonNegInt, ...] = (1, 2)


@dataclass
class Outer:
    name: str
    rate: PositiveFloat = 0.1
    steps: int = 1
    on: bool = True
    pair: tuple[float, float] = (0.0, 1.0)
    inner: Inner = field(default_factory=Inner)
    path: Path | None = None

    def validate(self) -> None:
        if self.steps > 100:
            raise ConfigError(f"steps must be <= 100, got {self.steps}")


def build(**kw: object) -> Outer:
    return from_dict(Outer, {"name": "x", **kw}, "f.yaml")


def test_accepted_values_are_converted() -> None:
    o = build(rate="1e-3", steps=3, pair=[1, 2.5], inner={"mode": "fast", "sizes": [0, 3]}, path="a/b")
    assert o.rate == 0.001 and isinstance(o.pair, tuple) and o.pair == (1.0, 2.5)
    assert o.inner == Inner("fast", (0, 3)) and o.path == Path("a/b")
    assert build(rate=2).rate == 2.0 and isinstance(build(rate=2).rate, float)


@pytest.mark.parametrize("kw,message", [
    ({"steps": "4"}, "f.yaml: steps: expected an integer, got str '4'"),
    ({"steps": True}, "f.yaml: steps: expected an integer, got bool True"),
    ({"steps": 2.5}, "f.yaml: steps: expected an integer, got float 2.5"),
    ({"rate": "fast"}, "f.yaml: rate: expected a number, got str 'fast'"),
    ({"rate": float("inf")}, "f.yaml: rate: expected a finite number"),
    ({"rate": 0}, "f.yaml: rate: must be > 0, got 0.0"),
    ({"on": "no"}, "f.yaml: on: expected true or false, got str 'no'"),
    ({"pair": 0.9}, "f.yaml: pair: expected a list of 2 items"),
    ({"pair": [1, 2, 3]}, "f.yaml: pair: expected a list of 2 items (a number, a number), got 3 item(s)"),
    ({"inner": {"mode": False}}, "f.yaml: inner.mode: expected one of 'no', 'fast', got bool False (YAML reads"),
    ({"inner": {"sizes": [1, -1]}}, "f.yaml: inner.sizes[1]: must be >= 0, got -1"),
    ({"inner": [1]}, "f.yaml: inner: expected a mapping of Inner keys, got list [1]"),
    ({"inner": {"speed": 1}}, "f.yaml: inner: unknown key(s) ['speed']; valid: ['mode', 'sizes']"),
    ({"path": 3}, "f.yaml: path: expected a path (string), got int 3"),
    ({"steps": 101}, "f.yaml: steps must be <= 100, got 101"),
])
def test_wrong_values_name_file_key_and_expected_type(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        build(**kw)
    assert str(exc.value).startswith(message), str(exc.value)


def test_missing_required_key_and_non_mapping() -> None:
    with pytest.raises(ConfigError, match=r"^f\.yaml: missing key\(s\) \['name'\]$"):
        from_dict(Outer, {}, "f.yaml")
    with pytest.raises(ConfigError, match="expected a mapping of Outer keys"):
        from_dict(Outer, [1, 2], "f.yaml")  # type: ignore[arg-type]


def test_presets_round_trip_and_formats_in_sync(tmp_path: Path) -> None:
    from hwsi.train.config import RecordsFormat, TrainConfig, load_train_config
    from hwsi.data import FORMATS

    assert set(typing.get_args(RecordsFormat)) == {"auto", *FORMATS}
    for name in ("tiny", "paper"):
        cfg = load_train_config(name)
        assert from_dict(TrainConfig, asdict(cfg)) == cfg
    p = tmp_path / "c.yaml"
    p.write_text("stage1: {lr: 1e-3, epochs: 2}\n")  # PyYAML reads 1e-3 as a string; the field is a float
    assert load_train_config(p).stage1.lr == 0.001
    p.write_text("segment: 3\n")
    from hwsi.cells.segment import SegmentConfig

    with pytest.raises(ConfigError, match=r"c\.yaml: segment: expected a mapping of SegmentConfig keys"):
        load_config(p, SegmentConfig, section="segment")


def test_presets_by_name_or_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A bare name is a shipped preset (hwsi/configs/<name>.yaml, importlib.resources); an existing file wins."""
    from importlib import resources

    from hwsi.cli import main
    from hwsi.config import preset_names, preset_path, shipped_file
    from hwsi.train.config import load_train_config

    shipped = resources.files("hwsi") / "configs"
    assert preset_names() == ["demo", "paper", "tiny"]
    assert preset_path("tiny") == shipped / "tiny.yaml" and preset_path("tiny").is_file()
    assert shipped_file("deepspeed_zero3.json").is_file()
    assert load_train_config("paper") == load_train_config(shipped / "paper.yaml")
    monkeypatch.chdir(tmp_path)
    Path("tiny").write_text("seed: 5\n")  # a file of that name, here: the path wins
    assert preset_path("tiny") == Path("tiny") and load_train_config("tiny").seed == 5
    with pytest.raises(ConfigError, match=r"^tinyy: no such file, and no preset of that name \(presets: demo, "
                                          r"paper, tiny\)$"):
        load_train_config("tinyy")
    with pytest.raises(ConfigError, match=r"tiny\.yaml: file not found"):  # a path (suffix) is never a preset
        load_train_config("tiny.yaml")
    assert main(["train", "--stage", "1", "--config", "tinyy", "--job", str(tmp_path)]) == 2
    assert "tinyy: no such file, and no preset of that name" in capsys.readouterr().err


def test_option_defaults_come_from_the_dataclass() -> None:
    from hwsi.options import default_of

    assert default_of(Outer, "rate") == 0.1 and default_of(Outer, "inner") == Inner()
    with pytest.raises(TypeError, match="Outer.name has no default"):
        default_of(Outer, "name")


def test_text_reader_names_file_line_and_byte_offset(tmp_path: Path) -> None:
    p = tmp_path / "t.txt"
    p.write_bytes(b"\xef\xbb\xbfok\nsecond \xc3\x28 line\n")
    with pytest.raises(InputFileError, match=r"t\.txt \(line 2\): not UTF-8 text: byte 0xc3 at byte offset 13"):
        textio.read_text(p)
    p.write_bytes(b"\xef\xbb\xbfok\n")
    assert textio.read_text(p) == "ok\n"  # BOM dropped
    with pytest.raises(InputFileError, match="is a folder"):
        textio.read_text(tmp_path)
    with pytest.raises(InputFileError, match="file not found"):
        textio.read_text(tmp_path / "none")
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(InputFileError, match=r"fifo\.json: not a regular file"):
        textio.read_json(tmp_path / "fifo.json")


def test_json_jsonl_csv_yaml_errors(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n\n{"b": }\n')
    with pytest.raises(InputFileError, match=r"a\.jsonl \(line 3, column 7\): not valid JSON"):
        textio.read_jsonl(p)
    p.write_text('{"a": 1}\n\n[2]\n')
    assert textio.read_jsonl(p) == [(1, {"a": 1}), (3, [2])]
    deep = tmp_path / "d.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(InputFileError, match=r"d\.json: JSON nested too deeply"):
        textio.read_json(deep)
    c = tmp_path / "t.csv"
    c.write_text(" a , b\n1,2\n\n3\n4,5,6\n")
    with pytest.raises(InputFileError, match=r"t\.csv \(line 5\): row has 3 fields but the header has 2"):
        textio.read_csv(c)
    c.write_text(" a , b\n1,2\n\n3\n")
    assert textio.read_csv(c) == (["a", "b"], [(2, {"a": "1", "b": "2"}), (4, {"a": "3", "b": ""})])
    y = tmp_path / "c.yaml"
    y.write_text("a: 1\nb: [2\n")
    with pytest.raises(InputFileError, match=r"c\.yaml \(line 3, column 1\): not valid YAML"):
        textio.read_yaml(y)
    y.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(InputFileError, match="YAML nested too deeply"):
        textio.read_yaml(y)

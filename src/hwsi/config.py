"""Dataclass configs from YAML: ``load_config(path, Cls)``, one typed reader for every config of the project.

:func:`from_dict` builds a dataclass from a (nested) mapping, driven by the dataclass's type hints. Any value that
does not fit raises :class:`~hwsi.errors.ConfigError` naming the file, the key (dotted: ``stage1.loss.scales[0]``),
the expected type and the value. The rules:

* ``int``: an integer (``true``/``false`` are not integers; neither is ``"4"`` nor ``2.5``).
* ``float``: an integer or a finite number. A string is accepted only when it is a decimal or exponent number
  such as ``"1e-3"`` -- YAML 1.2 reads ``1e-3`` as a number, PyYAML (YAML 1.1) as a string, and the preset files
  are written for both. ``.inf`` / ``.nan`` are refused.
* ``bool``: ``true`` or ``false`` only (``"no"`` as a quoted string is an error, never silently true).
* ``str``: a string. A ``Literal[...]``: one of its values (``precision: no`` unquoted is YAML's false; the
  message says to quote it).
* ``tuple[X, Y]``: a list of exactly that many items, each checked; ``tuple[X, ...]`` / ``list[X]``: a list of X.
* ``X | None``: null or X. A nested dataclass: a mapping, read by the same rules (unknown keys are an error).
* Value bounds: ``Annotated[int, Range(...)]`` (aliases :data:`PositiveInt`, :data:`NonNegInt`,
  :data:`PositiveFloat`, :data:`NonNegFloat`, :data:`UnitFloat`) are checked with the key named.
* Cross-field rules: a dataclass's ``validate()`` method (no arguments) is called once it is built; the
  :class:`ConfigError` it raises gets the file and the key of that section in front.

Presets ship inside the package, ``hwsi/configs/<name>.yaml`` (package data, found through
:mod:`importlib.resources`, so a source checkout and an installed wheel find the same files). Wherever a config
training config is asked for (``hwsi train --config``, ``PipelineConfig.train_config``,
:func:`hwsi.train.config.load_train_config`), :func:`preset_path` takes a path or a preset name: an existing file
wins; a bare name (no folder, no suffix) is a shipped preset, e.g. ``--config tiny``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from importlib import resources
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

from hwsi import textio
from hwsi.errors import ConfigError, ConfigFileError, InputFileError
from hwsi.utils.atomic import write_bytes_atomic

C = TypeVar("C")


@dataclass(frozen=True)
class Range:
    """Bounds of a number: ``lo <= v`` (``lo < v`` when ``lo_open``) and ``v <= hi`` (``v < hi`` when ``hi_open``)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def check(self, v: float) -> str | None:
        """None if ``v`` is in range, else what it must be."""
        ok = (self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)) and (
            self.hi is None or (v < self.hi if self.hi_open else v <= self.hi))
        return None if ok else f"must be {self}"

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}" if self.lo is not None else "a number"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


PositiveInt = Annotated[int, Range(0, lo_open=True)]
NonNegInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, lo_open=True)]
NonNegFloat = Annotated[float, Range(0)]
UnitFloat = Annotated[float, Range(0, 1)]  # a fraction in [0, 1]

_FLOAT_STR = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_YAML_BOOL_WORDS = ("yes", "no", "on", "off", "y", "n", "true", "false")


def _show(value: Any) -> str:
    r = repr(value)
    return f"{type(value).__name__} {r if len(r) <= 60 else r[:57] + '...'}"


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _describe(args[0])
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({_describe(args[0])})"
        return f"a list of {len(args)} items ({', '.join(_describe(a) for a in args)})"
    if origin is list:
        return f"a list of ({_describe(args[0])})" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} keys"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    """A value does not fit its type: ``key`` (relative) and the reason; turned into a ConfigError by from_dict."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason


def _join(key: str, sub: str) -> str:
    return f"{key}{sub}" if sub.startswith("[") or not key else f"{key}.{sub}"


def _coerce(tp: Any, value: Any, key: str, where: str) -> Any:
    """``value`` as type ``tp``; raises _Mismatch (or ConfigError from a nested dataclass)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        out = _coerce(args[0], value, key, where)
        for meta in args[1:]:
            if isinstance(meta, Range) and (msg := meta.check(out)):
                raise _Mismatch(key, f"{msg}, got {out!r}")
        return out
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise _Mismatch(key, f"expected {_describe(tp)}, got {_show(value)}")
        return from_dict(tp, value, where, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        reasons = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(a, value, key, where)
            except _Mismatch as exc:
                reasons.append(exc)
        if len(reasons) == 1:
            raise reasons[0]
        raise _Mismatch(key, f"expected {_describe(tp)}, got {_show(value)}")
    if origin is Literal:
        for a in args:
            if type(value) is type(a) and value == a:
                return a
        hint = ""
        if isinstance(value, bool) and any(isinstance(a, str) and a.lower() in _YAML_BOOL_WORDS for a in args):
            hint = " (YAML reads an unquoted no/yes/on/off as true/false: quote it)"
        raise _Mismatch(key, f"expected {_describe(tp)}, got {_show(value)}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(key, f"expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch(key, f"expected an integer, got {_show(value)}")
    if tp is float:
        out: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value) if abs(value) < 1e308 or isinstance(value, float) else math.inf
        elif isinstance(value, str) and _FLOAT_STR.match(value.strip()):
            out = float(value)
        if out is None:
            raise _Mismatch(key, f"expected a number, got {_show(value)}")
        if not math.isfinite(out):
            raise _Mismatch(key, f"expected a finite number, got {_show(value)}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(key, f"expected a string, got {_show(value)}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _Mismatch(key, f"expected a path (string), got {_show(value)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(key, f"expected {_describe(tp)}, got {_show(value)}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Mismatch(key, f"expected {_describe(tp)}, got {len(value)} item(s): {_show(value)}")
            return tuple(_coerce(a, v, _join(key, f"[{i}]"), where) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, _join(key, f"[{i}]"), where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch(key, f"expected a mapping, got {_show(value)}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(kt, k, key, where): _coerce(vt, v, _join(key, str(k)), where) for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch(key, f"expected {_describe(tp)}, got {_show(value)}")


def _error(where: str, key: str, reason: str) -> ConfigError:
    loc = ": ".join(x for x in (where, key) if x)
    return ConfigError(f"{loc}: {reason}" if loc else reason)


def from_dict(cls: type[C], data: Mapping[str, Any], where: str = "", key: str = "") -> C:
    """Build dataclass ``cls`` from a (nested) mapping by the rules of the module docstring.

    ``where`` names the source in messages (the file); ``key`` is the dotted key of this section inside it.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    where = where or cls.__name__
    if not isinstance(data, Mapping):
        raise _error(where, key, f"expected {_describe(cls)}, got {_show(data)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise _error(where, key, f"unknown key(s) {sorted(map(str, unknown))}; valid: {sorted(fields)}")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise _error(where, key, f"missing key(s) {missing}")
    kw: dict[str, Any] = {}
    for name, value in data.items():
        try:
            kw[name] = _coerce(hints[name], value, _join(key, name), where)
        except _Mismatch as exc:
            raise _error(where, exc.key, exc.reason) from None
    try:
        obj = cls(**kw)
        validate = getattr(obj, "validate", None)
        if callable(validate):
            validate()
    except ConfigError as exc:
        raise _error(where, key, str(exc)) from None
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def read_yaml(path: str | Path, error: type[Exception] = ConfigError) -> Any:
    """Parse a YAML file (UTF-8, via :mod:`hwsi.textio`); a missing file or bad YAML raises ``error`` naming it."""
    try:
        return textio.read_yaml(path, ConfigFileError)
    except InputFileError as exc:
        if isinstance(exc, error):
            raise
        raise error(str(exc)) from None


def preset_names() -> list[str]:
    """Names of the YAML presets shipped in the package (``hwsi/configs/<name>.yaml``)."""
    return sorted(p.name.removesuffix(".yaml") for p in _presets_dir().iterdir() if p.name.endswith(".yaml"))


def shipped_file(name: str) -> Path:
    """A file of the package's ``configs/`` folder by its file name (e.g. ``deepspeed_zero3.json``)."""
    return _presets_dir() / name


def _presets_dir() -> Path:
    d = resources.files("hwsi") / "configs"
    if not isinstance(d, Path):  # hwsi is installed as files (a wheel or a checkout), never run from a zip
        raise ConfigFileError(str(d), "hwsi's presets are not files on disk")
    return d


def preset_path(path_or_name: str | Path) -> Path:
    """The config file meant by ``path_or_name``: the path itself when it exists (a path wins), else the shipped
    preset of that name when it is a bare name (no folder, no suffix: ``tiny`` -> ``hwsi/configs/tiny.yaml``).
    Anything else comes back as given, for the reader to report as a missing file; an unknown bare name is a
    :class:`~hwsi.errors.ConfigFileError` listing the presets."""
    p = Path(path_or_name)
    if p.exists() or p.suffix or len(p.parts) != 1:  # a folder is reported by the reader
        return p
    cand = _presets_dir() / f"{p.name}.yaml"
    if cand.is_file():
        return cand
    raise ConfigFileError(p, f"no such file, and no preset of that name (presets: {', '.join(preset_names())})")


def load_config(path: str | Path, cls: type[C], section: str | None = None) -> C:
    """Read YAML ``path`` (optionally one top-level ``section``) into dataclass ``cls``."""
    path = Path(path)
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of {cls.__name__} keys at the top level, got {_show(data)}")
    if section is not None:
        data = data.get(section)
        if data is None:
            data = {}
    return from_dict(cls, data, str(path), section or "")


def save_config(cfg: Any, path: str | Path) -> None:
    import yaml

    write_bytes_atomic(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False).encode("utf-8"))

"""Dataclass configs from YAML: ``load_config(path, Cls)``; unknown keys are an error naming the file and key."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hwsi.errors import ConfigError

C = TypeVar("C")


def from_dict(cls: type[C], data: dict[str, Any], where: str = "") -> C:
    """Build dataclass ``cls`` from a (nested) dict, rejecting unknown keys."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {sorted(unknown)}; valid: {sorted(fields)}")
    kw: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            kw[name] = from_dict(tp, value, f"{where}.{name}" if where else name)  # type: ignore[arg-type]
        else:
            kw[name] = tuple(value) if typing.get_origin(tp) is tuple and isinstance(value, list) else value
    return cls(**kw)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def read_yaml(path: str | Path, error: type[Exception] = ConfigError) -> Any:
    """Parse a YAML file; a missing file or bad YAML raises ``error`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML ({exc})") from exc


def load_config(path: str | Path, cls: type[C], section: str | None = None) -> C:
    """Read YAML ``path`` (optionally one top-level ``section``) into dataclass ``cls``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = read_yaml(path) or {}
    if section is not None:
        data = data.get(section, {})
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return from_dict(cls, data, str(path))


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

"""Command-line options: checks of numeric values as typer callbacks, and defaults taken from the config dataclass.

    target_mpp: float = typer.Option(0.5, callback=positive_number)
    k: int = typer.Option(default_of(ExtractConfig, "k"), "--k")   # one default, the dataclass's

``hwsi.cli.main`` prints it as ONE line, e.g. ``error: hwsi tile: Invalid value for '--mpp': must be a finite number
> 0, got inf``, and exits with code 2 (typer itself accepts ``inf`` and ``nan`` for a float option).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import typer


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (a ``default_factory`` is called), so that a command's
    option default IS its config's and cannot drift from it. A field without a default is a TypeError."""
    f = cls.__dataclass_fields__[name]  # type: ignore[attr-defined]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"{cls.__name__}.{name} has no default")


def positive_number(value: float | None) -> float | None:
    """A finite number > 0 (or the option left unset)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number > 0, got {value!r}")
    return value


def fraction(value: float | None) -> float | None:
    """A number in [0, 1] (or unset)."""
    if value is not None and not 0 <= value <= 1:
        raise typer.BadParameter(f"must be a number in [0, 1], got {value!r}")
    return value


def open_fraction(value: float | None) -> float | None:
    """A number in [0, 1) (or unset)."""
    if value is not None and not 0 <= value < 1:
        raise typer.BadParameter(f"must be a number in [0, 1), got {value!r}")
    return value


def positive_int(value: int | None) -> int | None:
    """An integer >= 1 (or unset)."""
    if value is not None and value < 1:
        raise typer.BadParameter(f"must be an integer >= 1, got {value!r}")
    return value

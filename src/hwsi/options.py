"""Checks of numeric command-line options, as typer callbacks: a bad value is a usage error naming the option.

    target_mpp: float = typer.Option(0.5, callback=positive_number)

``hwsi.cli.main`` prints it as ONE line, e.g. ``error: hwsi tile: Invalid value for '--mpp': must be a finite number
> 0, got inf``, and exits with code 2 (typer itself accepts ``inf`` and ``nan`` for a float option).
"""

from __future__ import annotations

import math

import typer


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

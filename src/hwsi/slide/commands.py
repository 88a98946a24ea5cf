"""CLI commands of hwsi.slide (registered by hwsi.cli)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the hwsi app."""

"""Errors that name the file and say what is wrong with it."""

from __future__ import annotations

from pathlib import Path


class HwsiError(Exception):
    """Base class of every error hwsi raises on purpose (bad input, bad config)."""


class SlideError(HwsiError):
    """A slide cannot be used. The message names the file and the reason, and may say how to fix it."""

    def __init__(self, path: str | Path, reason: str, hint: str | None = None) -> None:
        self.path = str(path)
        self.reason = reason
        self.hint = hint
        msg = f"{self.path}: {reason}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class StoreError(HwsiError):
    """A per-slide HDF5 store is missing, incomplete or of another schema version."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConfigError(HwsiError):
    """A configuration value or file is invalid."""

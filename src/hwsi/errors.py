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


class InputFileError(HwsiError):
    """An input file cannot be read as what it should be. Names the file, where in it (line, byte offset, row,
    record) when known, and the reason: ``"FILE (line 3): not valid JSON: ..."``."""

    def __init__(self, path: str | Path, reason: str, where: str | None = None) -> None:
        self.path = str(path)
        self.reason = reason
        self.where = where
        loc = f"{self.path} ({where})" if where else self.path
        # one line, whatever the file put in an id or value quoted here
        super().__init__(f"{loc}: {reason}".replace("\r", "\\r").replace("\n", "\\n"))


class ConfigFileError(InputFileError, ConfigError):
    """A configuration file cannot be read (missing, not UTF-8, not valid YAML); also a :class:`ConfigError`."""

"""Shared fixtures. Real files written by others live in ../shared/data (never copied into this repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path | None:
    env = os.environ.get("HWSI_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "data", REPO.parent.parent / "shared" / "data"]
    for c in candidates:
        if (c / "README.md").is_file():
            return c
    return None


SHARED_DATA = _shared_data()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real test files; tests using it skip with a clear reason where it is absent."""
    if SHARED_DATA is None:
        pytest.skip("../shared/data (real slides, tiles, text) is not present next to this checkout")
    return SHARED_DATA

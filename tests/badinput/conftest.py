"""Shared helpers of the bad-input corpus: run the real CLI in-process, check the ONE-line error contract."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


def one_line_error(rc: int, err: str, expected_rc: int, *needles: str) -> str:
    """Assert exit code ``expected_rc``, no traceback, exactly one non-empty stderr line containing every needle;
    return that line."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {lines}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert rc == expected_rc, f"exit code {rc}, expected {expected_rc}; stderr: {lines[0]}"
    return lines[0]


@pytest.fixture
def assert_one_line_error() -> Callable[..., str]:
    """``assert_one_line_error(rc, err, expected_rc, *needles)``: see :func:`one_line_error`."""
    return one_line_error


@pytest.fixture
def hwsi(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``hwsi(*args) -> (exit code, stdout, stderr)`` of ``hwsi.cli.main`` run in this process."""
    from hwsi.cli import main

    def run(*args: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err

    return run

"""The one place that prepares an output folder (a job folder, ``--out``) before a command writes to it.

:func:`prepare_output_dir` creates the folder and its sub-folders, proves each writable by creating and deleting a
probe file (permission bits alone do not tell: root, read-only mounts, immutable folders), and deletes the
temporaries of killed runs (:func:`hwsi.utils.atomic.remove_stale_tmp`). Anything wrong is ONE
:class:`~hwsi.errors.HwsiError` naming the folder and the reason, raised before any work starts.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from hwsi.errors import HwsiError
from hwsi.utils.atomic import remove_stale_tmp


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _make_writable_dir(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise HwsiError(f"{path}: is an existing file, not a folder (the {what} must be a folder)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HwsiError(f"{path}: cannot create the {what} ({_reason(exc)})") from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".hwsi-write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise HwsiError(f"{path}: the {what} is not writable ({_reason(exc)})") from exc


def prepare_output_dir(path: str | Path, subdirs: Sequence[str] = (), what: str = "output folder") -> Path:
    """Create ``path`` and ``path/<subdir>`` for each of ``subdirs``, check they are writable, remove stale
    temporaries in each; returns ``path``. Raises HwsiError (one line: folder + reason) when it cannot."""
    path = Path(path)
    _make_writable_dir(path, what)
    remove_stale_tmp(path)
    for sub in subdirs:
        d = path / sub
        _make_writable_dir(d, f"{what}'s {sub}/ folder")
        remove_stale_tmp(d)
    return path

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


def _probe(folder: Path) -> None:
    fd, probe = tempfile.mkstemp(prefix=".hwsi-write-probe-", dir=folder)
    os.close(fd)
    os.unlink(probe)


def _make_writable_dir(path: Path, what: str, create: bool = True) -> None:
    if path.exists() and not path.is_dir():
        raise HwsiError(f"{path}: is an existing file, not a folder (the {what} must be a folder)")
    if not create and not path.exists():  # check only: the nearest existing folder above must take it
        above = next((a for a in path.absolute().parents if a.exists()), None)
        if above is None or not above.is_dir():
            raise HwsiError(f"{path}: cannot create the {what} ({above} is a file, not a folder)")
        try:
            _probe(above)
        except OSError as exc:
            raise HwsiError(f"{path}: cannot create the {what} ({above}: {_reason(exc)})") from exc
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HwsiError(f"{path}: cannot create the {what} ({_reason(exc)})") from exc
    try:
        _probe(path)
    except OSError as exc:
        raise HwsiError(f"{path}: the {what} is not writable ({_reason(exc)})") from exc


def prepare_output_dir(path: str | Path, subdirs: Sequence[str] = (), what: str = "output folder",
                       *, create: bool = True) -> Path:
    """Create ``path`` and ``path/<subdir>`` for each of ``subdirs``, check they are writable, remove stale
    temporaries in each; returns ``path``. Raises HwsiError (one line: folder + reason) when it cannot.

    ``create=False`` only checks (for a command that validates the rest of its input first): an existing folder
    must be writable, a missing one creatable (its nearest existing parent a writable folder); nothing is made."""
    path = Path(path)
    _make_writable_dir(path, what, create)
    if not path.is_dir():
        return path
    remove_stale_tmp(path)
    for sub in subdirs:
        d = path / sub
        _make_writable_dir(d, f"{what}'s {sub}/ folder")
        remove_stale_tmp(d)
    return path

"""Atomic output: write to a temporary name beside the target, rename when complete.

A temporary file is named ``<name>.tmp-<pid>-<token>@<host>``: the process that writes it, a random token (two
writers of one target never share a temporary), and the machine. A process killed mid-write leaves only such a
file behind, never a file that looks finished; :func:`remove_stale_tmp` deletes those whose writer is dead and
leaves alone the temporaries of running processes (on this machine or, since their liveness cannot be seen, on
another one sharing the folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_TMP_RE = re.compile(r"\.tmp-(?P<pid>\d+)(?:-(?P<token>[0-9a-f]+)@(?P<host>[A-Za-z0-9._-]*))?$")


def host_name() -> str:
    """This machine's name as it appears in temporary file names (characters outside ``[A-Za-z0-9._-]`` → ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def tmp_path_for(path: Path) -> Path:
    """A fresh temporary sibling of ``path`` owned by this process (see the module docstring)."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}@{host_name()}")


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists on this machine (also when it belongs to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tmp_owner_dead(path: str | Path) -> bool:
    """True only if ``path`` is a temporary file name of this module whose writer is known to be dead.

    Names without a host (``<name>.tmp-<pid>``, older hwsi) count as written on this machine; a temporary of
    another machine is never called dead (its process cannot be seen from here).
    """
    m = _TMP_RE.search(Path(path).name)
    if m is None:
        return False
    host = m.group("host")
    if host is not None and host != host_name():
        return False
    pid = int(m.group("pid"))
    return pid != os.getpid() and not pid_alive(pid)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success fsync and rename it to ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def remove_stale_tmp(folder: str | Path) -> list[Path]:
    """Delete the temporaries in ``folder`` whose writer is dead (:func:`tmp_owner_dead`); returns what was removed.

    Temporaries of running processes — another `hwsi` run on the same job — are left alone.
    """
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob("*.tmp-*"):
        if not p.is_file() or not tmp_owner_dead(p):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed

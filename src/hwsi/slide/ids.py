"""Slide ids: the one rule that names the slides of a job (``JOB/stores/<id>.h5``, ``slides.json``, the viewer).

An id depends only on the SET of slide files (never on the order they are listed in) and on the ids the job
already holds:

1. a file the job already knows (``slides.json``, or a store's ``slide_path``) keeps its id;
2. otherwise the id is the file name without its slide extension (``x.svs`` → ``x``);
3. where that id is claimed by more than one file — another input, or a file the job already holds — every
   claimant takes its whole file name instead (``x.svs``, ``x.tiff``);
4. where whole names still clash (``a/x.svs`` and ``b/x.svs``), the name plus 8 hex digits of the SHA-1 of the
   resolved path (``x.svs-1a2b3c4d``).

Ids are compared case-insensitively (stores on a case-insensitive file system must not overwrite each other).
The same file named twice (a CSV listing it twice, a symlink beside its target) is one slide: files are keyed by
their resolved path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from hwsi.errors import HwsiError
from hwsi.slide.open import slide_id_for

MAX_LEVEL = 2


def path_key(path: str | Path) -> str:
    """The identity of a slide file: its absolute path with symlinks resolved (as stored in ``slides.json``)."""
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def candidate_id(path: Path, level: int) -> str:
    """The id of ``path`` at rule ``level`` (0 = stem, 1 = file name, 2 = file name + path hash)."""
    stem = slide_id_for(path)
    if level == 0 and stem:
        return stem
    if level <= 1:
        return path.name
    return f"{path.name}-{hashlib.sha1(path_key(path).encode()).hexdigest()[:8]}"


def allocate_ids(paths: Iterable[Path], taken: Mapping[str, str] | None = None) -> dict[str, str]:
    """Ids for ``paths`` as ``{path_key: id}``; ``taken`` is ``{id: path_key}`` of the slides the job already holds.

    Deterministic: the result does not depend on the order of ``paths`` (see the module docstring for the rule).
    """
    taken = dict(taken or {})
    by_key: dict[str, Path] = {}
    for p in map(Path, paths):  # one file named two ways: the smallest spelling names it (order-independent)
        k = path_key(p)
        if k not in by_key or str(p) < str(by_key[k]):
            by_key[k] = p
    owner = {i.casefold(): k for i, k in sorted(taken.items())}  # id -> the file that holds it
    out: dict[str, str] = {}
    for i, k in sorted(taken.items(), reverse=True):  # a known file keeps its id (the smallest one if several)
        if k in by_key:
            out[k] = i
    level = {k: 0 for k in by_key if k not in out}
    while True:
        ids = {k: candidate_id(by_key[k], lv) for k, lv in level.items()}
        claims: dict[str, set[str]] = {}
        for k, i in ids.items():
            claims.setdefault(i.casefold(), set()).add(k)
        clash: set[str] = set()
        for i, ks in claims.items():
            held = owner.get(i)
            if len(ks) > 1 or (held is not None and held not in ks):
                clash |= ks
        if not clash:
            break
        for k in sorted(clash):
            if level[k] >= MAX_LEVEL:
                raise HwsiError(f"{by_key[k]}: cannot give it a slide id of its own ({ids[k]!r} is taken)")
            level[k] += 1
    out.update(ids)
    return out

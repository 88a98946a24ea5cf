"""Which slides a `hwsi serve` job exposes: those with a store in ``JOB/stores`` (and nothing else).

A request names a slide by its id; the id is looked up in :class:`SlideRegistry` (a dict built from the job
folder), so no part of a request ever becomes a filesystem path. The source path of each slide comes from
``JOB/slides.json`` (written by `hwsi tile`) or, failing that, from the store's ``slide_path`` attribute.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwsi.store import list_stores, read_store_meta


@dataclass(frozen=True)
class SlideEntry:
    """One slide a job serves: its id, store, source file and level-0 geometry (from the store's attributes)."""

    slide_id: str
    store: Path
    source: Path
    mpp: float
    width: int
    height: int
    stages: tuple[str, ...]


def _registry_paths(job: Path) -> dict[str, dict[str, Any]]:
    """``slides.json`` as ``{slide_id: {"path": ..., "mpp": ...}}``; accepts a dict or a list of records."""
    path = job / "slides.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if isinstance(data, dict) and isinstance(data.get("slides"), (list, dict)):
        data = data["slides"]
    out: dict[str, dict[str, Any]] = {}
    if isinstance(data, dict):
        for sid, rec in data.items():
            if isinstance(rec, str):
                out[str(sid)] = {"path": rec}
            elif isinstance(rec, dict):
                out[str(sid)] = rec
    elif isinstance(data, list):
        for rec in data:
            if isinstance(rec, dict) and "slide_id" in rec:
                out[str(rec["slide_id"])] = rec
    return out


def _source_of(rec: dict[str, Any]) -> str | None:
    for key in ("path", "source", "slide_path", "source_path"):
        if isinstance(rec.get(key), str):
            return rec[key]
    return None


class SlideRegistry:
    """The slides of one job folder, keyed by slide id. :meth:`get` is the only way from an id to files."""

    def __init__(self, job: str | Path) -> None:
        self.job = Path(job).resolve()
        self._lock = threading.Lock()
        self._entries: dict[str, SlideEntry] = {}
        self.skipped: dict[str, str] = {}
        self.refresh()

    def refresh(self) -> None:
        """Rescan ``JOB/stores`` and ``JOB/slides.json`` (stores that cannot be read are listed in :attr:`skipped`)."""
        reg = _registry_paths(self.job)
        entries: dict[str, SlideEntry] = {}
        skipped: dict[str, str] = {}
        for store in list_stores(self.job):
            try:
                meta = read_store_meta(store)
            except Exception as exc:  # a broken store is reported, never served
                skipped[store.stem] = str(exc)
                continue
            sid = meta.slide_id or store.stem
            if sid != store.stem:  # the store file name is the id (ARCHITECTURE.md); trust the file name
                sid = store.stem
            rec = reg.get(sid, {})
            src = _source_of(rec) or meta.slide_path
            source = Path(src)
            if not source.is_absolute():
                source = (self.job / source).resolve()
            mpp = float(rec.get("mpp") or meta.mpp_level0)
            entries[sid] = SlideEntry(
                sid, store, source, mpp, int(meta.level0_width), int(meta.level0_height), tuple(meta.stages)
            )
        with self._lock:
            self._entries = entries
            self.skipped = skipped

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def get(self, slide_id: str) -> SlideEntry | None:
        """The entry of ``slide_id`` or ``None``: exact dictionary lookup, no path handling of the id at all."""
        if not isinstance(slide_id, str):
            return None
        with self._lock:
            return self._entries.get(slide_id)

"""The job manifest ``JOB/manifest.csv`` and ``JOB/summary.md``: what every worker did to every slide.

Concurrent writers: each worker (process) appends its rows to its OWN part file,
``JOB/.manifest/<stage>.<host>.<pid>.<token>.csv``, one fsynced line per slide (only that worker ever writes it,
so no row can be lost to a race; a line still being written is dropped by readers until it is whole). The merged ``manifest.csv`` and ``summary.md`` are rebuilt from all
parts under one lock (``JOB/.locks/manifest.lock``) and written atomically (temporary + rename): a writer reads
every part while holding the lock, and every worker writes its part BEFORE it takes the lock, so the last rebuild
of a job holds every row. Rebuilding is throttled (every 5 s, or half a second per part when there are many) and always done when a worker
ends;
one part per worker (not one file per slide) keeps a rebuild at a few files to read, whatever the cohort's size.

``manifest.csv`` columns: ``slide, stage, status, seconds, error, host, pid, shard, note, finished`` — one row per
(slide, stage), the latest (``finished``, ISO time) across all runs of the job, except that a later "skipped"
never hides the "done" or "failed" row of the worker that did or tried the work.
"""

from __future__ import annotations

import csv
import io
import os
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hwsi.utils.atomic import host_name, write_bytes_atomic
from hwsi.utils.lock import file_lock

MANIFEST_DIR = ".manifest"
COLUMNS = ("slide", "stage", "status", "seconds", "error", "host", "pid", "shard", "note", "finished")  # finished
# last: a line cut short while being appended never ends in a whole timestamp, so readers can tell
STATUSES = ("done", "skipped", "failed")
_FINISHED_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@dataclass(frozen=True)
class Worker:
    """The process writing rows: where it runs, and its shard (``i/N``) with what set it."""

    host: str
    pid: int
    shard: str
    shard_source: str

    @classmethod
    def here(cls, shard: str, shard_source: str) -> Worker:
        return cls(host_name(), os.getpid(), shard, shard_source)


def _csv(rows: Sequence[dict[str, str]]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a manifest or manifest part (a missing or unreadable file: no rows)."""
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            rows = [{c: r.get(c) or "" for c in COLUMNS} for r in csv.DictReader(fh)]
    except (OSError, csv.Error):
        return []
    return [r for r in rows if r["status"] in STATUSES and _FINISHED_RE.match(r["finished"])]


def merge_rows(rows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """One row per (slide, stage): the latest by ``finished``; a later "skipped" keeps an earlier "done" or
    "failed" (the row of the worker that did, or tried, the work)."""
    best: dict[tuple[str, str], dict[str, str]] = {}
    for r in sorted(rows, key=lambda r: r["finished"]):
        key = (r["slide"], r["stage"])
        cur = best.get(key)
        if cur is not None and r["status"] == "skipped" and cur["status"] in ("done", "failed"):
            continue
        best[key] = r
    return sorted(best.values(), key=lambda r: (r["stage"], r["slide"]))


class Manifest:
    """The rows of one worker for one stage; :meth:`add` records a slide, :meth:`publish` rebuilds the job files."""

    def __init__(self, job: Path, stage: str, worker: Worker, slide_ids: Sequence[str],
                 rebuild_every_s: float = 5.0) -> None:
        self.job, self.stage, self.worker = Path(job), stage, worker
        self.slide_ids = list(slide_ids)
        self.rows: list[dict[str, str]] = []
        self.part = self.job / MANIFEST_DIR / f"{stage}.{worker.host}.{worker.pid}.{secrets.token_hex(4)}.csv"
        self.rebuild_every_s = rebuild_every_s
        self._interval_s = rebuild_every_s
        self._last_rebuild = 0.0

    def add(self, slide_id: str, status: str, seconds: float, error: str = "", note: str = "") -> None:
        """Record one slide in this worker's part and rebuild the job files when due.

        The part is created atomically with its header and then appended to, one flushed and fsynced line per
        slide (a reader may meet a last line still being written: :func:`read_rows` drops a row that is not whole,
        the next rebuild has it)."""
        now = time.time()
        row = {
            "slide": slide_id, "stage": self.stage, "status": status, "seconds": f"{seconds:.3f}",
            "error": " ".join(error.split()), "host": self.worker.host, "pid": str(self.worker.pid),
            "shard": self.worker.shard, "finished": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now * 1e6) % 1_000_000:06d}Z", "note": " ".join(note.split()),
        }
        if not self.rows:
            write_bytes_atomic(self.part, _csv([]))
        self.rows.append(row)
        with open(self.part, "ab") as fh:
            fh.write(_csv([row]).split(b"\n", 1)[1])
            fh.flush()
            os.fsync(fh.fileno())
        if time.monotonic() - self._last_rebuild >= self._interval_s:
            self.publish()

    def publish(self) -> Path:
        """Rebuild ``manifest.csv`` and ``summary.md`` from every worker's part, under the manifest lock. The next
        rebuild is due after ``rebuild_every_s`` or half a second per part read, whichever is longer (64 workers:
        one rebuild per worker every 32 s, so the lock stays mostly free)."""
        self._last_rebuild = time.monotonic()
        with file_lock(self.job / ".locks" / "manifest.lock"):
            parts = sorted((self.job / MANIFEST_DIR).glob("*.csv"))
            rows = [r for p in parts for r in read_rows(p)]
            merged = merge_rows(rows)
            write_bytes_atomic(self.job / "manifest.csv", _csv(merged))
            write_bytes_atomic(self.job / "summary.md", summary_markdown(merged, rows, self).encode("utf-8"))
        self._interval_s = max(self.rebuild_every_s, 0.5 * len(parts))
        return self.job / "manifest.csv"


def _table(header: Sequence[str], body: Sequence[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return out


def summary_markdown(merged: Sequence[dict[str, str]], all_rows: Sequence[dict[str, str]], writer: Manifest) -> str:
    """``summary.md``: per stage counts and time, per worker rows, failures and takeovers."""
    lines = ["# hwsi job summary", "",
             f"Rewritten {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} by {writer.worker.host}:"
             f"{writer.worker.pid} (shard {writer.worker.shard}, from {writer.worker.shard_source}); rows: "
             "manifest.csv.", ""]
    stages = sorted({r["stage"] for r in merged})
    body = []
    for st in stages:
        rs = [r for r in merged if r["stage"] == st]
        n = {s: sum(r["status"] == s for r in rs) for s in STATUSES}
        done_s = sum(float(r["seconds"] or 0) for r in rs if r["status"] == "done")
        pending = (len(set(writer.slide_ids) - {r["slide"] for r in rs}) if st == writer.stage else "")
        body.append([st, len(rs), n["done"], n["skipped"], n["failed"], pending, f"{done_s:.1f}",
                     f"{done_s / n['done']:.2f}" if n["done"] else ""])
    lines += _table(["stage", "slides", "done", "skipped", "failed", "not yet in manifest", "seconds (done)",
                     "s/slide (done)"], body) + [""]
    workers: dict[tuple[str, str, str, str], list[dict[str, str]]] = {}
    for r in all_rows:
        workers.setdefault((r["stage"], r["host"], r["pid"], r["shard"]), []).append(r)
    wbody = [[st, h, p, sh, sum(r["status"] == "done" for r in rs), sum(r["status"] == "failed" for r in rs),
              f"{sum(float(r['seconds'] or 0) for r in rs):.1f}", min(r["finished"] for r in rs),
              max(r["finished"] for r in rs)] for (st, h, p, sh), rs in sorted(workers.items())]
    lines += ["## Workers", ""] + _table(["stage", "host", "pid", "shard", "done", "failed", "seconds",
                                          "first row", "last row"], wbody) + [""]
    failed = [r for r in merged if r["status"] == "failed"]
    if failed:
        lines += ["## Failed slides", ""] + [f"- `{r['slide']}` ({r['stage']}): {r['error']} — "
                                              f"errors/{r['slide']}.{r['stage']}.json" for r in failed] + [""]
    notes = [r for r in all_rows if r["note"]]
    if notes:
        lines += ["## Notes (takeovers of stale claims, claims lost)", ""]
        lines += [f"- `{r['slide']}` ({r['stage']}) by {r['host']}:{r['pid']}: {r['note']}" for r in notes] + [""]
    return "\n".join(lines)

"""TRIDENT-style batch semantics shared by every per-slide command (`hwsi tile`, `hwsi extract`, ...).

A job folder holds one output per slide. The runner

* skips slides whose output is already complete (``is_done``),
* runs each remaining slide in isolation: an exception fails that slide alone, is recorded as JSON in
  ``JOB/errors/<slide_id>.<stage>.json`` (slide, stage, error type, message, time) and the batch goes on,
* removes the error record of a slide that later succeeds,
* prints a summary table, and returns a :class:`BatchResult` whose ``exit_code`` is non-zero if any slide failed.

The job folder is prepared first (:func:`prepare_job`: created, proved writable, temporaries of killed runs
removed) so an unusable folder is one error line before any work. Several processes may run on one job: each
slide is claimed with a lock (``JOB/.locks/<slide_id>.<stage>.lock``); a slide another process is working on is
deferred to the end of the batch, then waited for and checked again (usually "already complete"). So two runs
on one job both finish, and no slide is done twice at once.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from hwsi.errors import HwsiError
from hwsi.utils.atomic import write_json_atomic
from hwsi.utils.lock import file_lock
from hwsi.utils.outdir import prepare_output_dir

T = TypeVar("T")


@dataclass
class SlideOutcome:
    slide_id: str
    status: str  # "done" | "skipped" | "failed"
    seconds: float = 0.0
    message: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchResult:
    stage: str
    outcomes: list[SlideOutcome]

    @property
    def failed(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "skipped": 0, "failed": 0}
        for o in self.outcomes:
            out[o.status] = out.get(o.status, 0) + 1
        return out


@dataclass
class BatchItem(Generic[T]):
    slide_id: str
    payload: T
    source: str = ""


JOB_SUBDIRS = ("stores", "errors", ".locks")


def error_record_path(job: Path, slide_id: str, stage: str) -> Path:
    return Path(job) / "errors" / f"{slide_id}.{stage}.json"


def lock_path(job: Path, name: str) -> Path:
    """The lock file of ``name`` (a slide and stage, or a shared file such as ``slides.json``) in ``job``."""
    return Path(job) / ".locks" / f"{name}.lock"


def prepare_job(job: str | Path, extra: tuple[str, ...] = ()) -> Path:
    """Create the job folder and its stores/, errors/ (and ``extra``) folders, writable, without stale temporaries
    (:func:`hwsi.utils.outdir.prepare_output_dir`); raises HwsiError naming the folder when it cannot."""
    return prepare_output_dir(job, JOB_SUBDIRS + tuple(extra), "job folder")


def run_batch(
    items: Sequence[BatchItem[T]],
    job: str | Path,
    stage: str,
    process: Callable[[BatchItem[T]], dict[str, Any] | None],
    is_done: Callable[[BatchItem[T]], bool],
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    console: Any | None = None,
) -> BatchResult:
    """Run ``process`` on every item not yet done; record failures; never let one slide stop the batch."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    job = prepare_job(job)
    console = console or Console(stderr=True)
    outcomes: dict[int, SlideOutcome] = {}

    def run_one(item: BatchItem[T]) -> SlideOutcome:
        err_path = error_record_path(job, item.slide_id, stage)
        if not overwrite and is_done(item):
            return SlideOutcome(item.slide_id, "skipped", message="already complete")
        t0 = time.perf_counter()
        try:
            info = process(item) or {}
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one slide's failure must not stop the batch
            dt = time.perf_counter() - t0
            record = {
                "slide": item.slide_id,
                "source": item.source,
                "stage": stage,
                "error": type(exc).__name__,
                "message": str(exc),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(dt, 3),
            }
            if not isinstance(exc, HwsiError):
                record["traceback"] = traceback.format_exc()
            write_json_atomic(err_path, record)
            return SlideOutcome(item.slide_id, "failed", dt, f"{type(exc).__name__}: {exc}")
        err_path.unlink(missing_ok=True)
        return SlideOutcome(item.slide_id, "done", time.perf_counter() - t0, info=info)

    with Progress(
        TextColumn(f"[bold]{stage}[/] {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not show_progress,
        transient=False,
    ) as progress:
        task = progress.add_task("", total=len(items))
        deferred: list[int] = []
        for n, item in enumerate(items):
            progress.update(task, description=item.slide_id)
            with file_lock(lock_path(job, f"{item.slide_id}.{stage}"), blocking=False) as held:
                if not held:  # another process is on it: come back at the end
                    deferred.append(n)
                    continue
                outcomes[n] = run_one(item)
            progress.advance(task)
        for n in deferred:
            item = items[n]
            progress.update(task, description=f"{item.slide_id} (waiting for another process)")
            with file_lock(lock_path(job, f"{item.slide_id}.{stage}")):
                outcomes[n] = run_one(item)
            progress.advance(task)
    result = BatchResult(stage, [outcomes[n] for n in sorted(outcomes)])
    print_summary(result, console)
    return result


def print_summary(result: BatchResult, console: Any) -> None:
    """The summary table, the counts, then ONE unwrapped line per failed slide: ``failed: <id> (<stage>): <why>``."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"hwsi {result.stage}: summary")
    table.add_column("slide")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("detail")
    colours = {"done": "green", "skipped": "cyan", "failed": "red"}
    for o in result.outcomes:
        detail = o.message or ", ".join(f"{k}={v}" for k, v in o.info.items())
        table.add_row(escape(o.slide_id), f"[{colours[o.status]}]{o.status}[/]", f"{o.seconds:.2f}", escape(detail))
    console.print(table)
    c = result.counts()
    console.print(f"{c['done']} done, {c['skipped']} skipped, {c['failed']} failed")
    for o in result.failed:
        line = " ".join(f"failed: {o.slide_id} ({result.stage}): {o.message}".split())
        console.print(line, markup=False, highlight=False, soft_wrap=True)

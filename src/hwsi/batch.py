"""TRIDENT-style batch semantics shared by every per-slide command (`hwsi tile`, `hwsi extract`, ...).

A job folder holds one output per slide. The runner

* skips slides whose output is already complete (``is_done``),
* runs each remaining slide in isolation: an exception fails that slide alone, is recorded as JSON in
  ``JOB/errors/<slide_id>.<stage>.json`` (slide, stage, error type, message, time) and the batch goes on,
* removes the error record of a slide that later succeeds,
* prints a summary table, and returns a :class:`BatchResult` whose ``exit_code`` is non-zero if any slide failed.
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


def error_record_path(job: Path, slide_id: str, stage: str) -> Path:
    return Path(job) / "errors" / f"{slide_id}.{stage}.json"


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

    job = Path(job)
    job.mkdir(parents=True, exist_ok=True)
    console = console or Console(stderr=True)
    outcomes: list[SlideOutcome] = []
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
        for item in items:
            progress.update(task, description=item.slide_id)
            err_path = error_record_path(job, item.slide_id, stage)
            if not overwrite and is_done(item):
                outcomes.append(SlideOutcome(item.slide_id, "skipped", message="already complete"))
                progress.advance(task)
                continue
            t0 = time.perf_counter()
            try:
                info = process(item) or {}
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one slide's failure must not stop the batch
                dt = time.perf_counter() - t0
                expected = isinstance(exc, HwsiError)
                record = {
                    "slide": item.slide_id,
                    "source": item.source,
                    "stage": stage,
                    "error": type(exc).__name__,
                    "message": str(exc),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "seconds": round(dt, 3),
                }
                if not expected:
                    record["traceback"] = traceback.format_exc()
                write_json_atomic(err_path, record)
                outcomes.append(SlideOutcome(item.slide_id, "failed", dt, f"{type(exc).__name__}: {exc}"))
            else:
                dt = time.perf_counter() - t0
                if err_path.exists():
                    err_path.unlink()
                outcomes.append(SlideOutcome(item.slide_id, "done", dt, info=info))
            progress.advance(task)
    result = BatchResult(stage, outcomes)
    print_summary(result, console)
    return result


def print_summary(result: BatchResult, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"hwsi {result.stage}: summary")
    table.add_column("slide")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("detail")
    colours = {"done": "green", "skipped": "cyan", "failed": "red"}
    for o in result.outcomes:
        detail = o.message or ", ".join(f"{k}={v}" for k, v in o.info.items())
        table.add_row(o.slide_id, f"[{colours[o.status]}]{o.status}[/]", f"{o.seconds:.2f}", detail)
    console.print(table)
    c = result.counts()
    console.print(f"{c['done']} done, {c['skipped']} skipped, {c['failed']} failed")

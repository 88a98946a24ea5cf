"""TRIDENT-style batch semantics shared by every per-slide command (`hwsi tile`, `hwsi extract`, ...).

A job folder holds one output per slide. The runner

* skips slides whose output is already complete (``is_done``),
* runs each remaining slide in isolation: an exception fails that slide alone, is recorded as JSON in
  ``JOB/errors/<slide_id>.<stage>.json`` (slide, stage, error type, message, time) and the batch goes on,
* removes the error record of a slide that later succeeds,
* records every slide in the job manifest (``JOB/manifest.csv``, ``JOB/summary.md``: :mod:`hwsi.batch.manifest`),
* prints a summary table, and returns a :class:`BatchResult` whose ``exit_code`` is non-zero if any slide failed.

The job folder is prepared first (:func:`prepare_job`: created, proved writable, temporaries of killed runs
removed) so an unusable folder is one error line before any work. Several workers may run on one job (processes
on one machine, nodes sharing the folder; ``--shard i/N``, torchrun, a Slurm array: :mod:`hwsi.utils.launch`):
each slide is claimed with a claim file (:mod:`hwsi.batch.claims`); a slide another live worker holds is deferred
to the end of the batch, then waited for and checked again (usually "already complete"), and taken over when its
claim goes stale (worker dead or hung). So two runs on one job both finish, and no slide is done twice at once.
With a shard, a worker does its own share first, then takes what other workers have left (work stealing).
"""

from __future__ import annotations

import glob
import os
import re
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from hwsi.batch.claims import (
    CLAIMS_DIR,
    DEFAULT_CLAIM_TIMEOUT_S,
    ClaimAttempt,
    ClaimRecord,
    claim_state,
    try_claim,
)
from hwsi.batch.manifest import MANIFEST_DIR, Manifest, Worker
from hwsi.errors import HwsiError
from hwsi.utils.atomic import host_name, pid_alive, write_json_atomic
from hwsi.utils.launch import Shard
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


JOB_SUBDIRS = ("stores", "errors", ".locks", CLAIMS_DIR, MANIFEST_DIR)


def error_record_path(job: Path, slide_id: str, stage: str) -> Path:
    return Path(job) / "errors" / f"{slide_id}.{stage}.json"


def lock_path(job: Path, name: str) -> Path:
    """The lock file of ``name`` (a slide and stage, or a shared file such as ``slides.json``) in ``job``."""
    return Path(job) / ".locks" / f"{name}.lock"


def prepare_job(job: str | Path, extra: tuple[str, ...] = ()) -> Path:
    """Create the job folder and its stores/, errors/ (and ``extra``) folders, writable, without stale temporaries
    (:func:`hwsi.utils.outdir.prepare_output_dir`); raises HwsiError naming the folder when it cannot."""
    return prepare_output_dir(job, JOB_SUBDIRS + tuple(extra), "job folder")


def shard_indices(slide_ids: Sequence[str], shard: Shard) -> list[int]:
    """The positions (in ``slide_ids``' order) of shard ``shard``'s slides: of the slides sorted by id, the
    ``i``-th, ``i+N``-th, ... Every worker given the same slides computes the same split, the shards differ in size
    by at most one slide, and neighbours in id order (often one site, one scanner, one size) are spread over all
    shards (docs/cluster.md). A worker that sees another list (stores still appearing) stays correct: the claims
    keep a slide from being done twice and work stealing takes what no shard covered."""
    order = sorted(range(len(slide_ids)), key=lambda n: slide_ids[n])
    return sorted(n for pos, n in enumerate(order) if pos % shard.count == shard.index)


def _remove_dead_temporaries(job: Path, slide_id: str, dead: ClaimRecord | None) -> None:
    """Delete the temporaries a DEAD worker left for this slide (``<slide_id>.*.tmp-<pid>-*@<host>`` in the job's
    folders) when its claim is taken over. Only a process of this host that no longer exists counts as dead: a
    worker on another node whose claim went stale by the timeout may be hung and finish later (its rename would
    then fail), so its temporaries are left (docs/cluster.md)."""
    if dead is None or dead.host != host_name() or dead.pid == os.getpid() or pid_alive(dead.pid):
        return
    pattern = f"{glob.escape(slide_id)}.*.tmp-{dead.pid}-*@{glob.escape(dead.host)}"
    for folder in [job, *(p for p in job.iterdir() if p.is_dir())]:
        for tmp in folder.glob(pattern):
            tmp.unlink(missing_ok=True)


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
    shard: Shard | None = None,
    claim_timeout_s: float = DEFAULT_CLAIM_TIMEOUT_S,
    on_finished: Callable[[], None] | None = None,
) -> BatchResult:
    """Run ``process`` on every item not yet done; record failures; never let one slide stop the batch.

    With ``shard`` i/N this worker first does its own slides (:func:`shard_indices`), then takes the slides other
    workers have left (not complete, no error record, not claimed by a live worker; from the end of the list,
    where their owners are furthest away), then waits for the slides live workers hold and takes over those whose
    claim goes stale (``claim_timeout_s``). Without a shard it is the whole batch, as one process always was.
    ``on_finished`` (the command's own last writes, e.g. `hwsi tile`'s registry) runs after the summary and, under
    torchrun, before the ranks wait for each other (:func:`_wait_for_torchrun_peers`)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    job = prepare_job(job)
    console = console or Console(stderr=True)
    shard = shard or Shard()
    worker = Worker.here(str(shard), shard.source)
    manifest = Manifest(job, stage, worker, [it.slide_id for it in items])
    started = time.time()
    # only when torchrun set the shard: then every rank runs this batch (a library call inside a torchrun training,
    # made by one rank, must not wait for the others)
    end_marker = _torchrun_end_marker(job, stage) if "torchrun" in shard.source else None
    if end_marker is not None:
        end_marker[0].unlink(missing_ok=True)
    outcomes: dict[int, SlideOutcome] = {}
    own = shard_indices([it.slide_id for it in items], shard)
    own_set = set(own)
    others = [n for n in reversed(range(len(items))) if n not in own_set]

    def log(line: str) -> None:
        console.print(" ".join(line.split()), markup=False, highlight=False, soft_wrap=True)

    if shard.source != "none":
        first = ", ".join(items[n].slide_id for n in own[:8]) + (", ..." if len(own) > 8 else "")
        log(f"hwsi {stage}: {shard.describe()} on {worker.host} pid {worker.pid}: {len(own)} of {len(items)} "
            f"slides are this shard's ({first}); claim timeout {claim_timeout_s:g} s")

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

    def keep(n: int, out: SlideOutcome, note: str = "", row: bool = True) -> None:
        if n in own_set or out.status != "skipped":  # another shard's complete slide is not this worker's
            outcomes[n] = out
            if row:
                manifest.add(out.slide_id, out.status, out.seconds, out.message if out.status == "failed" else "",
                             note)

    def run_claimed(n: int, attempt: ClaimAttempt) -> None:
        item, note = items[n], ""
        assert attempt.claim is not None
        if attempt.reason:
            who = attempt.took_over.who() if attempt.took_over else "an unreadable claim"
            note = f"took over the stale claim of {who}: {attempt.reason}"
            log(f"hwsi {stage}: {item.slide_id}: {note}")
            _remove_dead_temporaries(job, item.slide_id, attempt.took_over)
        try:
            out = run_one(item)
        except BaseException:
            attempt.claim.release()
            raise
        if not attempt.claim.still_ours():
            lost = "its claim was taken over while this worker was on it (slower than --claim-timeout?)"
            log(f"hwsi {stage}: {item.slide_id}: {lost}")
            note = "; ".join(x for x in (note, lost) if x)
        keep(n, out, note)  # the row is in this worker's part BEFORE the claim goes: a worker waiting on it sees it
        attempt.claim.release()

    def failed_since_start(item: BatchItem[T]) -> bool:
        try:
            return error_record_path(job, item.slide_id, stage).stat().st_mtime >= started
        except FileNotFoundError:
            return False

    def left_over(item: BatchItem[T]) -> bool:  # another shard's slide nobody finished or tried and failed
        return not is_done(item) and not error_record_path(job, item.slide_id, stage).exists()

    def attempt_own(n: int) -> bool:
        item = items[n]
        if not overwrite and is_done(item):  # (checked again under the claim) no claim file for a finished slide
            keep(n, SlideOutcome(item.slide_id, "skipped", message="already complete"))
            return True
        if failed_since_start(item):  # another worker of this run took it and failed: not tried twice
            keep(n, SlideOutcome(item.slide_id, "skipped", message="failed in another worker during this run "
                                 f"(errors/{item.slide_id}.{stage}.json)"), row=False)  # that worker's row says it
            return True
        attempt = try_claim(job, item.slide_id, stage, str(shard), claim_timeout_s)
        if attempt.claim is None:
            return False
        run_claimed(n, attempt)
        return True

    def attempt_steal(n: int) -> bool:
        item = items[n]
        state, _ = claim_state(job, item.slide_id, stage, claim_timeout_s)
        if state == "live":
            return False
        if state == "free" and not left_over(item):
            return True
        attempt = try_claim(job, item.slide_id, stage, str(shard), claim_timeout_s)
        if attempt.claim is None:
            return False
        if not attempt.reason and not left_over(item):  # finished while we looked
            attempt.claim.release()
            return True
        run_claimed(n, attempt)
        return True

    def attempt(n: int) -> bool:
        return attempt_own(n) if n in own_set else attempt_steal(n)

    poll_s = max(0.05, min(1.0, claim_timeout_s / 10))
    try:
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
            for n in own + others:  # own slides, then the others' leftovers
                progress.update(task, description=items[n].slide_id)
                if attempt(n):
                    progress.advance(task)
                else:  # a live worker is on it: come back at the end
                    deferred.append(n)
            while deferred:
                progress.update(task, description=f"{items[deferred[0]].slide_id} (waiting for another worker)")
                still = [n for n in deferred if claim_state(job, items[n].slide_id, stage, claim_timeout_s)[0]
                         == "live" or not attempt(n)]
                progress.advance(task, len(deferred) - len(still))
                deferred = still
                if deferred:
                    time.sleep(poll_s)
    finally:
        manifest.publish()
    result = BatchResult(stage, [outcomes[n] for n in sorted(outcomes)])
    print_summary(result, console)
    if on_finished is not None:
        on_finished()
    _wait_for_torchrun_peers(job, stage, end_marker, poll_s)
    return result


def _torchrun_end_marker(job: Path, stage: str) -> tuple[Path, str, int] | None:
    """``(this rank's end marker, the glob of its launch's markers, WORLD_SIZE)`` under torchrun, else None."""
    env = os.environ
    run_id, rank, world = env.get("TORCHELASTIC_RUN_ID"), env.get("RANK", ""), env.get("WORLD_SIZE", "")
    if not run_id or not rank.isdigit() or not world.isdigit():
        return None
    launch = re.sub(r"[^A-Za-z0-9._-]", "_", f"{run_id}.{env.get('TORCHELASTIC_RESTART_COUNT', '0')}.w{world}")
    folder = job / MANIFEST_DIR
    return folder / f"{stage}.{launch}.rank{rank}.end", f"{glob.escape(stage)}.{glob.escape(launch)}.rank*.end", \
        int(world)


def _wait_for_torchrun_peers(job: Path, stage: str, marker: tuple[Path, str, int] | None, poll_s: float) -> None:
    """Under torchrun, a rank that exits with 1 (one of its slides failed) makes torchrun stop every other rank at
    once, also one still finishing its last slide. So each rank, at the end of its batch, writes an end marker
    and waits until every rank of its launch (``TORCHELASTIC_RUN_ID``, restart, world size) has written one; a rank
    that dies makes torchrun stop them all, so this never waits for a dead one. A rank deletes its marker of an
    earlier launch with the same id when it starts (``--rdzv-id`` reused on one job)."""
    if marker is None:
        return
    path, pattern, world = marker
    path.write_text(f"{host_name()} {os.getpid()}\n")
    while len(list(path.parent.glob(pattern))) < world:
        time.sleep(poll_s)


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

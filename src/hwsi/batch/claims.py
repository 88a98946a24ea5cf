"""Per-slide claim files: which worker is on a slide, so that several workers (processes, nodes) share one job.

``JOB/.claims/<slide_id>.<stage>.claim`` is created with ``O_CREAT | O_EXCL`` (one creator wins, on NFS too) and
holds JSON: ``slide``, ``stage``, ``host``, ``pid``, ``start`` (ISO time), ``start_unix``, ``shard`` and a random
``token`` (which claim this is). While the slide is being worked on, a heartbeat thread touches the file every
``timeout / 4`` seconds (at most every 60 s). A claim is **stale** when

* its process is gone (same host, pid no longer alive: seen at once), or
* its file was not touched for longer than the timeout (a dead node, a hung or stopped process: seen after the
  timeout; clocks of the nodes must agree to well within it, as NTP does).

A stale claim is taken over by replacing the file atomically (a temporary written beside it, then renamed over
it), and the takeover is logged. The heartbeat is a thread of its own: a process alive but stuck in a slide keeps
its claim (the timeout catches dead, stopped and unreachable workers). Creating, judging and taking over a claim happen under the slide's lock
(``JOB/.locks/<slide_id>.<stage>.lock``, held for milliseconds, never while the slide is worked on), so two
workers never both take over one stale claim. A worker releases its claim when the slide is finished, and only if
the file still holds its own token (a worker that was too slow finds its claim taken over and leaves it).

Claims are about not doing work twice; they are not what keeps outputs whole: every output is written under a
temporary name unique to its process (:mod:`hwsi.utils.atomic`) and renamed when complete, so even two workers on
one slide (a slow one after a takeover) leave one complete output.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hwsi.utils.atomic import host_name, pid_alive, write_json_atomic
from hwsi.utils.launch import DEFAULT_CLAIM_TIMEOUT_S
from hwsi.utils.lock import file_lock

CLAIMS_DIR = ".claims"


@dataclass(frozen=True)
class ClaimRecord:
    """What a claim file holds."""

    slide: str
    stage: str
    host: str
    pid: int
    start: str
    start_unix: float
    shard: str
    token: str

    def who(self) -> str:
        return f"{self.host}:{self.pid} (shard {self.shard}, since {self.start})"


__all__ = ["CLAIMS_DIR", "DEFAULT_CLAIM_TIMEOUT_S", "ClaimAttempt", "ClaimRecord", "claim_path", "claim_state",
           "read_claim", "stale_reason", "try_claim"]


def claim_path(job: Path, slide_id: str, stage: str) -> Path:
    return Path(job) / CLAIMS_DIR / f"{slide_id}.{stage}.claim"


def _lock(job: Path, slide_id: str, stage: str) -> Path:
    return Path(job) / ".locks" / f"{slide_id}.{stage}.lock"


def read_claim(path: Path) -> ClaimRecord | None:
    """The claim in ``path``; None when there is none or it cannot be read (a writer killed while creating it)."""
    try:
        d = json.loads(path.read_text())
        return ClaimRecord(**{k: d[k] for k in ClaimRecord.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stale_reason(path: Path, record: ClaimRecord | None, timeout_s: float) -> str | None:
    """Why the claim in ``path`` is stale, or None while its worker is alive (see the module docstring)."""
    try:
        age_s = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "released"
    if record is not None and record.host == host_name() and record.pid != os.getpid() and not pid_alive(record.pid):
        return f"its process {record.pid} on {record.host} is gone"
    if age_s > timeout_s:
        return f"no heartbeat for {age_s:.1f} s (claim timeout {timeout_s:g} s)"
    return None


class Claim:
    """A claim this process holds; :meth:`release` it when the slide is finished."""

    def __init__(self, path: Path, record: ClaimRecord, timeout_s: float, job: Path) -> None:
        self.path, self.record, self.job = path, record, job
        self.lost = False  # set by the heartbeat when another worker took the claim over
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(max(0.05, min(60.0, timeout_s / 4)),),
                                      name=f"claim-heartbeat-{record.slide}", daemon=True)
        self._beat.start()

    def _heartbeat(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            rec = read_claim(self.path)
            if (rec is None and not self.path.exists()) or (rec is not None and rec.token != self.record.token):
                self.lost = True  # taken over (and maybe finished and released by the other worker)
                return
            with contextlib.suppress(OSError):  # an unreadable moment (NFS) is not a loss: beat, look again later
                os.utime(self.path)

    def still_ours(self) -> bool:
        """True while the claim file holds this claim (not taken over by another worker)."""
        rec = read_claim(self.path)
        return not self.lost and rec is not None and rec.token == self.record.token

    def release(self) -> bool:
        """Stop the heartbeat and delete the claim file if it is still ours; False if it had been taken over."""
        self._stop.set()
        self._beat.join()
        with file_lock(_lock(self.job, self.record.slide, self.record.stage)):
            rec = read_claim(self.path)
            if rec is None or rec.token != self.record.token:
                return False
            self.path.unlink(missing_ok=True)
        return not self.lost


@dataclass
class ClaimAttempt:
    """The result of :func:`try_claim`: ``claim`` when this process now holds the slide, else ``holder`` (the live
    worker on it); ``took_over``/``reason`` when a stale claim was replaced."""

    claim: Claim | None
    holder: ClaimRecord | None = None
    took_over: ClaimRecord | None = None
    reason: str = ""


def _new_record(slide_id: str, stage: str, shard: str) -> ClaimRecord:
    now = time.time()
    return ClaimRecord(slide_id, stage, host_name(), os.getpid(), time.strftime("%Y-%m-%dT%H:%M:%S%z",
                       time.localtime(now)), round(now, 3), shard, secrets.token_hex(8))


def _create_exclusive(path: Path, record: ClaimRecord) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(asdict(record)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return True


def try_claim(job: Path, slide_id: str, stage: str, shard: str, timeout_s: float) -> ClaimAttempt:
    """Claim ``slide_id`` for ``stage``: create its claim file exclusively, or take over a stale one, or report
    the live worker that holds it."""
    path = claim_path(job, slide_id, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = _new_record(slide_id, stage, shard)
    with file_lock(_lock(job, slide_id, stage)):
        if _create_exclusive(path, record):
            return ClaimAttempt(Claim(path, record, timeout_s, job))
        other = read_claim(path)
        reason = stale_reason(path, other, timeout_s)
        if reason is None:
            return ClaimAttempt(None, holder=other)
        if reason == "released":  # gone between our create and our look: create it now
            if _create_exclusive(path, record):
                return ClaimAttempt(Claim(path, record, timeout_s, job))
            return ClaimAttempt(None, holder=read_claim(path))
        write_json_atomic(path, asdict(record))  # the takeover: one rename, under the slide's lock
        return ClaimAttempt(Claim(path, record, timeout_s, job), took_over=other, reason=reason)


def claim_state(job: Path, slide_id: str, stage: str, timeout_s: float) -> tuple[str, ClaimRecord | None]:
    """``("free", None)``, ``("live", holder)`` or ``("stale", holder)`` — a look without the lock (for waiting)."""
    path = claim_path(job, slide_id, stage)
    if not path.exists():
        return "free", None
    rec = read_claim(path)
    reason = stale_reason(path, rec, timeout_s)
    if reason == "released":
        return "free", None
    return ("live" if reason is None else "stale"), rec

"""Sharding a batch over workers, in one process: ``--shard i/N`` and the launcher's environment
(hwsi.utils.launch), the split of the slides (hwsi.batch.shard_indices), claim files (hwsi.batch.claims) and the
job manifest under concurrent writers (hwsi.batch.manifest). The multi-process runs: tests/test_shard_workers.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hwsi.batch import BatchItem, run_batch, shard_indices
from hwsi.batch.claims import claim_path, claim_state, read_claim, try_claim
from hwsi.batch.manifest import Manifest, Worker, merge_rows, read_rows
from hwsi.cli import main
from hwsi.errors import ConfigError
from hwsi.utils.launch import Shard, local_cuda_device, local_rank, parse_shard, resolve_shard, shard_from_env


# ---- --shard and the environment --------------------------------------------------------------------------------
def test_parse_shard() -> None:
    assert parse_shard("0/1") == Shard(0, 1, "--shard")
    assert parse_shard(" 3 / 4 ") == Shard(3, 4, "--shard")
    for bad in ("4/4", "-1/4", "1/0", "1", "a/b", "1/2/3", "", "1.5/4"):
        with pytest.raises(ConfigError, match="--shard: expected i/N"):
            parse_shard(bad)


def test_shard_from_the_launchers_environment() -> None:
    assert shard_from_env({}) == Shard(0, 1, "none")
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Shard(1, 2, "torchrun")
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}) == Shard(3, 8, "slurm-array")
    # --array=1-8: ids 1..8 are shards 0..7; --array=0-14:2: ids 0, 2, ..., 14 are shards 0..7
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "8",
                           "SLURM_ARRAY_TASK_MIN": "1"}) == Shard(7, 8, "slurm-array")
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "0",
                           "SLURM_ARRAY_TASK_STEP": "2"}) == Shard(3, 8, "slurm-array")
    # an array task per node with torchrun inside: task-major, ranks within
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4", "RANK": "1", "WORLD_SIZE": "2"}
    assert shard_from_env(env) == Shard(5, 8, "torchrun+slurm-array")
    assert resolve_shard("0/3", env) == Shard(0, 3, "--shard")  # the option wins
    assert resolve_shard(None, env) == Shard(5, 8, "torchrun+slurm-array")


@pytest.mark.parametrize(("env", "message"), [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "environment variable RANK='x': not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 and WORLD_SIZE=2: RANK must be < WORLD_SIZE"),
    ({"RANK": "0"}, "WORLD_SIZE is not set but RANK is"),
    ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "8"}, "the task is not one of the array's 8"),
    ({"SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_COUNT is not set"),
])
def test_bad_environment_is_one_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        shard_from_env(env)


def test_local_rank_names_the_gpu() -> None:
    assert local_rank({}) == 0 and local_cuda_device({}) == "cuda:0"
    assert local_rank({"LOCAL_RANK": "3"}) == 3 and local_cuda_device({"LOCAL_RANK": "3"}) == "cuda:3"


@pytest.mark.parametrize("command", ["tile", "extract"])
def test_bad_shard_option_exits_2_with_one_line(command: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    args = [command, str(tmp_path), "--shard", "2/2"] + (["--out", str(tmp_path / "job")] if command == "tile" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--shard" in err and "0 <= i < N, got '2/2'" in err, err


def test_bad_launcher_environment_exits_2_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RANK", "one")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["tile", str(tmp_path), "--out", str(tmp_path / "job")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: environment variable RANK='one': not an integer", err
    assert not (tmp_path / "job").exists()


# ---- the split --------------------------------------------------------------------------------------------------
def test_shards_split_the_sorted_ids_round_robin() -> None:
    ids = [f"slide{n:03d}" for n in (5, 3, 11, 0, 7, 1, 9, 2, 8, 4, 10)]
    parts = [shard_indices(ids, Shard(i, 3)) for i in range(3)]
    assert sorted(n for p in parts for n in p) == list(range(len(ids)))  # disjoint, complete
    assert [len(p) for p in parts] == [4, 4, 3]
    assert parts[0] == sorted(parts[0])  # kept in the input's order
    assert sorted(ids[n] for n in parts[0]) == ["slide000", "slide003", "slide007", "slide010"]
    assert shard_indices(ids, Shard()) == list(range(len(ids)))  # no shard: everything, in order
    shuffled = ids[3:] + ids[:3]  # another listing order gives every worker the same slides
    assert [{shuffled[n] for n in shard_indices(shuffled, Shard(i, 3))} for i in range(3)] == [
        {ids[n] for n in p} for p in parts]


# ---- claims -----------------------------------------------------------------------------------------------------
def test_a_claim_is_exclusive_and_released_only_by_its_holder(tmp_path: Path) -> None:
    a = try_claim(tmp_path, "s1", "tile", "0/2", timeout_s=60)
    assert a.claim is not None and a.took_over is None
    rec = read_claim(claim_path(tmp_path, "s1", "tile"))
    assert rec is not None and rec.pid == os.getpid() and rec.shard == "0/2" and rec.slide == "s1"
    b = try_claim(tmp_path, "s1", "tile", "1/2", timeout_s=60)
    assert b.claim is None and b.holder == rec
    assert claim_state(tmp_path, "s1", "tile", 60)[0] == "live"
    assert a.claim.release() and not claim_path(tmp_path, "s1", "tile").exists()
    assert claim_state(tmp_path, "s1", "tile", 60) == ("free", None)


def test_the_heartbeat_keeps_a_long_slide_claimed(tmp_path: Path) -> None:
    a = try_claim(tmp_path, "s1", "tile", "0/1", timeout_s=1.0)
    time.sleep(2.5)  # 2.5 timeouts: alive only thanks to the heartbeat (every 0.25 s)
    assert claim_state(tmp_path, "s1", "tile", 1.0)[0] == "live"
    assert try_claim(tmp_path, "s1", "tile", "0/1", timeout_s=1.0).claim is None
    assert a.claim is not None and a.claim.release()


def _foreign_claim(job: Path, slide: str, age_s: float, host: str = "node-b", pid: int = 4242) -> Path:
    path = claim_path(job, slide, "tile")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"slide": slide, "stage": "tile", "host": host, "pid": pid, "start": "earlier",
                                "start_unix": time.time() - age_s, "shard": "1/2", "token": "feedface"}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_a_claim_of_another_node_goes_stale_after_the_timeout(tmp_path: Path) -> None:
    _foreign_claim(tmp_path, "fresh", age_s=1)
    assert try_claim(tmp_path, "fresh", "tile", "0/2", timeout_s=30).claim is None  # its node may be alive
    path = _foreign_claim(tmp_path, "old", age_s=31)
    got = try_claim(tmp_path, "old", "tile", "0/2", timeout_s=30)
    assert got.claim is not None and got.took_over is not None and got.took_over.host == "node-b"
    assert got.reason.startswith("no heartbeat for 3") and "claim timeout 30 s" in got.reason
    assert read_claim(path).pid == os.getpid()  # type: ignore[union-attr]
    assert got.claim.release()


def test_a_claim_of_a_dead_local_process_is_taken_over_at_once(tmp_path: Path) -> None:
    from hwsi.utils.atomic import host_name

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _foreign_claim(tmp_path, "s1", age_s=0, host=host_name(), pid=dead.pid)
    got = try_claim(tmp_path, "s1", "tile", "0/2", timeout_s=600)
    assert got.claim is not None and got.reason == f"its process {dead.pid} on {host_name()} is gone"
    # the old holder, were it alive, no longer owns the file: its release leaves the new claim alone
    got.claim.release()


# ---- the manifest under concurrent writers ----------------------------------------------------------------------
def test_manifest_rows_of_concurrent_workers_are_all_kept(tmp_path: Path) -> None:
    (tmp_path / ".locks").mkdir()
    ids = [f"s{n:02d}" for n in range(40)]

    def write(k: int) -> None:
        m = Manifest(tmp_path, "tile", Worker("node", 100 + k, f"{k}/2", "--shard"), ids, rebuild_every_s=0)
        for sid in ids[k::2]:
            m.add(sid, "done", 0.5)
        m.publish()

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(write, range(2)))
    rows = read_rows(tmp_path / "manifest.csv")
    assert [r["slide"] for r in rows] == ids and {r["shard"] for r in rows} == {"0/2", "1/2"}
    assert {r["pid"] for r in rows[0::2]} == {"100"} and {r["pid"] for r in rows[1::2]} == {"101"}
    summary = (tmp_path / "summary.md").read_text()
    assert "| tile | 40 | 40 | 0 | 0 | 0 | 20.0 | 0.50 |" in summary


def test_a_manifest_line_still_being_appended_is_not_read(tmp_path: Path) -> None:
    (tmp_path / ".locks").mkdir()
    m = Manifest(tmp_path, "tile", Worker("node", 7, "0/1", "none"), ["a", "b"])
    m.add("a", "done", 1.0)
    whole = m.part.read_bytes()
    line = whole.splitlines()[-1]
    assert line.startswith(b"a,tile,done,1.000,,node,7,0/1,,") and line.endswith(b"Z")
    with open(m.part, "ab") as fh:  # the next row, cut short by a reader arriving mid-write
        fh.write(line.replace(b"a,", b"b,", 1)[:-3])
    assert [r["slide"] for r in read_rows(m.part)] == ["a"]


def test_merge_keeps_the_run_that_did_the_work() -> None:
    def row(status: str, t: str, pid: str = "1") -> dict[str, str]:
        return {"slide": "s1", "stage": "tile", "status": status, "seconds": "1", "error": "", "host": "h",
                "pid": pid, "shard": "0/1", "finished": t, "note": ""}

    assert merge_rows([row("done", "2"), row("skipped", "3")])[0]["status"] == "done"
    assert merge_rows([row("failed", "1"), row("done", "2")])[0]["status"] == "done"
    assert merge_rows([row("done", "1"), row("failed", "2")])[0]["status"] == "failed"
    assert merge_rows([row("failed", "1"), row("skipped", "2", pid="2")])[0]["status"] == "failed"


def test_one_process_batch_is_unchanged_and_writes_the_manifest(tmp_path: Path) -> None:
    """No shard: every item in its order, failures recorded, and one manifest row per slide."""
    items = [BatchItem(s, s) for s in ("b", "a", "c")]
    seen: list[str] = []

    def process(item: BatchItem[str]) -> dict[str, int]:
        seen.append(item.slide_id)
        if item.slide_id == "c":
            raise ValueError("broken slide")
        return {"n": 1}

    res = run_batch(items, tmp_path / "job", "tile", process, lambda it: False, show_progress=False)
    assert seen == ["b", "a", "c"] and [o.slide_id for o in res.outcomes] == ["b", "a", "c"]
    assert res.exit_code == 1 and (tmp_path / "job" / "errors" / "c.tile.json").is_file()
    rows = read_rows(tmp_path / "job" / "manifest.csv")
    assert [(r["slide"], r["status"], r["shard"]) for r in rows] == [("a", "done", "0/1"), ("b", "done", "0/1"),
                                                                     ("c", "failed", "0/1")]
    assert rows[2]["error"] == "ValueError: broken slide"
    assert not list((tmp_path / "job" / ".claims").iterdir())  # every claim released


def test_a_claim_left_by_a_worker_that_died_during_the_run_is_taken_over(tmp_path: Path) -> None:
    """While this worker is on slide a, another worker of this host dies on slide b (its claim and half a store
    stay): this worker takes b over at once, deletes that temporary and notes the takeover in the manifest."""
    from hwsi.utils.atomic import host_name

    job = tmp_path / "job"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp = job / "stores" / f"b.h5.tmp-{dead.pid}-0abc1234@{host_name()}"
    alive_tmp = job / "stores" / f"b.h5.tmp-{os.getpid()}-0abc1234@{host_name()}"  # ours: never touched

    def process(item: BatchItem[str]) -> None:
        if item.slide_id == "a":
            _foreign_claim(job, "b", age_s=0, host=host_name(), pid=dead.pid)
            tmp.write_bytes(b"half a store")
            alive_tmp.write_bytes(b"a store being written")

    res = run_batch([BatchItem("a", "a"), BatchItem("b", "b")], job, "tile", process, lambda it: False,
                    show_progress=False)
    assert res.exit_code == 0 and [o.status for o in res.outcomes] == ["done", "done"]
    assert not tmp.exists() and alive_tmp.read_bytes() == b"a store being written"
    note = {r["slide"]: r["note"] for r in read_rows(job / "manifest.csv")}["b"]
    assert note == (f"took over the stale claim of {host_name()}:{dead.pid} (shard 1/2, since earlier): its process "
                    f"{dead.pid} on {host_name()} is gone")
    assert "took over the stale claim" in (job / "summary.md").read_text()


def test_stealing_takes_only_what_is_left_over(tmp_path: Path) -> None:
    """Shard 0/2 of a..f (own: a, c, e): of the other shard's b, d, f it takes only f (b is complete, d failed in an
    earlier run: a later run retries it, not a thief); its own e, failed by another worker during this run (here:
    while this worker was on a), is not tried twice."""
    from hwsi.batch import error_record_path

    job = tmp_path / "job"
    (job / "errors").mkdir(parents=True)
    error_record_path(job, "d", "tile").write_text("{}")
    os.utime(error_record_path(job, "d", "tile"), (time.time() - 60, time.time() - 60))
    seen: list[str] = []

    def process(item: BatchItem[str]) -> None:
        seen.append(item.slide_id)
        if item.slide_id == "a":
            error_record_path(job, "e", "tile").write_text("{}")

    items = [BatchItem(s, s) for s in "abcdef"]
    res = run_batch(items, job, "tile", process, lambda it: it.slide_id == "b", show_progress=False,
                    shard=Shard(0, 2, "--shard"))
    assert seen == ["a", "c", "f"]
    assert [(o.slide_id, o.status) for o in res.outcomes] == [("a", "done"), ("c", "done"), ("e", "skipped"),
                                                              ("f", "done")]
    assert res.outcomes[2].message == "failed in another worker during this run (errors/e.tile.json)"


def _tiny_slides(folder: Path, n: int) -> Path:
    import numpy as np

    from hwsi.synth.pyramid import write_pyramid_tiff

    folder.mkdir()
    for k in range(n):
        write_pyramid_tiff(folder / f"t{k}.tiff", 512, 512, 0.5,
                           lambda x0, y0, w, h: np.full((h, w, 3), (222, 140, 180), np.uint8), min_level_side=256)
    return folder


def test_the_log_says_which_source_set_the_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    src = _tiny_slides(tmp_path / "slides", 3)
    args = ["tile", str(src), "--out", str(tmp_path / "job"), "--region-size", "256", "--patch-size", "128", "-q"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")  # --array=1-2, the second task
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    assert main(args) == 0
    assert "hwsi tile: shard 1/2 (from slurm-array) on " in capsys.readouterr().err
    assert main([*args, "--shard", "0/3"]) == 0  # the option wins over the environment
    err = capsys.readouterr().err
    assert "hwsi tile: shard 0/3 (from --shard) on " in err and "1 of 3 slides are this shard's (t0)" in err
    rows = read_rows(tmp_path / "job" / "manifest.csv")
    assert [(r["slide"], r["status"]) for r in rows] == [("t0", "done"), ("t1", "done"), ("t2", "done")]

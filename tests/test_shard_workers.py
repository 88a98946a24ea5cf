"""Several worker processes on one job (docs/cluster.md): `torchrun --nproc_per_node 2` gives the stores of one
process, each rank working on its own shard; a worker killed (or hung) mid-slide leaves its slide to the other;
two `hwsi extract` processes on one job never fail each other.

The slides are small synthetic pyramidal TIFFs written by hwsi.synth.pyramid (as in tests/test_extract.py), one
tissue disc each of a different size and texture, so every store differs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hwsi.batch.manifest import read_rows
from hwsi.store import list_stores

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
GRID = ["--region-size", "512", "--patch-size", "128"]
N_SLIDES = 6


def _tile_fn(k: int):  # type: ignore[no-untyped-def]
    def fn(x0: int, y0: int, w: int, h: int) -> np.ndarray:
        yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w]
        img = np.full((h, w, 3), 245, np.uint8)
        tissue = (xx - 400 - 40 * k) ** 2 + (yy - 380) ** 2 < (260 + 25 * k) ** 2
        stripe = ((xx + yy * (k + 1)) // 10) % 2 == 0
        img[tissue & stripe] = (222, 140, 180)
        img[tissue & ~stripe] = (120, 60, 150)
        return img

    return fn


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hwsi.synth.pyramid import write_pyramid_tiff

    d = tmp_path_factory.mktemp("slides")
    for k in range(N_SLIDES):
        write_pyramid_tiff(d / f"slide{k}.tiff", 1024, 768, 0.5, _tile_fn(k), min_level_side=256)
    return d


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", **extra)
    return env


def hwsi(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hwsi.cli", *args], env=_env(**env), capture_output=True,
                          text=True, timeout=300)


def worker(*args: str, **env: str) -> subprocess.Popen[str]:
    """tests/shard_worker.py: `hwsi` that can die or hang in the middle of one slide."""
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "shard_worker.py"), *args], env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def torchrun(*args: str, script: bool = False, **env: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node 2 -m hwsi.cli ARGS`` (``script``: tests/shard_worker.py ARGS)."""
    if not TORCHRUN.is_file():
        pytest.skip(f"{TORCHRUN}: torchrun is not installed beside this Python")
    target = [str(REPO / "tests" / "shard_worker.py")] if script else ["-m", "hwsi.cli"]
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *target, *args],
                          env=_env(**env), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(slides: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The job of ONE process (no shard): tile + extract."""
    job = tmp_path_factory.mktemp("one") / "job"
    r = hwsi("tile", str(slides), "--out", str(job), *GRID, "-q")
    assert r.returncode == 0, r.stderr
    shutil.copytree(job, job.with_name("tiled"))
    r = hwsi("extract", str(job), "--k", "4", "-q")
    assert r.returncode == 0, r.stderr
    return job


def assert_same_stores(job: Path, ref: Path) -> None:
    stores = {p.name: p for p in list_stores(job)}
    assert sorted(stores) == sorted(p.name for p in list_stores(ref)) and len(stores) == N_SLIDES
    for p in list_stores(ref):
        assert stores[p.name].read_bytes() == p.read_bytes(), f"{p.name} differs from the one-process store"
    assert not list(job.rglob("*.tmp-*")), "temporaries left behind"


def shard_lines(log: str, stage: str) -> dict[str, tuple[str, int, list[str]]]:
    """``{shard: (source, pid, own slides)}`` from the workers' log lines."""
    pat = rf"hwsi {stage}: shard (\d+/\d+) \(from ([\w+-]+)\) on \S+ pid (\d+): \d+ of \d+ slides are this shard's \(([^)]*)\)"
    return {m[1]: (m[2], int(m[3]), m[4].split(", ")) for m in re.finditer(pat, log)}


def test_torchrun_two_ranks_give_the_stores_of_one_process(slides: Path, reference: Path, tmp_path: Path) -> None:
    job = tmp_path / "job"
    for stage, args in (("tile", ["tile", str(slides), "--out", str(job), *GRID, "-q"]),
                        ("extract", ["extract", str(job), "--k", "4", "-q"])):
        r = torchrun(*args)
        assert r.returncode == 0, r.stdout + r.stderr
        lines = shard_lines(r.stderr, stage)
        # WORLD_SIZE was 2, two processes, each with its own shard, together covering every slide once
        assert sorted(lines) == ["0/2", "1/2"], r.stderr
        assert {src for src, _, _ in lines.values()} == {"torchrun"}
        assert lines["0/2"][1] != lines["1/2"][1]
        own = [s for _, _, ids in lines.values() for s in ids]
        assert sorted(own) == [f"slide{k}" for k in range(N_SLIDES)]
        rows = [r for r in read_rows(job / "manifest.csv") if r["stage"] == stage]
        assert len(rows) == N_SLIDES and {r["status"] for r in rows} == {"done"}
        assert {r["shard"] for r in rows} <= {"0/2", "1/2"}
        assert {int(r["pid"]) for r in rows} <= {pid for _, pid, _ in lines.values()}
    assert_same_stores(job, reference)
    assert (job / "slides.json").read_bytes() == (reference / "slides.json").read_bytes()
    assert "| tile | 6 | 6 |" in (job / "summary.md").read_text()


def _victim_slide(log: str) -> str:
    m = re.search(r"worker \d+: (?:killed|stopped) in (\S+)", log)
    assert m, log
    return m[1]


def test_a_worker_killed_mid_slide_leaves_it_to_the_other(slides: Path, reference: Path, tmp_path: Path) -> None:
    job = tmp_path / "job"
    # shard 1/2 dies in its first slide (claim held, half a store written): like a node crash or an OOM kill
    victim = worker("tile", str(slides), "--out", str(job), *GRID, "-q", "--shard", "1/2",
                    HWSI_TEST_KILL_AT="slide1")
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == -signal.SIGKILL, err
    assert (job / ".claims" / "slide1.tile.claim").is_file() and list(job.glob("stores/slide1.h5.tmp-*"))
    r = hwsi("tile", str(slides), "--out", str(job), *GRID, "-q", "--shard", "0/2", "--claim-timeout", "30")
    assert r.returncode == 0, r.stderr
    assert "slide1: took over the stale claim of " in r.stderr and "is gone" in r.stderr  # seen at once
    assert_same_stores(job, reference.with_name("tiled"))
    rows = {r["slide"]: r for r in read_rows(job / "manifest.csv")}
    assert rows["slide1"]["shard"] == "0/2" and "took over the stale claim" in rows["slide1"]["note"]
    assert "took over the stale claim" in (job / "summary.md").read_text()
    assert not list((job / ".claims").iterdir())


def _wait_stopped(proc: subprocess.Popen[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    raise AssertionError("the worker did not stop")


def test_a_hung_worker_loses_its_slide_after_the_claim_timeout(slides: Path, reference: Path, tmp_path: Path) -> None:
    """A worker that is alive but stuck: its claim goes stale only after --claim-timeout; when it wakes up it
    finishes without harm (its claim was taken over; the output is written atomically either way)."""
    if not Path("/proc/self/stat").is_file():
        pytest.skip("needs /proc to see that the worker stopped")
    job, timeout_s = tmp_path / "job", 1.5
    victim = worker("tile", str(slides), "--out", str(job), *GRID, "-q", "--shard", "1/2", "--claim-timeout",
                    str(timeout_s), HWSI_TEST_STOP_AT="slide1")
    try:
        _wait_stopped(victim)
        r = hwsi("tile", str(slides), "--out", str(job), *GRID, "-q", "--claim-timeout", str(timeout_s),
                 RANK="0", WORLD_SIZE="2")  # as torchrun would set them
        assert r.returncode == 0, r.stderr
        assert "shard 0/2 (from torchrun)" in r.stderr
        m = re.search(rf"slide1: took over the stale claim of \S+:{victim.pid} \(shard 1/2, since [^)]*\): no "
                      r"heartbeat for ([\d.]+) s \(claim timeout 1.5 s\)", r.stderr)
        assert m and float(m[1]) >= timeout_s, r.stderr  # not before the timeout: its process is alive
        # the survivor took the hung worker's other slides too (work stealing), then slide1
        rows = {r["slide"]: r for r in read_rows(job / "manifest.csv")}
        assert {rows[f"slide{k}"]["shard"] for k in (1, 3, 5)} == {"0/2"}
        assert_same_stores(job, reference.with_name("tiled"))
    finally:
        victim.send_signal(signal.SIGCONT)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 0, err
    assert "slide1: its claim was taken over while this worker was on it" in err
    assert_same_stores(job, reference.with_name("tiled"))


def test_two_extract_processes_on_one_job_never_fail_each_other(reference: Path, tmp_path: Path) -> None:
    job = tmp_path / "job"
    shutil.copytree(reference.with_name("tiled"), job)
    cmd = [sys.executable, "-m", "hwsi.cli", "extract", str(job), "--k", "4", "-q"]
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    counts = [re.findall(r"(\d+) done, (\d+) skipped, (\d+) failed", e)[-1] for _, e in outs]
    assert sum(int(d) for d, _, _ in counts) == N_SLIDES and all(f == "0" for _, _, f in counts)
    parts = [r for p in (job / ".manifest").glob("extract.*.csv") for r in read_rows(p)]
    assert sorted(r["slide"] for r in parts if r["status"] == "done") == [f"slide{k}" for k in range(N_SLIDES)]
    assert_same_stores(job, reference)


def test_torchrun_over_real_slides_with_failures_matches_one_process(shared_data: Path, tmp_path: Path) -> None:
    """The real slides of ../shared/data/slides (one good H&E, four that fail: no µm/px, a 72-dpi default, too
    small, a DICOM OpenSlide rejects). Under torchrun a rank that exits 1 makes torchrun stop the others at once,
    so each rank finishes its summary and registry before the ranks meet at the end: slides.json, the store and the
    failures are those of one process, even with rank 1 writing slides.json 3 s after rank 0 is done."""
    src = shared_data / "slides"
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = hwsi("tile", str(src), "--out", str(one), *GRID, "-q")
    assert r1.returncode == 1, r1.stderr
    r2 = torchrun("tile", str(src), "--out", str(two), *GRID, "-q", script=True, HWSI_TEST_SLOW_FINISH_RANK="1")
    assert r2.returncode != 0, r2.stderr  # slides failed: torchrun reports the ranks' exit 1
    assert sorted(shard_lines(r2.stderr, "tile")) == ["0/2", "1/2"]
    assert len(re.findall(r"\d+ done, \d+ skipped, \d+ failed", r2.stderr)) == 2, r2.stderr  # no rank cut short
    assert [p.name for p in list_stores(two)] == [p.name for p in list_stores(one)] == ["cmu-1-small-region.h5"]
    assert (two / "stores" / "cmu-1-small-region.h5").read_bytes() == (one / "stores" / "cmu-1-small-region.h5"
                                                                         ).read_bytes()
    assert (two / "slides.json").read_bytes() == (one / "slides.json").read_bytes()
    assert sorted(p.name for p in (two / "errors").iterdir()) == sorted(p.name for p in (one / "errors").iterdir())
    status = {r["slide"]: r["status"] for r in read_rows(two / "manifest.csv")}
    assert status == {r["slide"]: r["status"] for r in read_rows(one / "manifest.csv")} == {
        "boxes": "failed", "cmu-1-small-region": "done", "kidney-48-5": "failed", "small": "failed",
        "small_dicom": "failed"}

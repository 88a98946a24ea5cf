"""Bad-input corpus: slide ids, duplicate inputs, output folders, stale temporaries, two runs on one job.

Every case runs the real CLI (``hwsi.cli.main``, in process; a subprocess where two processes are the point) and
checks the exit code (2: a usage/input error, nothing done; 1: some slides of a batch failed), that the reason is
ONE line naming the file (``error: ...`` for 2, ``failed: <id> (<stage>): ...`` per failed slide for 1), that no
traceback reaches stderr, that nothing half-written is left, and that the good slides of the batch finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from hwsi.cli import main
from hwsi.store import has_stage, list_stores
from hwsi.synth.pyramid import write_pyramid_tiff

GRID = ["--region-size", "512", "--patch-size", "128", "-q"]
REPO = Path(__file__).resolve().parents[2]


def host_name() -> str:  # as temporary names carry it (hwsi.utils.atomic)
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def _tissue(x0: int, y0: int, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w]
    img = np.stack([200 + 0 * xx, 110 + (xx % 40), 170 + (yy % 30)], -1).astype(np.uint8)
    img[(xx - 500) ** 2 + (yy - 380) ** 2 > 360**2] = 242  # a disc of tissue on glass
    return img


@pytest.fixture(scope="module")
def slide_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    p = tmp_path_factory.mktemp("src") / "s.tiff"
    write_pyramid_tiff(p, 1024, 768, 0.5, _tissue, min_level_side=256)
    return p.read_bytes()


@pytest.fixture(scope="module")
def other_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A second slide with other pixels (so a store of the wrong file is visible in its size)."""
    p = tmp_path_factory.mktemp("src2") / "o.tiff"
    write_pyramid_tiff(p, 1536, 1024, 0.5, _tissue, min_level_side=256)
    return p.read_bytes()


def put(folder: Path, names: list[str], data: bytes) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n in names:
        (folder / n).write_bytes(data)
        out.append(folder / n)
    return out


@dataclass
class Run:
    rc: int
    out: str
    err: str


def hwsi(capsys: pytest.CaptureFixture[str], *args: str | Path) -> Run:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return Run(rc, cap.out, cap.err)


def check(run: Run, code: int, *needles: str, failed: int = 0) -> str:
    """Exit ``code``; no traceback; for 2 exactly one ``error:`` line, for 1 exactly ``failed`` ``failed:`` lines;
    every needle (file names, reasons) in that one line (the first failure's for code 1). Returns the line."""
    assert run.rc == code, (run.rc, run.err[-2000:])
    assert "Traceback" not in run.err and "Traceback" not in run.out
    if code == 2:
        lines = [ln for ln in run.err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), run.err
    elif code == 1:
        lines = [ln for ln in run.err.splitlines() if ln.startswith("failed: ")]
        assert len(lines) == failed, run.err
    else:
        lines = [""]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def clean(job: Path) -> None:
    """Nothing half-written: no temporary anywhere, every store complete, slides.json valid JSON."""
    if not job.exists():
        return
    assert not [p for p in job.rglob("*") if ".tmp-" in p.name]
    for p in list_stores(job):
        assert has_stage(p, "tile"), p
    if (job / "slides.json").exists():
        json.loads((job / "slides.json").read_text())


def registry(job: Path) -> dict[str, str]:
    return {k: v["path"] for k, v in json.loads((job / "slides.json").read_text()).items()}


def store_source(job: Path, sid: str) -> str:
    import h5py

    with h5py.File(job / "stores" / f"{sid}.h5", "r") as f:
        return str(f.attrs["slide_path"])


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make ``path`` unwritable even for root (``chattr +i``; ``chmod 555`` for other users)."""
    if os.geteuid() == 0:
        r = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"running as root and `chattr +i` fails here ({r.stderr.decode().strip()})")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)


# ---- slide ids ----------------------------------------------------------------------------------------------
def test_colliding_stems_each_slide_its_own_id(tmp_path: Path, capsys, slide_bytes, other_bytes) -> None:
    """x-2.svs, x.svs, x.tiff (+ a broken one): three stores, each of its own file; the broken one fails alone."""
    src = tmp_path / "in"
    put(src, ["x-2.svs", "x.svs"], slide_bytes)
    put(src, ["x.tiff"], other_bytes)
    (src / "broken.svs").write_bytes(slide_bytes[:3000])
    job = tmp_path / "job"
    run = hwsi(capsys, "tile", src, "--out", job, *GRID)
    check(run, 1, "broken", "broken.svs", "corrupt", failed=1)
    assert sorted(p.stem for p in list_stores(job)) == ["x-2", "x.svs", "x.tiff"]
    reg = registry(job)
    for sid, name in [("x-2", "x-2.svs"), ("x.svs", "x.svs"), ("x.tiff", "x.tiff")]:
        assert reg[sid] == str((src / name).resolve()) == store_source(job, sid)
    assert json.loads((job / "errors" / "broken.tile.json").read_text())["message"].count("\n") == 0
    clean(job)


def test_id_held_by_another_file_is_never_already_complete(tmp_path: Path, capsys, slide_bytes, other_bytes) -> None:
    """A job holds x (a/x.tiff); tiling b/x.tiff into it gives b its own id instead of skipping it."""
    (a,) = put(tmp_path / "a", ["x.tiff"], slide_bytes)
    (b,) = put(tmp_path / "b", ["x.tiff"], other_bytes)
    job = tmp_path / "job"
    check(hwsi(capsys, "tile", a, "--out", job, *GRID), 0)
    run = hwsi(capsys, "tile", b, "--out", job, *GRID)
    check(run, 0)
    assert "1 done, 0 skipped, 0 failed" in run.err
    reg = registry(job)
    assert reg["x"] == str(a.resolve()) == store_source(job, "x")
    (bid,) = set(reg) - {"x"}
    assert bid.startswith("x.tiff") and reg[bid] == str(b.resolve()) == store_source(job, bid)
    clean(job)


def test_id_held_by_a_store_without_slides_json(tmp_path: Path, capsys, slide_bytes, other_bytes) -> None:
    """Same, with slides.json gone: the store's own slide_path reserves its id."""
    (a,) = put(tmp_path / "a", ["x.tiff"], slide_bytes)
    (b,) = put(tmp_path / "b", ["x.tiff"], other_bytes)
    job = tmp_path / "job"
    check(hwsi(capsys, "tile", a, "--out", job, *GRID), 0)
    (job / "slides.json").unlink()
    check(hwsi(capsys, "tile", b, "--out", job, *GRID), 0)
    assert store_source(job, "x") == str(a.resolve())
    assert store_source(job, "x.tiff") == str(b.resolve())
    clean(job)


def test_csv_listing_one_file_twice_tiles_it_once(tmp_path: Path, capsys, slide_bytes) -> None:
    put(tmp_path, ["x.tiff", "good.tiff"], slide_bytes)
    csv = tmp_path / "slides.csv"
    csv.write_text("slide,mpp\nx.tiff,0.5\ngood.tiff,0.5\n./x.tiff,0.5\n" + f"{tmp_path / 'x.tiff'},0.5\n")
    job = tmp_path / "job"
    run = hwsi(capsys, "tile", csv, "--out", job, *GRID)
    check(run, 0)
    assert sorted(p.stem for p in list_stores(job)) == ["good", "x"]
    assert "2 done, 0 skipped, 0 failed" in run.err
    clean(job)


def test_csv_same_file_two_mpps_is_an_error(tmp_path: Path, capsys, slide_bytes) -> None:
    put(tmp_path, ["x.tiff"], slide_bytes)
    csv = tmp_path / "slides.csv"
    csv.write_text("slide,mpp\nx.tiff,0.5\nx.tiff,0.25\n")
    job = tmp_path / "job"
    check(hwsi(capsys, "tile", csv, "--out", job, *GRID), 2, f"{csv}:3", "x.tiff", f"{csv}:2", "another mpp")
    assert not job.exists()  # refused before anything was made


# ---- output folders -----------------------------------------------------------------------------------------
def test_out_is_an_existing_file(tmp_path: Path, capsys, slide_bytes) -> None:
    (s,) = put(tmp_path / "in", ["s.tiff"], slide_bytes)
    out = tmp_path / "job"
    out.write_text("keep me")
    check(hwsi(capsys, "tile", s, "--out", out, *GRID), 2, str(out), "existing file, not a folder")
    assert out.read_text() == "keep me"


def test_out_below_an_existing_file(tmp_path: Path, capsys, slide_bytes) -> None:
    (s,) = put(tmp_path / "in", ["s.tiff"], slide_bytes)
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" / "job"
    check(hwsi(capsys, "tile", s, "--out", out, *GRID), 2, str(out), "cannot create the job folder", "is a file")


def test_read_only_job_folder_tile(tmp_path: Path, capsys, slide_bytes) -> None:
    (s,) = put(tmp_path / "in", ["s.tiff"], slide_bytes)
    job = tmp_path / "job"
    job.mkdir()
    with read_only(job):
        check(hwsi(capsys, "tile", s, "--out", job, *GRID), 2, str(job), "not writable")
    assert list(job.iterdir()) == []


def test_stores_is_a_file(tmp_path: Path, capsys, slide_bytes) -> None:
    (s,) = put(tmp_path / "in", ["s.tiff"], slide_bytes)
    job = tmp_path / "job"
    job.mkdir()
    (job / "stores").write_text("not a folder")
    check(hwsi(capsys, "tile", s, "--out", job, *GRID), 2, str(job / "stores"), "existing file, not a folder")


def test_read_only_job_folder_extract(tmp_path: Path, capsys, slide_bytes) -> None:
    (s,) = put(tmp_path / "in", ["s.tiff"], slide_bytes)
    job = tmp_path / "job"
    check(hwsi(capsys, "tile", s, "--out", job, *GRID), 0)
    before = sorted(p.name for p in job.rglob("*"))
    with read_only(job):
        check(hwsi(capsys, "extract", job, "--cells", "none", "-q"), 2, str(job), "not writable")
    assert sorted(p.name for p in job.rglob("*")) == before
    clean(job)


def test_read_only_stores_extract(tmp_path: Path, capsys, slide_bytes) -> None:
    (s,) = put(tmp_path / "in", ["s.tiff"], slide_bytes)
    job = tmp_path / "job"
    check(hwsi(capsys, "tile", s, "--out", job, *GRID), 0)
    with read_only(job / "stores"):
        check(hwsi(capsys, "extract", job, "--cells", "none", "-q"), 2, str(job / "stores"), "not writable")
    assert not (job / "errors" / "s.extract.json").exists()
    clean(job)


# ---- temporaries and two runs on one job --------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_rerun_removes_temporaries_of_killed_runs_only(tmp_path: Path, capsys, slide_bytes) -> None:
    """Leftovers of a dead writer (new and old naming) go; a live process's temporary stays untouched."""
    src = tmp_path / "in"
    put(src, ["a.tiff", "b.tiff"], slide_bytes)
    job = tmp_path / "job"
    (job / "stores").mkdir(parents=True)
    dead = _dead_pid()
    stale = [job / "stores" / f"a.h5.tmp-{dead}-0badc0de@{host_name()}", job / "stores" / f"b.h5.tmp-{dead}",
             job / f"slides.json.tmp-{dead}-00ff@{host_name()}"]
    for p in stale:
        p.write_bytes(b"half a store")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = job / "stores" / f"a.h5.tmp-{live.pid}-12345678@{host_name()}"
        elsewhere = job / "stores" / f"a.h5.tmp-{dead}-12345678@another-host"
        alive.write_bytes(b"being written")
        elsewhere.write_bytes(b"being written on another machine")
        check(hwsi(capsys, "tile", src, "--out", job, *GRID), 0)
        assert not any(p.exists() for p in stale)
        assert alive.read_bytes() == b"being written" and elsewhere.exists()
    finally:
        live.kill()
        live.wait()
    alive.unlink()
    elsewhere.unlink()
    assert sorted(p.stem for p in list_stores(job)) == ["a", "b"]
    clean(job)


def test_two_tile_processes_on_one_job_both_succeed(tmp_path: Path, slide_bytes, other_bytes) -> None:
    src_a, src_b = tmp_path / "in_a", tmp_path / "in_b"
    put(src_a, [f"s{i}.tiff" for i in range(4)], slide_bytes)
    put(src_b, [f"s{i}.tiff" for i in range(2, 4)], slide_bytes)  # same names, other files: ids must differ
    put(src_b, ["t0.tiff"], other_bytes)
    job = tmp_path / "job"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "hwsi.cli", "tile"]
    procs = [subprocess.Popen([*cmd, str(s), "--out", str(job), *GRID], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in (src_a, src_a, src_b)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        check(Run(p.returncode, "", err), 0)
    reg = registry(job)
    paths = sorted(reg.values())
    assert len(paths) == len(set(paths)) == 7  # 4 of a, 3 of b, each under its own id
    for sid, path in reg.items():
        assert store_source(job, sid) == path
    assert sorted(p.stem for p in list_stores(job)) == sorted(reg)
    clean(job)


# ---- the same preparation behind every other --out folder ---------------------------------------------------
def test_synth_into_a_read_only_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cohort"
    out.mkdir()
    with read_only(out):
        run = hwsi(capsys, "synth", "--out", out, "--size", "1024", "--region-size", "256", "--patch-size", "64")
        check(run, 2, str(out), "--out folder", "not writable")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("cmd", [
    ["eval", "--data", "{tmp}/no-data", "--model", "{tmp}/no-model", "--task", "vqa"],
    ["train", "--stage", "1", "--config", "tiny", "--job", "{tmp}"],
    ["train-encoder", "--n", "8"],
])
def test_out_is_a_file_for_other_commands(tmp_path: Path, capsys, cmd: list[str]) -> None:
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    args = [a.replace("{tmp}", str(tmp_path)) for a in cmd]
    check(hwsi(capsys, *args, "--out", out), 2, str(out), "existing file, not a folder")
    assert out.read_text() == "keep me"


def test_synth_out_below_a_file_creates_nothing(tmp_path: Path, capsys) -> None:
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" / "cohort"
    run = hwsi(capsys, "synth", "--out", out, "--size", "1024", "--region-size", "256", "--patch-size", "64")
    check(run, 2, str(out), "cannot create the --out folder", f"{tmp_path / 'f'} is a file")
    assert (tmp_path / "f").read_text() == "x"

"""`hwsi tile`: stores, batch semantics (errors, skip on rerun, kill safety) and CLI exit codes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hwsi.cli import main
from hwsi.slide.tile import collect_slides, tile_batch, TileConfig
from hwsi.slide.grid import GridConfig
from hwsi.store import SlideStore, has_stage, list_stores
from hwsi.synth.pyramid import write_pyramid_tiff


def pink(x0: int, y0: int, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w]
    img = np.stack([200 + 0 * xx, 110 + (xx % 40), 170 + (yy % 30)], -1).astype(np.uint8)
    img[(xx - 900) ** 2 + (yy - 700) ** 2 > 600**2] = 242  # a disc of tissue on glass
    return img


def test_cli_on_real_slides(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job"
    rc = main(["tile", str(shared_data / "slides"), "--out", str(job), "--region-size", "1024", "--preview", "-q"])
    assert rc == 1  # some slides are bad on purpose
    assert [p.name for p in list_stores(job)] == ["cmu-1-small-region.h5"]
    errs = {p.name: json.loads(p.read_text()) for p in (job / "errors").glob("*.json")}
    assert set(errs) == {"boxes.tile.json", "kidney-48-5.tile.json", "small_dicom.tile.json", "small.tile.json"}
    assert "unsupported or corrupt" in errs["small_dicom.tile.json"]["message"]
    assert "--mpp" in errs["kidney-48-5.tile.json"]["message"]
    assert "no tissue" in errs["small.tile.json"]["message"]
    with SlideStore(job / "stores" / "cmu-1-small-region.h5") as st:
        m = st.meta
        assert m.stages == ["tile"] and m.mpp_level0 == pytest.approx(0.499) and m.effective_mpp == pytest.approx(0.499)
        assert m.region_size == 1024 and m.region_size_level0 == 1024 and (m.level0_width, m.level0_height) == (2220, 2967)
        assert st.patch_coords().shape == (st.n_regions, 16, 2) and st.patch_tissue().dtype == bool
        _, dtype, attrs = st.dataset_info("tissue/mask")
        assert attrs["downsample"] > 1 and dtype == np.uint8 and st.tissue_mask()[1] == "tissue/mask"
        assert st.thumbnail()[0].ndim == 3
    assert (job / "previews" / "cmu-1-small-region.png").stat().st_size > 1000
    reg = json.loads((job / "slides.json").read_text())
    assert reg["cmu-1-small-region"]["mpp"] == pytest.approx(0.499)
    assert reg["cmu-1-small-region"]["mpp_source"] == "openslide"
    # rerun: the finished slide is skipped, the bad ones fail again
    res = tile_batch(shared_data / "slides", job, TileConfig(grid=GridConfig(region_size=1024)), show_progress=False)
    st = {o.slide_id: o.status for o in res.outcomes}
    assert st["cmu-1-small-region"] == "skipped" and st["small_dicom"] == "failed" and res.exit_code == 1


def test_kidney_with_mpp_csv(shared_data: Path, tmp_path: Path) -> None:
    csv = tmp_path / "slides.csv"
    csv.write_text(f"slide,mpp\n{shared_data / 'slides' / 'kidney-48-5.tif'},0.5\n")
    job = tmp_path / "job"
    # the slide holds one ~70 x 35 px fragment: small regions and a low region threshold
    rc = main(["tile", str(csv), "--out", str(job), "--region-size", "256", "--patch-size", "64",
               "--min-region-tissue", "0.02", "-q"])
    assert rc == 0
    with SlideStore(job / "stores" / "kidney-48-5.h5") as st:
        assert st.meta.mpp_source == "user" and st.n_regions >= 1 and st.patch_tissue().any()
    assert json.loads((job / "slides.json").read_text())["kidney-48-5"]["mpp"] == 0.5


def test_corrupt_file_among_good_ones(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        write_pyramid_tiff(src / f"good{i}.tiff", 1800, 1400, 0.5, pink)
    data = (src / "good0.tiff").read_bytes()
    (src / "broken.tiff").write_bytes(data[: len(data) // 3])  # truncated copy
    job = tmp_path / "job"
    cfg = TileConfig(grid=GridConfig(region_size=512, patch_size=128))
    res = tile_batch(src, job, cfg, show_progress=False)
    st = {o.slide_id: o.status for o in res.outcomes}
    assert st == {"broken": "failed", "good0": "done", "good1": "done"} and res.exit_code == 1
    rec = json.loads((job / "errors" / "broken.tile.json").read_text())
    assert rec["stage"] == "tile" and "broken.tiff" in rec["message"]
    assert all(has_stage(p, "tile") for p in list_stores(job)) and len(list_stores(job)) == 2
    res = tile_batch(src, job, cfg, show_progress=False)
    assert {o.slide_id: o.status for o in res.outcomes} == {"broken": "failed", "good0": "skipped", "good1": "skipped"}


def test_collect_slides_unique_ids_and_csv_errors(tmp_path: Path) -> None:
    from hwsi.errors import ConfigError, HwsiError

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.svs").write_bytes(b"1")
    (tmp_path / "a" / "x.tiff").write_bytes(b"1")
    (tmp_path / "a" / "notes.txt").write_text("no")
    ids = [s.slide_id for s in collect_slides(tmp_path / "a")]
    assert ids == ["x.svs", "x.tiff"]  # stems clash: both take their whole file name (hwsi.slide.ids)
    bad = tmp_path / "bad.csv"
    bad.write_text("path\nx.svs\n")
    with pytest.raises(ConfigError, match="'slide' column"):
        collect_slides(bad)
    with pytest.raises(HwsiError, match="no slide files"):
        collect_slides(tmp_path / "a" / ".." / "a" / "..")  # tmp_path itself has only folders and csv


def test_slide_ids_one_rule_whatever_the_order(tmp_path: Path) -> None:
    import random

    from hwsi.slide.ids import allocate_ids, path_key

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for n in ["x-2.svs", "x.svs", "x.tiff", "X.tif", "y.svs", "z.svs"]:
        (a / n).write_bytes(b"1")
    (b / "x.svs").write_bytes(b"1")
    (a / "link.svs").symlink_to(a / "z.svs")  # one file, two names: one slide, named by the smaller spelling
    paths = sorted(a.iterdir()) + [b / "x.svs"]
    ids = allocate_ids(paths)
    by_name = {Path(k).relative_to(tmp_path).as_posix(): v for k, v in ids.items()}
    assert by_name["a/x-2.svs"] == "x-2" and by_name["a/x.tiff"] == "x.tiff" and by_name["a/X.tif"] == "X.tif"
    assert by_name["a/y.svs"] == "y" and by_name["a/z.svs"] == "link"
    assert by_name["a/x.svs"].startswith("x.svs-") and by_name["b/x.svs"].startswith("x.svs-")
    assert len({v.casefold() for v in ids.values()}) == len(ids) == 7
    rng = random.Random(0)
    for _ in range(20):
        rng.shuffle(paths)
        assert allocate_ids(paths) == ids
    # ids the job holds: a known file keeps its id, an id held by another file is never handed out again
    held = allocate_ids([a / "y.svs", a / "x.tiff"], {"old": path_key(a / "y.svs"), "x": "/elsewhere/x.tiff"})
    assert held == {path_key(a / "y.svs"): "old", path_key(a / "x.tiff"): "x.tiff"}


def test_cli_bad_input_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tile", str(tmp_path / "missing"), "--out", str(tmp_path / "job")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["tile", str(tmp_path), "--out", str(tmp_path / "j"), "--region-size", "500",
                 "--patch-size", "256"]) == 2
    assert "multiple of patch_size" in capsys.readouterr().err


def test_killed_run_leaves_nothing_that_looks_finished(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        write_pyramid_tiff(src / f"s{i}.tiff", 3000, 2600, 0.25, pink, threads=2)
    job = tmp_path / "job"
    code = (
        "import sys; from hwsi.cli import main; "
        f"sys.exit(main(['tile', {str(src)!r}, '--out', {str(job)!r}, '--region-size', '512', '-q']))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stores = job / "stores"
    deadline = time.time() + 60
    while time.time() < deadline:
        if stores.is_dir() and any(stores.iterdir()):
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = list_stores(job)
    assert len(finished) < 6, "run finished before it could be killed"
    for p in finished:  # anything named like a store is complete and readable
        assert has_stage(p, "tile")
        with SlideStore(p) as s:
            assert s.patch_coords().shape[0] == s.region_coords().shape[0]
    left = list(stores.glob("*.tmp-*"))
    # the rerun finishes the job and removes what the killed run left behind (its writer is dead)
    assert main(["tile", str(src), "--out", str(job), "--region-size", "512", "-q"]) == 0
    assert len(list_stores(job)) == 6 and not list(job.rglob("*.tmp-*")), left
    rc = main(["tile", str(src), "--out", str(job), "--region-size", "512", "-q"])
    assert rc == 0 and len(list_stores(job)) == 6
    shutil.rmtree(src)

"""`hwsi import-features JOB FOLDER` on whole job folders of other tools (hwsi.features.import_batch):

* TRIDENT (mahmoodlab/TRIDENT 0.3.0): ``<job>/<mag>x_<ps>px_<ov>px_overlap/features_<encoder>/<slide>.h5`` beside
  ``patches/<slide>_patches.h5`` and ``slide_features_<encoder>/``, files written as ``IO.save_h5`` writes them;
* CLAM (mahmoodlab/CLAM): ``FEATURES_DIRECTORY/h5_files/<slide>.h5`` + ``pt_files/<slide>.pt``, with the real CLAM
  patch coordinates of ../shared/data/foreign/clam (read in place).

Files map to slides by name; files without a slide are recorded as failed, slides without a file are listed.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from hwsi.cli import main
from hwsi.store import SlideStore, store_path
from test_import_features import make_store, write_trident
from test_import_features_clam import SLIDE_ID, SLIDE_WH, save_hdf5_like_clam, tiled_store

REGIONS = [(0, 0), (1024, 0)]


def _trident_job(root: Path, coords: np.ndarray, slides: list[str], encoders: tuple[str, ...]) -> None:
    mag = root / "20x_256px_0px_overlap"
    (mag / "patches").mkdir(parents=True)
    (mag / "slide_features_titan").mkdir()  # slide embeddings: not patch features
    for enc in encoders:
        (mag / f"features_{enc}").mkdir()
        for s in slides:
            write_trident(mag / f"features_{enc}" / f"{s}.h5", np.ones((len(coords), 4), np.float32), coords)
    for s in slides:
        with h5py.File(mag / "patches" / f"{s}_patches.h5", "w") as f:
            f["coords"] = coords


def _flat_tissue_coords(job: Path, sid: str) -> np.ndarray:
    with SlideStore(store_path(job, sid)) as s:
        pc, pt = s.patch_coords(), s.patch_tissue()
    return pc[pt]


def test_a_whole_trident_job_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job"
    for sid in ("s1", "s2"):
        make_store(store_path(job, sid), REGIONS)
    coords = _flat_tissue_coords(job, "s1")
    trident = tmp_path / "trident_job"
    _trident_job(trident, coords, ["s1", "stray"], ("uni_v1", "conch_v15"))
    capsys.readouterr()
    # two encoders: one must be picked
    assert main(["import-features", str(job), str(trident), "--name", "uni", "-q"]) == 2
    err = capsys.readouterr().err
    assert "2 TRIDENT features folders (20x_256px_0px_overlap/features_conch_v15, 20x_256px_0px_overlap/" \
           "features_uni_v1); choose one with --encoder NAME" in err and len(err.strip().splitlines()) == 1
    assert main(["import-features", str(job), str(trident), "--name", "uni", "--encoder", "uni_v1", "-q"]) == 1
    err = capsys.readouterr().err
    assert "1 file(s) match no slide of" in err and "stray.h5 (recorded as failed)" in err
    assert "no features file for 1 slide(s) of" in err and ": s2 (not imported)" in err
    assert "1 done, 0 skipped, 1 failed" in err
    rec = json.loads((job / "errors" / "stray.import-features.json").read_text())
    assert "matches no slide of" in rec["message"] and "stray.<ext>" in rec["message"]
    with SlideStore(store_path(job, "s1")) as s:
        assert s.has_features("uni") and s.patch_features("uni").shape[-1] == 4
    with SlideStore(store_path(job, "s2")) as s:
        assert not s.has_features("uni")
    # an encoder the job lacks
    assert main(["import-features", str(job), str(trident), "--name", "x", "--encoder", "virchow", "-q"]) == 2
    assert "no TRIDENT features_virchow/ folder" in capsys.readouterr().err
    # the features_<enc>/ folder itself, as before
    assert main(["import-features", str(job), str(trident / "20x_256px_0px_overlap" / "features_conch_v15"),
                 "--name", "conch", "-q"]) == 1


def test_a_clam_features_folder_mapped_by_the_slide_files_name(clam_patches: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """CLAM names files by the slide file without its extension; a slide the job gave another id (here it kept the
    id of an earlier run) is found through JOB/slides.json."""
    job = tmp_path / "job"
    tiled_store(store_path(job, "case-7"), *SLIDE_WH, mpp0=0.25)
    tiled_store(store_path(job, "other"), 8000, 8000, mpp0=0.25)
    (job / "slides.json").write_text(json.dumps({
        "case-7": {"path": f"/data/tcga/{SLIDE_ID}.svs", "mpp": 0.25},
        "other": {"path": "/data/tcga/other.svs", "mpp": 0.25}}))
    with h5py.File(clam_patches) as f:
        coords = f["coords"][:]
    feat = tmp_path / "FEATURES_DIRECTORY"
    (feat / "h5_files").mkdir(parents=True)
    (feat / "pt_files").mkdir()
    save_hdf5_like_clam(feat / "h5_files" / f"{SLIDE_ID}.h5", np.ones((len(coords), 4), np.float32), coords)
    (feat / "pt_files" / f"{SLIDE_ID}.pt").write_bytes(b"")  # the .h5 is preferred
    capsys.readouterr()
    assert main(["import-features", str(job), str(feat), "--name", "r50", "-q"]) == 0
    err = capsys.readouterr().err
    assert "no features file for 1 slide(s) of" in err and ": other (not imported)" in err
    with SlideStore(store_path(job, "case-7")) as s:
        assert s.has_features("r50")


def test_one_slide_two_files_and_encoder_on_one_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job"
    make_store(store_path(job, "s1"), REGIONS)
    (job / "slides.json").write_text(json.dumps({"s1": {"path": "/d/case.1.svs"}}))
    coords = _flat_tissue_coords(job, "s1")
    folder = tmp_path / "feats"
    folder.mkdir()
    write_trident(folder / "s1.h5", np.ones((len(coords), 4), np.float32), coords)
    write_trident(folder / "case.1.h5", np.ones((len(coords), 4), np.float32), coords)  # the same slide by source
    capsys.readouterr()
    assert main(["import-features", str(job), str(folder), "--name", "u", "-q"]) == 1
    rec = json.loads((job / "errors" / "case.1.import-features.json").read_text())
    assert "slide 's1' already has a features file (s1.h5)" in rec["message"]
    assert main(["import-features", str(job), str(folder / "s1.h5"), "--name", "u", "--encoder", "x"]) == 2
    assert "--encoder picks the features_<ENCODER>/ folder of a TRIDENT job" in capsys.readouterr().err


@pytest.fixture(scope="module")
def clam_patches(shared_data: Path) -> Path:
    p = shared_data / "foreign" / "clam" / "TCGA-2V-A95S_patches.h5"
    if not p.is_file():
        pytest.skip(f"{p} is not present")
    return p

"""`hwsi extract` end to end on a small synthetic pyramidal slide: features, SPF, cells (Eq. 3), atomicity, resume."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from hwsi.errors import SlideError
from hwsi.features.extract import (
    ExtractConfig,
    ExtractError,
    Models,
    extract_slide,
    find_cellvit_files,
    is_extracted,
    load_models,
    run_extract,
)
from hwsi.store import StoreMeta, store_path

REGION, PATCH = 512, 128  # G = 16 patches per region
LATTICE, RADIUS = 40, 7
PINK = np.array([236, 178, 206], np.uint8)
STROMA = np.array([222, 140, 180], np.uint8)
NUC = np.array([70, 40, 130], np.uint8)


def _centres(xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    i, j = xx // LATTICE, yy // LATTICE
    jx = ((i * 73856093) ^ (j * 19349663)) % 17 - 8
    jy = ((i * 83492791) ^ (j * 2654435761)) % 17 - 8
    return i * LATTICE + LATTICE // 2 + jx, j * LATTICE + LATTICE // 2 + jy


def pattern_a(xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Epithelium with nuclei: x < 512 and y < 768 (so region (0, 512) holds both patterns)."""
    return (xx < 512) & (yy < 768)


def tile_fn(x0: int, y0: int, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w]
    img = np.full((h, w, 3), 245, np.uint8)
    tissue = (xx < 1024) & (yy < 1024) & ~((xx >= 768) & (yy >= 768))  # notch: non-tissue patches in region 3
    a = tissue & pattern_a(xx, yy)
    b = tissue & ~a
    stripe = ((xx + yy) // 12) % 2 == 0
    img[a] = PINK
    img[b & stripe] = STROMA
    img[b & ~stripe] = PINK
    cx, cy = _centres(xx, yy)
    img[a & ((xx - cx) ** 2 + (yy - cy) ** 2 <= RADIUS**2)] = NUC
    return img


@pytest.fixture(scope="module")
def models() -> Models:
    return load_models(ExtractConfig(k=4, n_div=8), log=lambda m: None)


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hwsi.synth.pyramid import write_pyramid_tiff

    d = tmp_path_factory.mktemp("slides")
    write_pyramid_tiff(d / "s1.tiff", 1536, 1024, 0.5, tile_fn, min_level_side=256)
    return d / "s1.tiff"


def tiled_job(slide_file: Path, job: Path) -> Path:
    from hwsi.slide import GridConfig, TileConfig, tile_batch

    res = tile_batch(slide_file, job, TileConfig(grid=GridConfig(region_size=REGION, patch_size=PATCH)),
                     show_progress=False)
    assert res.exit_code == 0
    return store_path(job, "s1")


@pytest.fixture(scope="module")
def extracted(slide_file: Path, models: Models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    job = tmp_path_factory.mktemp("job")
    tiled_job(slide_file, job)
    res = run_extract(job, ExtractConfig(k=4, n_div=8), show_progress=False, models=models)
    assert res.exit_code == 0 and res.outcomes[0].status == "done"
    return job


def test_store_layout_and_features(extracted: Path, models: Models, slide_file: Path) -> None:
    import openslide

    with h5py.File(store_path(extracted, "s1")) as f:
        tissue = f["patches/tissue"][:]
        coords = f["patches/coords"][:]
        feats = f["patches/hwsi_small_patch"]
        assert feats.shape == (4, 16, 384) and feats.dtype == np.float32 and feats.chunks == (1, 16, 384)
        x = feats[:]
        assert json.loads(f.attrs["stages"]) == ["tile", "features", "spf", "cells", "extract"]
        assert f.attrs["patch_encoder"] == "hwsi_small_patch" and f.attrs["region_input"] == "hwsi_small_patch"
        assert "patches/hwsi_small_patch" in f and len([k for k in f["patches"] if k.startswith("hwsi")]) == 1
        assert json.loads(f.attrs["encoders"]) == {"hwsi_small_patch": 384}
        assert f["spf/text_embeddings"].shape == (len(models.terms), 384)
    assert (~tissue).sum() == 4
    assert (x[~tissue] == 0).all() and (np.abs(x[tissue]).sum(1) > 0).all() and np.isfinite(x).all()
    # the stored row of patch (r, g) is the encoding of the pixels at patches/coords[r, g]
    s = openslide.OpenSlide(str(slide_file))
    for r, g in [(0, 0), (2, 9), (3, 13)]:
        px, py = (int(v) for v in coords[r, g])
        img = np.asarray(s.read_region((px, py), 0, (PATCH, PATCH)).convert("RGB"))
        ref = models.patch_encoder.encode(img[None].copy())[0]
        cos = ref @ x[r, g] / np.linalg.norm(ref) / np.linalg.norm(x[r, g])
        assert cos > 0.995, (r, g, cos)
    s.close()


def test_spf_outputs(extracted: Path) -> None:
    with h5py.File(store_path(extracted, "s1")) as f:
        tissue = f["patches/tissue"][:]
        coords = f["patches/coords"][:]
        sel = f["spf/selected"][:]
        rel = f["spf/relevance"][:]
        div = f["spf/diverse"][:]
        kept = f["spf/kept_eq1"][:]
        assert f["spf"].attrs["k"] == 4 and f["spf"].attrs["n_div"] == 8
    assert sel.shape == (4, 4) and sel.dtype == np.int32 and (sel >= 0).all()
    assert all(tissue[r, sel[r]].all() for r in range(4))
    assert np.isnan(rel[~tissue]).all() and np.isfinite(rel[tissue]).all()
    assert not kept[~tissue].any() and (div.sum(1) == 8).all()
    # region 2 (top-left (0, 512)) holds epithelium (rows 0-1) and stroma (rows 2-3): the diverse set keeps both
    c = coords[2][div[2]]
    a = pattern_a(c[:, 0] + PATCH // 2, c[:, 1] + PATCH // 2)
    assert a.any() and (~a).any()


def test_cells_only_in_selected_patches_with_level0_centroids(extracted: Path) -> None:
    with h5py.File(store_path(extracted, "s1")) as f:
        sel = f["spf/selected"][:]
        coords = f["patches/coords"][:]
        counts = np.diff(f["cells/offsets"][:]).reshape(4, 16)
        x, y = f["cells/x"][:], f["cells/y"][:]
        reg, pat = f["cells/region"][:], f["cells/patch"][:]
        emb = f["cells/embeddings"][:]
        assert f["cells"].attrs["scope"] == "spf_selected"
    selected = np.zeros((4, 16), bool)
    for r in range(4):
        selected[r, sel[r][sel[r] >= 0]] = True
    assert counts[~selected].sum() == 0  # Eq. 3: only P_ij in R̂_i are segmented
    assert len(x) == counts.sum() > 20 and emb.shape[0] == len(x)
    # each centroid lies in its patch and on a drawn nucleus (level-0 coordinates)
    px, py = coords[reg, pat, 0], coords[reg, pat, 1]
    assert ((x >= px) & (x < px + PATCH) & (y >= py) & (y < py + PATCH)).all()
    cx, cy = _centres(x, y)
    assert np.median(np.hypot(x - cx, y - cy)) <= 2.0
    # patches with nuclei (epithelium) that were selected got cells; stroma ones none
    for r, g in zip(*np.nonzero(selected)):
        cxy = coords[r, g] + PATCH // 2
        if pattern_a(cxy[0], cxy[1]) and pattern_a(cxy[0] + 60, cxy[1] + 60):
            assert counts[r, g] > 3


def test_rerun_skips_and_changed_settings_redo(extracted: Path, models: Models) -> None:
    res = run_extract(extracted, ExtractConfig(k=4, n_div=8), show_progress=False, models=models)
    assert [o.status for o in res.outcomes] == ["skipped"]
    cfg = ExtractConfig(k=2, n_div=8, cells="none")
    m2 = Models(**{**models.__dict__, "settings": {**models.settings, "k": 2, "cells": "none"}})
    res = run_extract(extracted, cfg, show_progress=False, models=m2)
    assert [o.status for o in res.outcomes] == ["done"]
    with h5py.File(store_path(extracted, "s1")) as f:
        assert f["spf/selected"].shape == (4, 2) and f["cells/embeddings"].shape[0] == 0
        assert f["cells"].attrs["backend"] == "none" and "cells" not in json.loads(f.attrs["stages"])
        assert json.loads(f.attrs["extract"])["k"] == 2


def _meta(store: Path) -> StoreMeta:
    from hwsi.store import read_meta

    with h5py.File(store) as f:
        return read_meta(f, store)


def test_failure_mid_slide_leaves_store_untouched(slide_file: Path, models: Models, tmp_path: Path) -> None:
    from hwsi.features.region_stream import slide_region_stream

    store = tiled_job(slide_file, tmp_path / "job")
    before = store.read_bytes()

    def broken(st: Path, meta: StoreMeta, sp: Path, threads: int) -> Iterator[tuple[int, np.ndarray, None]]:
        for i, (r, p, bad) in enumerate(slide_region_stream(st, meta, sp, threads)):
            if i == 2:
                raise SlideError(sp, "corrupt JPEG data")
            yield r, p, bad

    res = run_extract(tmp_path / "job", ExtractConfig(k=4, n_div=8), show_progress=False, models=models,
                      region_stream=broken)
    assert res.exit_code == 1
    rec = json.loads((tmp_path / "job" / "errors" / "s1.extract.json").read_text())
    assert rec["error"] == "SlideError" and "corrupt JPEG" in rec["message"]
    assert store.read_bytes() == before  # the tiled store is intact
    assert not list(store.parent.glob("*.tmp-*"))
    # a later good run resumes and removes the error record
    res = run_extract(tmp_path / "job", ExtractConfig(k=4, n_div=8), show_progress=False, models=models)
    assert res.exit_code == 0 and not (tmp_path / "job" / "errors" / "s1.extract.json").exists()


def test_cleanup_spares_the_temporary_of_a_running_extract(slide_file: Path, models: Models, tmp_path: Path) -> None:
    """A second `extract` on the job removes only temporaries of DEAD writers, never a running one's."""
    import socket
    import subprocess
    import sys

    store = tiled_job(slide_file, tmp_path / "job")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # "another extract"
    try:
        running = store.with_name(f"{store.name}.tmp-{other.pid}-0abc1234@{socket.gethostname()}")
        running.write_bytes(b"a store being written by another process")
        res = run_extract(tmp_path / "job", ExtractConfig(k=4, n_div=8, cells="none"), show_progress=False,
                          models=models)
        assert res.exit_code == 0 and running.read_bytes() == b"a store being written by another process"
    finally:
        other.kill()
        other.wait()
    running.unlink()


def test_two_extracts_on_one_job_both_succeed(slide_file: Path, models: Models, tmp_path: Path) -> None:
    """Two runs at once (threads here; processes take the same locks): each slide is extracted once, both exit 0."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    job = tmp_path / "job"
    store = tiled_job(slide_file, job)
    for n in (2, 3):
        shutil.copy(store, store.with_name(f"s{n}.h5"))
    cfg = ExtractConfig(k=4, n_div=8, cells="none")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: run_extract(job, cfg, show_progress=False, models=models), range(2)))
    assert [r.exit_code for r in results] == [0, 0]
    status = [o.status for r in results for o in r.outcomes]
    assert status.count("done") == 3 and status.count("skipped") == 3
    assert all(is_extracted(p, models.settings) for p in job.glob("stores/*.h5"))
    assert not list(job.rglob("*.tmp-*"))


def test_corrupt_patches_are_not_encoded(slide_file: Path, models: Models, tmp_path: Path) -> None:
    from hwsi.features.region_stream import slide_region_stream

    store = tiled_job(slide_file, tmp_path / "job")

    def with_bad(st: Path, meta: StoreMeta, sp: Path, threads: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for r, p, _ in slide_region_stream(st, meta, sp, threads):
            bad = np.zeros(16, bool)
            if r == 1:
                bad[[0, 5]] = True
                p[[0, 5]] = 0  # the reader fills corrupt tiles black
            yield r, p, bad

    extract_slide(store, models, ExtractConfig(k=4, n_div=8, cells="none"), region_stream=with_bad)
    with h5py.File(store) as f:
        assert f["patches/corrupt"][1].nonzero()[0].tolist() == [0, 5]
        assert not f["patches/tissue"][1, [0, 5]].any()
        assert (f["patches/hwsi_small_patch"][1, [0, 5]] == 0).all()
        assert not np.isin(f["spf/selected"][1], [0, 5]).any()


def test_cellvit_ingest_keeps_cells_of_selected_patches(slide_file: Path, models: Models, tmp_path: Path) -> None:
    store = tiled_job(slide_file, tmp_path / "job")
    with h5py.File(store) as f:
        coords = f["patches/coords"][:]
    # one fake CellViT cell at the centre of every patch, with a 3-d token equal to (region, patch, 7)
    cells, toks = [], []
    for r in range(coords.shape[0]):
        for g in range(coords.shape[1]):
            cx, cy = (coords[r, g] + PATCH // 2).tolist()
            cells.append({"centroid": [cx, cy], "type": 1, "type_prob": 0.9, "bbox": [[cy - 3, cx - 3], [cy + 3, cx + 3]]})
            toks.append([r, g, 7.0])
    cells.append({"centroid": [5000, 5000], "type": 2, "type_prob": 0.5, "bbox": [[0, 0], [1, 1]]})  # outside
    toks.append([-1, -1, -1])
    d = tmp_path / "cellvit" / "s1" / "cell_detection"
    d.mkdir(parents=True)
    (d / "cells.json").write_text(json.dumps({"type_map": {"0": "Background", "1": "Neoplastic", "2": "Inflammatory"},
                                              "cells": cells}))
    np.save(d / "cells.npy", np.asarray(toks, np.float32))
    assert find_cellvit_files(tmp_path / "cellvit", "s1") == (d / "cells.json", d / "cells.npy")
    cfg = ExtractConfig(k=4, n_div=8, cells=f"cellvit:{tmp_path / 'cellvit'}")
    tm = extract_slide(store, models, cfg, cellvit_dir=tmp_path / "cellvit")
    with h5py.File(store) as f:
        sel = f["spf/selected"][:]
        emb = f["cells/embeddings"][:]
        reg, pat = f["cells/region"][:], f["cells/patch"][:]
        assert f["cells"].attrs["backend"] == "cellvit" and f["cells"].attrs["n_outside_regions"] == 1
    assert tm.n_cells == len(emb) == (sel >= 0).sum()
    assert all(p in sel[r] for r, p in zip(reg, pat))
    np.testing.assert_array_equal(emb[:, :2], np.stack([reg, pat], 1))
    with pytest.raises(ExtractError, match="no CellViT output for slide 'zz'"):
        find_cellvit_files(tmp_path / "cellvit", "zz")


def test_cli_errors(tmp_path: Path) -> None:
    from hwsi.cli import main

    assert main(["extract", str(tmp_path / "empty")]) == 2
    with pytest.raises(Exception, match="--cells must be"):
        ExtractConfig(cells="magic").validate()


def test_separate_region_input_encoder(slide_file: Path, models: Models, tmp_path: Path) -> None:
    from hwsi.features.encoders import create_encoder, encoder_entry

    store = tiled_job(slide_file, tmp_path / "job")
    hipt = create_encoder("hipt_vit256", **encoder_entry("hipt_vit256").tiny)
    m = Models(**{**models.__dict__, "region_encoder": hipt, "region_name": "hipt_vit256",
                  "settings": {**models.settings, "region_input": "hipt_vit256"}})
    tm = extract_slide(store, m, ExtractConfig(k=4, n_div=8, cells="none"))
    assert tm.region_input > 0
    with h5py.File(store) as f:
        tissue = f["patches/tissue"][:]
        ri = f["patches/hipt_vit256"][:]
        assert ri.shape == (4, 16, hipt.embed_dim) and f["patches/hipt_vit256"].chunks == (1, 16, hipt.embed_dim)
        assert f.attrs["region_input"] == "hipt_vit256" and f.attrs["patch_encoder"] == "hwsi_small_patch"
        assert json.loads(f.attrs["encoders"]) == {"hwsi_small_patch": 384, "hipt_vit256": hipt.embed_dim}
    assert (ri[~tissue] == 0).all() and (np.abs(ri[tissue]).sum(1) > 0).all()


def test_spf_candidates_min_tissue_with_fallback() -> None:
    from hwsi.features.slide_extraction import spf_candidates

    tissue = np.array([True, True, True, False])
    frac = np.array([0.3, 0.6, 1.0, 0.9], np.float32)
    assert spf_candidates(tissue, frac, 0.5).tolist() == [False, True, True, False]  # glass-edge patch out
    assert spf_candidates(tissue, frac, 0.0).tolist() == tissue.tolist()
    # a region of thin tissue only: every tissue patch stays a candidate (never a region without patch tokens)
    assert spf_candidates(tissue, np.full(4, 0.3, np.float32), 0.5).tolist() == tissue.tolist()
    with pytest.raises(Exception, match="min-tissue"):
        ExtractConfig(min_tissue=1.5).validate()

"""`hwsi import-features` on what CLAM writes: the real patches file of ../shared/data/foreign/clam and features
files built the way CLAM's extract_features_fp.py writes them (mahmoodlab/CLAM @53e2409: ``save_hdf5(output_path,
{'features', 'coords'}, attr_dict=None, mode='w' then 'a')`` per batch, features float32, coords int32; the .pt is
``torch.save(torch.from_numpy(features))``)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from hwsi.cli import main
from hwsi.features.import_config import ImportConfig
from hwsi.features.import_features import FeatureImportError, import_features, read_foreign_features
from hwsi.store import SlideStore, StoreMeta, new_store, store_path

SLIDE_ID = "TCGA-2V-A95S-01Z-00-DX1.9DFA6FC7-87A6-4C14-9A39-E3F12B01C4D4"
SLIDE_WH = (39839, 45988)  # level_dim of the real patches file (patch_level 0)


@pytest.fixture(scope="module")
def clam_patches(shared_data: Path) -> Path:
    p = shared_data / "foreign" / "clam" / "TCGA-2V-A95S_patches.h5"
    if not p.is_file():
        pytest.skip(f"{p} is not present")
    return p


def save_hdf5_like_clam(path: Path, feats: np.ndarray, coords: np.ndarray, batch: int = 256) -> None:
    """CLAM ``utils/file_utils.py::save_hdf5`` as ``compute_w_loader`` calls it: one call per batch, the first with
    mode 'w' creating chunked (32 rows), resizable datasets, the next ones appending; attr_dict=None."""
    for start in range(0, len(feats), batch):
        assets = {"features": feats[start:start + batch].astype(np.float32),
                  "coords": coords[start:start + batch].astype(np.int32)}
        with h5py.File(path, "w" if start == 0 else "a") as f:
            for key, val in assets.items():
                if key not in f:
                    ds = f.create_dataset(key, shape=val.shape, maxshape=(None,) + val.shape[1:],
                                          chunks=(32,) + val.shape[1:], dtype=val.dtype)
                    ds[:] = val
                else:
                    ds = f[key]
                    ds.resize(len(ds) + val.shape[0], axis=0)
                    ds[-val.shape[0]:] = val


def tiled_store(path: Path, width: int, height: int, mpp0: float, patch0: float = 512.0, g_side: int = 16) -> None:
    """A store laid out as `hwsi tile` lays it (regions of g_side² patches from (0, 0), patch p at
    ``round(k × patch0)``), every region kept, every patch tissue — a slide too big to synthesise in a test."""
    r0 = patch0 * g_side
    nx, ny = int(np.ceil(width / r0)), int(np.ceil(height / r0))
    jj, ii = np.meshgrid(np.arange(nx), np.arange(ny))
    rx, ry = np.rint(jj.ravel() * r0).astype(np.int64), np.rint(ii.ravel() * r0).astype(np.int64)
    off = np.rint(np.arange(g_side) * patch0).astype(np.int64)
    oy, ox = np.meshgrid(off, off, indexing="ij")
    coords = np.stack([rx[:, None] + ox.ravel()[None], ry[:, None] + oy.ravel()[None]], axis=2)
    target = patch0 * mpp0 / 256
    meta = StoreMeta(slide_path=f"/x/{path.stem}.svs", slide_id=path.stem, mpp_level0=mpp0, target_mpp=target,
                     effective_mpp=target, region_size=256 * g_side, patch_size=256, region_size_level0=r0,
                     patch_size_level0=patch0, level0_width=width, level0_height=height, stages=["tile"])
    with new_store(path, meta) as w:
        w.write_grid(np.stack([rx, ry], 1), np.ones(len(rx), np.float32), coords, np.ones(coords.shape[:2], bool))


def real_coords(p: Path) -> np.ndarray:
    with h5py.File(p) as f:
        return f["coords"][:]


def test_real_patches_file_is_not_a_features_file(clam_patches: Path, tmp_path: Path) -> None:
    with pytest.raises(FeatureImportError, match=r"TCGA-2V-A95S_patches\.h5: a patches file \(coordinates only, "
                                                 r"no 'features'\): give it with --patches"):
        read_foreign_features(clam_patches)


def test_clam_features_alone_and_with_patches_file(clam_patches: Path, tmp_path: Path) -> None:
    job = tmp_path / "job"
    sp = store_path(job, SLIDE_ID)
    tiled_store(sp, *SLIDE_WH, mpp0=0.25)
    coords = real_coords(clam_patches)
    feats = np.random.default_rng(0).normal(size=(len(coords), 8)).astype(np.float32)
    feat_dir = tmp_path / "FEAT" / "h5_files"
    feat_dir.mkdir(parents=True)
    src = feat_dir / f"{SLIDE_ID}.h5"
    save_hdf5_like_clam(src, feats, coords)
    with h5py.File(src) as f:  # what CLAM really writes: no attributes anywhere
        assert not f.attrs and not f["coords"].attrs and not f["features"].attrs

    ff = read_foreign_features(src)
    assert ff.source_format == "clam" and ff.patch_size_level0 == 512
    assert ff.footprint.source.startswith("assumed = the coordinates' grid step, 99% of neighbour steps")
    rep = import_features(sp, src, ImportConfig(name="r50"))
    # CLAM starts each tissue contour's grid at its corner: at the default tolerance (128 px) 1437 of 1481 match
    assert (rep.n_foreign, rep.n_matched, rep.n_duplicates) == (1481, 1437, 0)
    assert rep.scale_rule == "mpp" and rep.foreign_effective_mpp is None  # patch px unknown without attributes
    assert "footprint 512 level-0 px (assumed = the coordinates' grid step" in rep.summary()

    # with its patches file (the file or its folder): the attributes give footprint, level and the slide's size
    for patches in (clam_patches, clam_patches.parent):
        pf = tmp_path / "patches" / f"{SLIDE_ID}.h5"
        pf.parent.mkdir(exist_ok=True)
        pf.write_bytes(clam_patches.read_bytes())
        patches = pf if patches.is_file() else pf.parent  # CLAM names patch files <slide_id>.h5
        rep = import_features(sp, src, ImportConfig(name="r50", patches=str(patches), tolerance=0.5, overwrite=True))
        assert rep.footprint_source == f"CLAM attributes of patches file {SLIDE_ID}.h5"
        assert rep.n_matched == 1481 and rep.foreign_effective_mpp == 0.25 and rep.patches_file == str(pf)
    with SlideStore(sp) as s:
        got = s.patch_features("r50").reshape(-1, 8)
        pc = s.patch_coords().reshape(-1, 2)
    # row i of the CLAM file sits on the store patch nearest its top-left
    i = 100
    j = int(np.argmin(np.abs(pc - coords[i]).max(axis=1)))
    np.testing.assert_array_equal(got[j], feats[i])

    # the CLI, single file: slide id = the file stem
    assert main(["import-features", str(job), str(src), "--name", "r50b", "--patches", str(pf)]) == 0


def test_clam_pt_needs_patches(clam_patches: Path, tmp_path: Path) -> None:
    import torch

    sp = tmp_path / f"{SLIDE_ID}.h5"
    tiled_store(sp, *SLIDE_WH, mpp0=0.25)
    coords = real_coords(clam_patches)
    feats = np.arange(len(coords) * 3, dtype=np.float32).reshape(-1, 3)
    pt = tmp_path / "pt_files" / f"{SLIDE_ID}.pt"
    pt.parent.mkdir()
    torch.save(torch.from_numpy(feats), pt)  # extract_features_fp.py: torch.save(features, pt_files/<slide>.pt)
    with pytest.raises(FeatureImportError, match=r"\.pt: a \.pt features file has no coordinates: give the patches "
                                                 r"\.h5 of the same run with --patches"):
        import_features(sp, pt, ImportConfig(name="r50"))
    rep = import_features(sp, pt, ImportConfig(name="r50", patches=str(clam_patches)))
    assert rep.n_foreign == 1481 and rep.source_format == "clam" and rep.dim == 3
    short = tmp_path / "short.pt"
    torch.save(torch.from_numpy(feats[:10]), short)
    with pytest.raises(FeatureImportError, match=r"10 feature rows but the patches file .* has 1481 coords"):
        read_foreign_features(short, clam_patches)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(FeatureImportError, match=r"junk\.pt: not a features \.pt saved by CLAM or TRIDENT"):
        read_foreign_features(junk, clam_patches)


def test_wrong_slide_and_wrong_grid(clam_patches: Path, shared_data: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    # a real slide tiled by hwsi, the real CLAM patches file of another slide: its level_dim names the mismatch
    job = tmp_path / "job"
    slide = shared_data / "slides" / "cmu-1-small-region.svs"
    assert main(["tile", str(slide), "--out", str(job), "--region-size", "1024", "-q"]) == 0
    coords = real_coords(clam_patches)
    src = tmp_path / "cmu-1-small-region.h5"
    save_hdf5_like_clam(src, np.ones((len(coords), 4), np.float32), coords)
    capsys.readouterr()
    rc = main(["import-features", str(job), str(src), "--name", "r50", "--patches", str(clam_patches)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.endswith("cmu-1-small-region.h5: made on a slide of 39839×45988 level-0 px (CLAM attributes "
                        "of patches file TCGA-2V-A95S_patches.h5) but the store's slide cmu-1-small-region is "
                        "2220×2967: wrong slide")
    # without the patches file, the footprint is stated: then NOTHING matches, and the import says why
    rc = main(["import-features", str(job), str(src), "--name", "r50", "--patch-size-level0", "256"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert ("cmu-1-small-region.h5: only 0/1481 foreign patches matched the store's grid (below --min-matched 0.5): "
            "1481 of 1481 coordinates lie outside the slide (2220×2967 level-0 px; they span x 7074–34853, "
            "y 3088–41873): wrong slide, or coordinates not in level-0 pixels") in err
    with SlideStore(store_path(job, "cmu-1-small-region")) as s:
        assert not s.has_features("r50")  # no all-zero features written


def test_offset_grid_and_tolerance(tmp_path: Path) -> None:
    sp = tmp_path / "s.h5"
    tiled_store(sp, 8192, 8192, mpp0=0.25)
    xy = np.stack(np.meshgrid(np.arange(200, 8000, 512), np.arange(200, 8000, 512)), -1).reshape(-1, 2)
    src = tmp_path / "s_feats.h5"
    save_hdf5_like_clam(src, np.ones((len(xy), 2), np.float32), xy)
    with pytest.raises(FeatureImportError, match=r"only 0/256 foreign patches matched .*: the foreign grid is offset "
                                                 r"from the store's by about \(\+200, \+200\) level-0 px"):
        import_features(sp, src, ImportConfig(name="f"))
    rep = import_features(sp, src, ImportConfig(name="f", tolerance=0.5))
    assert rep.n_matched == 256
    # a grid of another step (patch size mismatch) is named as such; a stated size that contradicts the file too
    xy2 = np.stack(np.meshgrid(np.arange(0, 8000, 300), np.arange(0, 8000, 300)), -1).reshape(-1, 2)
    src2 = tmp_path / "s_300.h5"
    save_hdf5_like_clam(src2, np.ones((len(xy2), 2), np.float32), xy2)
    with pytest.raises(FeatureImportError, match=r"s_300\.h5: foreign patches are 300 level-0 px \(assumed = "):
        import_features(sp, src2, ImportConfig(name="g"))
    with pytest.raises(FeatureImportError, match=r"the coordinates step by 300 px \(100% of neighbour steps\) but "
                                                 r"the store's patches are 512 level-0 px"):
        import_features(sp, src2, ImportConfig(name="g", patch_size_level0=512, min_matched=0.9))


def test_batch_records_the_failing_slide(clam_patches: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job"
    tiled_store(store_path(job, SLIDE_ID), *SLIDE_WH, mpp0=0.25)
    tiled_store(store_path(job, "other"), 8000, 8000, mpp0=0.25)
    coords = real_coords(clam_patches)
    feat = tmp_path / "FEAT" / "h5_files"
    feat.mkdir(parents=True)
    save_hdf5_like_clam(feat / f"{SLIDE_ID}.h5", np.ones((len(coords), 4), np.float32), coords)
    save_hdf5_like_clam(feat / "other.h5", np.ones((len(coords), 4), np.float32), coords)  # another slide's coords
    capsys.readouterr()
    assert main(["import-features", str(job), str(tmp_path / "FEAT"), "--name", "r50", "-q"]) == 1
    err = capsys.readouterr().err
    assert "1 done, 0 skipped, 1 failed" in err
    rec = json.loads((job / "errors" / "other.import-features.json").read_text())
    assert rec["stage"] == "import-features" and rec["error"] == "FeatureImportError"
    assert "only 0/1481 foreign patches matched" in rec["message"] and "lie outside the slide" in rec["message"]
    with SlideStore(store_path(job, SLIDE_ID)) as s:
        assert s.has_features("r50")
    # a rerun skips the done slide and tries the failed one again
    assert main(["import-features", str(job), str(tmp_path / "FEAT"), "--name", "r50", "-q"]) == 1
    assert "0 done, 1 skipped, 1 failed" in capsys.readouterr().err
    assert main(["import-features", str(job), str(feat), "--name", "r50", "--slide-id", "x"]) == 2

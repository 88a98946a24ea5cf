"""Import of TRIDENT / CLAM features files into a store (hwsi.features.import_features)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from hwsi.cli import main
from hwsi.errors import StoreError
from hwsi.features.import_config import ImportConfig
from hwsi.features.import_features import FeatureImportError, import_features, match_coords, read_foreign_features
from hwsi.store import StoreMeta, new_store, store_path

PATCH0 = 512  # level-0 patch side: 256 px at 0.5 µm/px on a 0.25 µm/px slide
SIDE = 2  # 2x2 patches per region


def make_store(path: Path, region_xy: list[tuple[int, int]]) -> np.ndarray:
    """A store as `hwsi tile` writes it: R regions of SIDE x SIDE patches; the last patch of region 0 is background."""
    r, g = len(region_xy), SIDE * SIDE
    coords = np.zeros((r, g, 2), np.int64)
    for i, (x, y) in enumerate(region_xy):
        for j in range(g):
            coords[i, j] = (x + (j % SIDE) * PATCH0, y + (j // SIDE) * PATCH0)
    tissue = np.ones((r, g), bool)
    tissue[0, -1] = False
    meta = StoreMeta(slide_path="/x/s.tiff", slide_id=path.stem, mpp_level0=0.25, target_mpp=0.5, effective_mpp=0.5,
                     region_size=512, patch_size=256, region_size_level0=1024.0, patch_size_level0=float(PATCH0),
                     level0_width=8000, level0_height=8000, stages=["tile"])
    with new_store(path, meta) as w:
        w.write_grid(np.asarray(region_xy, np.int64), np.ones(r, np.float32), coords, tissue)
    return coords


def cfg(name: str, **kw: object) -> ImportConfig:
    return ImportConfig(name=name, **kw)  # type: ignore[arg-type]


def save_h5_like_trident(path: Path, assets: dict[str, np.ndarray], attributes: dict[str, dict]) -> None:
    """As TRIDENT 0.3.0 ``trident/IO.py::save_h5`` writes: each asset chunked by ONE row, first axis resizable,
    attributes on the dataset (a dict as JSON, None as the string 'None')."""
    with h5py.File(path, "w") as f:
        for key, val in assets.items():
            ds = f.create_dataset(key, shape=val.shape, maxshape=(None,) + val.shape[1:], chunks=(1,) + val.shape[1:],
                                  dtype=val.dtype)
            ds[:] = val
            for k, v in attributes.get(key, {}).items():
                ds.attrs[k] = json.dumps(v) if isinstance(v, dict) else ("None" if v is None else v)


def trident_coords_attrs(patch_size: int, src_mag: int, target_mag: int, width: int, height: int,
                         name: str = "s") -> dict:
    """The ``coords`` attributes of TRIDENT's ``coords_to_h5`` (``patch_size_level0`` from MAGNIFICATION)."""
    return {"patch_size": patch_size, "patch_size_level0": patch_size * src_mag // target_mag,
            "level0_magnification": src_mag, "target_magnification": target_mag, "overlap": 0, "name": name,
            "savetodir": "/out/20x_256px_0px_overlap", "level0_width": width, "level0_height": height}


def write_trident(path: Path, feats: np.ndarray, coords: np.ndarray, target_mag: int = 20) -> None:
    """A TRIDENT features file for a 0.25 µm/px "40×" slide of 8000² (the ``make_store`` one)."""
    attrs = trident_coords_attrs(256, 40, target_mag, 8000, 8000)
    save_h5_like_trident(path, {"features": feats, "coords": coords.astype(np.int64)},
                         {"features": {"name": "s", "savetodir": "/out/features_uni_v1", "encoder": "uni_v1"},
                          "coords": attrs})


def test_trident_import_maps_coords_and_reports(tmp_path: Path) -> None:
    sp = tmp_path / "job" / "stores" / "s1.h5"
    ours = make_store(sp, [(0, 0), (4096, 1024)])
    flat = ours.reshape(-1, 2)
    rng = np.random.default_rng(0)
    # foreign rows: our patches 0..6 (slightly jittered), one far away, one duplicate of patch 1
    fc = np.concatenate([flat[:7] + rng.integers(-20, 21, size=(7, 2)), [[9000, 9000]], flat[1:2] + 60])
    ff = rng.normal(size=(9, 6)).astype(np.float32)
    src = tmp_path / "s1_trident.h5"
    write_trident(src, ff, fc)
    rep = import_features(sp, src, cfg("uni"))
    assert rep.source_format == "trident" and rep.foreign_patch_size_level0 == PATCH0
    assert (rep.n_foreign, rep.n_matched, rep.n_unmatched, rep.n_duplicates) == (9, 7, 2, 1)
    # tissue patches without a feature: region 1 patch 3 (patch 7 overall); region 0 patch 3 is background
    assert rep.n_tissue_missing == 1
    with h5py.File(sp) as f:
        got = f["patches/uni"][:]
        assert got.shape == (2, 4, 6) and f["patches/uni"].chunks == (1, 4, 6)
        np.testing.assert_array_equal(got.reshape(8, 6)[:7], ff[:7])  # duplicate (farther) lost to the exact row
        assert (got[1, 3] == 0).all()
        assert f["imported/uni/matched"][:].ravel().tolist() == [True] * 7 + [False]
        assert json.loads(f.attrs["encoders"])["uni"] == 6
        assert f["patches/uni"].attrs["n_unmatched"] == 2
        assert f.attrs["stages"] == json.dumps(["tile"])
    assert not list(sp.parent.glob("*.tmp-*"))
    assert rep.scale_rule == "mpp" and rep.foreign_effective_mpp == 0.5 and rep.encoder == "uni_v1"
    with pytest.raises(StoreError, match="already exists"):
        import_features(sp, src, cfg("uni"))
    import_features(sp, src, cfg("uni", overwrite=True))


def test_clam_import_with_level_attrs_and_3d_features(tmp_path: Path) -> None:
    sp = tmp_path / "s2.h5"
    ours = make_store(sp, [(0, 0)])
    src = tmp_path / "clam.h5"
    ff = np.arange(4 * 3, dtype=np.float32).reshape(1, 4, 3)
    with h5py.File(src, "w") as f:
        f["features"] = ff
        ds = f.create_dataset("coords", data=ours.reshape(-1, 2)[::-1])
        ds.attrs["patch_size"] = 256
        ds.attrs["patch_level"] = 1
        ds.attrs["downsample"] = np.array([2.0, 2.0])
    fr = read_foreign_features(src)
    assert fr.source_format == "clam" and fr.patch_size_level0 == 512.0 and fr.features.shape == (4, 3)
    rep = import_features(sp, src, cfg("clam_r50"))
    assert rep.n_matched == 4 and rep.n_unmatched == 0
    with h5py.File(sp) as f:
        np.testing.assert_array_equal(f["patches/clam_r50"][0], ff[0][::-1])


def test_wrong_scale_and_bad_files(tmp_path: Path) -> None:
    sp = tmp_path / "s3.h5"
    ours = make_store(sp, [(0, 0)])
    src = tmp_path / "big.h5"
    write_trident(src, np.ones((4, 2), np.float32), ours.reshape(-1, 2), target_mag=10)
    with pytest.raises(FeatureImportError, match=r"big\.h5: foreign patches are 1024 level-0 px \(TRIDENT attributes "
                       r"of big\.h5\) but the store's are 512 .*TRIDENT's patches are 256 px at 10× \(≈ 256 µm\), "
                       r"the store's 256 px at 0.5 µm/px \(128 µm\)"):
        import_features(sp, src, cfg("x"))
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f["feats"] = np.ones((2, 2))
    with pytest.raises(FeatureImportError, match=r"bad\.h5: missing dataset\(s\) \['features', 'coords'\]"):
        read_foreign_features(bad)
    mism = tmp_path / "mism.h5"
    with h5py.File(mism, "w") as f:
        f["features"] = np.ones((3, 2))
        f["coords"] = np.zeros((2, 2))
    with pytest.raises(FeatureImportError, match="3 feature rows but 2 coords"):
        read_foreign_features(mism)
    noth5 = tmp_path / "x.h5"
    noth5.write_text("hello")
    with pytest.raises(FeatureImportError, match="not a readable HDF5"):
        read_foreign_features(noth5)
    with pytest.raises(StoreError, match="no such store"):
        import_features(tmp_path / "none.h5", src, cfg("x"))


def test_match_coords_tolerance() -> None:
    ours = np.array([[0, 0], [512, 0]])
    t, d, dup = match_coords(np.array([[100, 0], [129, 0], [400, 10]]), ours, 128)
    assert t.tolist() == [0, -1, 1] and dup == 0 and d[0] == 100


def test_cli_import_features(tmp_path: Path) -> None:
    job = tmp_path / "job"
    ours = make_store(store_path(job, "slideA"), [(0, 0)])
    src = tmp_path / "f.h5"
    write_trident(src, np.ones((4, 5), np.float32), ours.reshape(-1, 2))
    assert main(["import-features", str(job), str(src), "--slide-id", "slideA", "--name", "uni_v1"]) == 0
    with h5py.File(store_path(job, "slideA")) as f:
        assert f["patches/uni_v1"].shape == (1, 4, 5)
    assert main(["import-features", str(job), str(src), "--slide-id", "nope", "--name", "u"]) == 2


def test_diagnosis_when_patches_fall_outside_the_tissue_regions() -> None:
    from hwsi.features.import_match import GridFacts, diagnose, grid_offset, grid_step

    xy = np.stack(np.meshgrid(np.arange(0, 5120, 512), np.arange(0, 5120, 512)), -1).reshape(-1, 2)
    assert grid_step(xy) == (512, 1.0) and grid_offset(xy + 30, 512) == (30.0, 30.0)
    assert grid_step(xy[:1]) is None
    why = diagnose(xy, np.ones(len(xy), bool), GridFacts(8000, 8000, 512.0, 4, 0.25))
    assert why == ("the unmatched patches lie outside the store's 4 tissue regions (`hwsi tile` kept less tissue "
                   "than the foreign tool, or the slides differ)")


def test_stated_size_patches_option_and_cli_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job"
    ours = make_store(store_path(job, "s"), [(0, 0)])
    src = tmp_path / "s.h5"
    write_trident(src, np.ones((4, 5), np.float32), ours.reshape(-1, 2))
    with pytest.raises(FeatureImportError, match=r"s\.h5: --patch-size-level0 256 disagrees with the 512 level-0 px "
                                                 r"of the TRIDENT attributes of s\.h5"):
        read_foreign_features(src, patch_size_level0=256)
    (tmp_path / "p").mkdir()
    with pytest.raises(FeatureImportError, match=r"p: no patches file for s\.h5 \(looked for s\.h5, s_patches\.h5, "
                                                 r"patches/s\.h5, patches/s_patches\.h5\)"):
        read_foreign_features(src, tmp_path / "p")
    with pytest.raises(FeatureImportError, match=r"nope: patches file or folder not found \(--patches\)"):
        read_foreign_features(src, tmp_path / "nope")
    capsys.readouterr()
    assert main(["import-features", str(job), str(src), "--name", "u", "--tolerance", "0.7"]) == 2
    assert "Invalid value for '--tolerance': must be a number in (0, 0.5], got 0.7" in capsys.readouterr().err
    assert main(["import-features", str(job), str(src), "--name", "u", "--min-matched", "1.5"]) == 2
    assert main(["import-features", str(job), str(src), "--name", "_u"]) == 2
    assert "invalid feature name '_u'" in capsys.readouterr().err
    assert main(["import-features", str(job), str(src), "--name", "u", "--min-matched", "1"]) == 0

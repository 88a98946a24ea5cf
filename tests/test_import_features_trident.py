"""`hwsi import-features` on what TRIDENT writes (mahmoodlab/TRIDENT 0.3.0: ``coords_to_h5`` attributes,
``save_h5`` layout, ``extract_patch_features`` empty-slide and ``saveas='pt'`` branches), on a "40×" SynthPath-style
pyramid at 0.2631 µm/px tiled by `hwsi tile` (TRIDENT issue #119: 40× scans at 0.263–0.265 µm/px)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from test_import_features import make_store, save_h5_like_trident, trident_coords_attrs

from hwsi.cli import main
from hwsi.features.import_config import ImportConfig
from hwsi.features.import_features import FeatureImportError, import_features, read_foreign_features
from hwsi.features.import_layouts import trident_magnification
from hwsi.store import SlideStore, StoreMeta, new_store, store_path
from hwsi.synth.pyramid import write_pyramid_tiff

W, H, MPP = 6144, 5120, 0.2631


def tissue(x0: int, y0: int, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w]
    return np.stack([200 + 0 * xx, 110 + (xx % 40), 170 + (yy % 30)], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def slide_40x(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("slides") / "s40.tiff"
    write_pyramid_tiff(p, W, H, MPP, tissue, threads=2)
    return p


def trident_grid(width: int, height: int, step: int) -> np.ndarray:
    """TRIDENT's WSIPatcher grid: ceil(width / step) columns × ceil(height / step) rows from (0, 0), row-major."""
    xs, ys = np.arange(0, width, step), np.arange(0, height, step)
    return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.int64)


def write_trident_features(path: Path, feats: np.ndarray, coords: np.ndarray, attrs: dict) -> None:
    save_h5_like_trident(path, {"features": feats, "coords": coords},
                         {"features": {"name": path.stem, "savetodir": str(path.parent), "encoder": "uni_v1"},
                          "coords": attrs})


def test_40x_slide_at_0_2631_um_per_px(slide_40x: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert trident_magnification(MPP) == 40
    job = tmp_path / "job"
    assert main(["tile", str(slide_40x), "--out", str(job), "--region-size", "1024", "--patch-size", "256", "-q"]) == 0
    sp = store_path(job, "s40")
    with SlideStore(sp) as s:
        assert abs(s.meta.patch_size_level0 - 486.5) < 0.1  # hwsi's µm/px rule: 256 px × 0.5 / 0.2631
    attrs = trident_coords_attrs(256, 40, 20, W, H, name="s40")
    assert attrs["patch_size_level0"] == 512  # TRIDENT's magnification rule
    coords = trident_grid(W, H, 512)
    feats = np.random.default_rng(1).normal(size=(len(coords), 16)).astype(np.float32)
    src = tmp_path / "features_uni_v1" / "s40.h5"
    src.parent.mkdir()
    write_trident_features(src, feats, coords, attrs)

    # the scale is accepted by TRIDENT's rule; the grids (512 vs 486.5 px steps) drift apart, and the import says so
    capsys.readouterr()
    assert main(["import-features", str(job), str(src), "--name", "uni_v1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "foreign patches matched the store's grid (below --min-matched 0.5): " \
        "the coordinates step by 512 px (100% of neighbour steps) but the store's patches are 486.5 level-0 px " \
        "(the grids drift apart by 25.5 px a patch): a different patch size or level; re-tile with --target-mpp " \
        "0.5262 to put the store on the foreign grid, or raise --tolerance (at most 0.5)" in err

    # the nearest patch at --tolerance 0.5: imported, with the effective µm/px recorded
    rep = import_features(sp, src, ImportConfig(name="uni_v1", tolerance=0.5))
    assert rep.scale_rule == "trident-magnification" and rep.foreign_effective_mpp == pytest.approx(0.5262)
    assert rep.n_matched == len(coords) and rep.encoder == "uni_v1"
    with SlideStore(sp) as s:
        a = s.dataset_info("patches/uni_v1")[2]
        assert a["scale_rule"] == "trident-magnification" and a["foreign_effective_mpp"] == pytest.approx(0.5262)
        assert a["store_effective_mpp"] == 0.5 and a["foreign_patch_size_level0"] == 512

    # re-tiled at the effective µm/px the message named, the store's grid IS TRIDENT's: every patch matches exactly
    job2 = tmp_path / "job2"
    assert main(["tile", str(slide_40x), "--out", str(job2), "--region-size", "1024", "--patch-size", "256",
                 "--target-mpp", "0.5262", "-q"]) == 0
    rep = import_features(store_path(job2, "s40"), src, ImportConfig(name="uni_v1"))
    assert rep.scale_rule == "mpp" and rep.n_matched == len(coords) and rep.n_duplicates == 0
    with SlideStore(store_path(job2, "s40")) as s:
        got, pc = s.patch_features("uni_v1").reshape(-1, 16), s.patch_coords().reshape(-1, 2)
    for i in (0, 7, len(coords) - 1):
        j = int(np.flatnonzero((pc == coords[i]).all(axis=1))[0])
        np.testing.assert_array_equal(got[j], feats[i])


@pytest.mark.parametrize("mpp0,ours", [(0.2631, 486.5), (0.2265, 565.1)])
def test_trident_rule_accepts_40x_buckets_and_refuses_others(tmp_path: Path, mpp0: float, ours: float) -> None:
    sp = tmp_path / "s.h5"
    meta = StoreMeta(slide_path="/x/s.svs", slide_id="s", mpp_level0=mpp0, target_mpp=0.5, effective_mpp=0.5,
                     region_size=512, patch_size=256, region_size_level0=2 * ours, patch_size_level0=ours,
                     level0_width=4000, level0_height=4000, stages=["tile"])
    xy = np.array([[0, 0]], np.int64)
    with new_store(sp, meta) as w:
        pc = np.rint(np.array([[[0, 0], [ours, 0], [0, ours], [ours, ours]]])).astype(np.int64)
        w.write_grid(xy, np.ones(1, np.float32), pc, np.ones((1, 4), bool))
    src = tmp_path / "s_feats.h5"
    write_trident_features(src, np.ones((4, 2), np.float32), trident_grid(1024, 1024, 512),
                           trident_coords_attrs(256, 40, 20, 4000, 4000))
    rep = import_features(sp, src, ImportConfig(name="f", tolerance=0.5))
    assert rep.scale_rule == "trident-magnification"
    assert rep.foreign_effective_mpp == pytest.approx(mpp0 * 2)
    # a 20× TRIDENT file on this 40× slide: TRIDENT's own rule says the slide is not what it patched
    bad = tmp_path / "bad.h5"
    write_trident_features(bad, np.ones((4, 2), np.float32), trident_grid(512, 512, 256),
                           trident_coords_attrs(256, 20, 20, 4000, 4000))
    with pytest.raises(FeatureImportError, match=rf"bad\.h5: foreign patches are 256 level-0 px .*TRIDENT took level "
                                                 rf"0 as 20× but the store's slide is {mpp0:g} µm/px \(40× by "
                                                 r"TRIDENT's own rule\): wrong slide or --mpp"):
        import_features(sp, bad, ImportConfig(name="g"))


def test_empty_trident_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job"
    make_store(store_path(job, "s"), [(0, 0)])
    attrs = trident_coords_attrs(256, 40, 20, 8000, 8000)
    feats_dir = tmp_path / "features_uni_v1"
    feats_dir.mkdir()
    # encoder without embedding_dim: features (0,); with it: (0, D)
    write_trident_features(feats_dir / "s.h5", np.empty((0,), np.float32), np.empty((0, 2), np.int64), attrs)
    with h5py.File(feats_dir / "s.h5") as f:
        assert f["features"].shape == (0,) and f["coords"].shape == (0, 2)
    ff = read_foreign_features(feats_dir / "s.h5")
    assert ff.features.shape == (0, 0) and ff.source_format == "trident"
    capsys.readouterr()
    assert main(["import-features", str(job), str(feats_dir / "s.h5"), "--name", "uni_v1"]) == 0
    out = capsys.readouterr().out
    assert "s: patches/uni_v1 (0-d, trident): no patches in the file (the tool found no tissue): nothing written; " \
           "3 tissue patches without a feature" in out
    with SlideStore(store_path(job, "s")) as s:
        assert not s.has_features("uni_v1")
    write_trident_features(feats_dir / "s.h5", np.empty((0, 6), np.float32), np.empty((0, 2), np.int64), attrs)
    assert main(["import-features", str(job), str(feats_dir), "--name", "uni_v1", "-q"]) == 0
    with SlideStore(store_path(job, "s")) as s:
        assert s.has_features("uni_v1") and not s.patch_features("uni_v1").any()


def test_trident_pt_with_its_patches_file(tmp_path: Path) -> None:
    import torch

    sp = tmp_path / "s.h5"
    ours = make_store(sp, [(0, 0)])
    coords = ours.reshape(-1, 2)
    patches = tmp_path / "20x_256px_0px_overlap" / "patches"
    patches.mkdir(parents=True)
    save_h5_like_trident(patches / "s_patches.h5", {"coords": coords},  # coords_to_h5: <name>_patches.h5
                         {"coords": trident_coords_attrs(256, 40, 20, 8000, 8000)})
    feats = np.arange(8, dtype=np.float32).reshape(4, 2)
    pt = tmp_path / "s.pt"
    torch.save(feats, pt)  # extract_patch_features(saveas='pt'): torch.save of the numpy array
    rep = import_features(sp, pt, ImportConfig(name="f", patches=str(patches.parent)))
    assert rep.source_format == "trident" and rep.n_matched == 4 and rep.patches_file.endswith("s_patches.h5")
    with SlideStore(sp) as s:
        np.testing.assert_array_equal(s.patch_features("f")[0], feats)
